"""Benchmark: codecs on the bundled tiny-fashion model's Fashion-MNIST embeddings (issue 4 §5a).

Codecs train on the 60,000 training-split image embeddings and are evaluated on the 10,000 test
images, with the ten prompts ``"a photo of a {class}."`` as the class queries. Embeddings are cached
under ``.cache/``::

    python benchmarks/codecs_fashion.py                      # all codecs at 8..128 bits
    python benchmarks/codecs_fashion.py --codec pqvae --bits 16
    python benchmarks/codecs_fashion.py --query-weighted     # codecs weighted by generic text queries
    python benchmarks/codecs_fashion.py --codec default --bits 32,64   # what `semdb ingest` trains (§11)

``--query-weighted`` trains the codecs query-weighted (:mod:`semdb.codecs.query_weighted`) by the
prompts ``"a photo of a {class}."`` of open_clip's 1,000 ImageNet class names, embedded by the bundled
model's text tower: a generic sample of text queries, not the ten Fashion-MNIST prompts measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from rich.console import Console

from semdb.codecs import Codec, train_codec
from semdb.codecs.choice import train_for_database
from semdb.eval_command import parse_bits, parse_codecs, render_table
from semdb.evaluation import evaluate_codecs

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "fashion_tiny.npz"


def load_fashion(cache: Path = CACHE) -> dict[str, np.ndarray]:
    """``train (60000, d)``, ``train_labels``, ``test (10000, d)``, ``test_labels``, ``prompts (10, d)``
    float32 embeddings by the bundled model, computed once and cached in ``cache``."""
    if cache.exists():
        return dict(np.load(cache))
    from PIL import Image

    from semdb import fashion_mnist
    from semdb.encoder import load_encoder

    encoder = load_encoder("tiny-fashion", batch_size=512)
    data: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        images, labels = fashion_mnist.load(split)
        print(f"embedding {len(images)} {split} images with tiny-fashion", file=sys.stderr)
        data[split] = encoder.encode_images([Image.fromarray(image) for image in images])
        data[f"{split}_labels"] = labels
    data["prompts"] = encoder.encode_texts([f"a photo of a {name}." for name in fashion_mnist.CLASS_NAMES])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **data)
    return data


def generic_queries() -> np.ndarray:
    """``(1000, d)`` float32: ``"a photo of a {class}."`` for open_clip's ImageNet class names, embedded
    by the bundled model's text tower."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from semdb.encoder import load_encoder

    encoder = load_encoder("tiny-fashion", batch_size=256)
    return encoder.encode_texts([f"a photo of a {name}." for name in IMAGENET_CLASSNAMES])


def main() -> None:
    """Parse arguments, load (or embed) the data, evaluate, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codec", default="pq,opq,rq,pqvae", help="comma-separated codecs")
    parser.add_argument("--bits", default="8,16,32,64,128", help="comma-separated bit rates")
    parser.add_argument("--query-weighted", action="store_true", help="weight the codecs by generic text queries")
    args = parser.parse_args()
    data = load_fashion()
    train_queries = generic_queries() if args.query_weighted else None
    codecs = args.codec.split(",")
    if "default" not in codecs:
        parse_codecs(args.codec)

    def trained(name: str, rate: int) -> Codec:
        if name == "default":  # what `semdb ingest` trains, with semdb's shipped vocabulary as the sample
            from semdb.encoder import load_encoder
            from semdb.vocabulary import query_sample

            encoder = load_encoder("tiny-fashion", batch_size=256)
            return train_for_database(
                data["train"], codec=None, bits=rate, fidelity=None, queries=lambda n: query_sample(encoder, n)
            ).codec
        return train_codec(name, data["train"], rate, queries=train_queries)

    rows = evaluate_codecs(
        data["train"],
        data["test"],
        data["test_labels"],
        data["prompts"],
        np.arange(len(data["prompts"])),
        codecs,
        parse_bits(args.bits),
        on_row=lambda row: print(json.dumps(row), file=sys.stderr),
        trained=trained,
    )
    weighted = ", query-weighted by ImageNet class prompts" if args.query_weighted else ""
    Console().print(render_table(rows, f"tiny-fashion on Fashion-MNIST (train 60k → test 10k){weighted}"))


if __name__ == "__main__":
    main()
