"""Benchmark: do the fidelity figures ``semdb stats`` prints agree with an offline evaluation?

A "collection" of embeddings is staged as ``semdb ingest`` stages it (its first ``--staged``
embeddings, 10,000 by default like ``DEFAULT_TRAIN_SIZE``), the codec is trained and measured
exactly as ingest does (:func:`semdb.codecs.choice.train_for_database`: 1,000 held out, generic
query sample), and then the whole collection is coded and evaluated offline: text→image top-10
agreement of the same queries over every item, image→image 10-recall@10 of 2,000 random items, and
the mean cosine over every item. ``--fidelity F`` also runs ``--bits auto`` and checks that the
chosen rate meets ``F`` offline::

    python benchmarks/fidelity_check.py --data fashion                  # 10k test images, bundled model
    python benchmarks/fidelity_check.py --data cupl --fidelity 0.9      # 29.7k held-out CuPL sentences

Data: ``fashion`` = the 10,000 Fashion-MNIST test images through the bundled model (cache of
``codecs_fashion.py``), queries = the vocabulary through its text tower; ``cupl`` = the 29,700
held-out sentences of ``codecs_cupl.py``'s split 0 (``--split-seed``: another split's), queries =
the vocabulary less the held-out classes' texts, through all-MiniLM-L6-v2.
"""

from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np

from semdb.codecs import Codec
from semdb.codecs.choice import FIDELITY_QUERIES, train_for_database
from semdb.cosine import CosineIndex
from semdb.evaluation import RECALL_QUERIES, recall_at_k
from semdb.fidelity import at_collection


def collection(name: str, split_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(items (n, d), queries (c, d))`` float32 of data set ``name`` (CuPL: of class split
    ``split_seed``)."""
    if name == "fashion":
        from codecs_fashion import load_fashion

        from semdb.encoder import load_encoder
        from semdb.vocabulary import query_sample

        return load_fashion()["test"], query_sample(load_encoder("tiny-fashion"))
    from codecs_cupl import generic_sample, load_cupl, protocol, split

    names, sentences, labels, prompts = load_cupl()
    _, held_out = split(labels, len(names), split_seed)
    return protocol(names, sentences, labels, prompts, split_seed).test, generic_sample(names, held_out)


def offline(codec: Codec, items: np.ndarray, queries: np.ndarray, seed: int = 0) -> dict[str, float]:
    """The fidelity figures of ``codec`` over the whole of ``items`` ``(n, d)``."""
    codes = codec.encode(items)
    coded = codec.cosine_index(codes)
    coded_for_images = codec.image_cosine_index(codes, coded)  # the item path where the codec has one
    exact = faiss.IndexFlatIP(items.shape[1])
    exact.add(items)
    probes = items[np.random.default_rng(seed).choice(len(items), min(RECALL_QUERIES, len(items)), replace=False)]

    def agreement(q: np.ndarray, index: CosineIndex) -> float:
        return recall_at_k(exact.search(q, 10)[1], index.search(q, 10)[1])

    decoded = codec.decode(codes)
    cosine = (decoded * items).sum(1) / np.maximum(np.linalg.norm(decoded, axis=1), 1e-12)
    return {
        "text_to_image": agreement(queries, coded),
        "image_to_image": agreement(probes, coded_for_images),
        "mean_cosine": float(cosine.mean()),
    }


def main() -> None:
    """Train as ingest does, measure offline, print both side by side."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("fashion", "cupl"), default="fashion")
    parser.add_argument("--staged", type=int, default=10_000, help="embeddings staged before training")
    parser.add_argument("--fidelity", type=float, default=None, help="also run --bits auto with this target")
    parser.add_argument("--split-seed", type=int, default=0, help="CuPL class split (0 is the one reported)")
    args = parser.parse_args()
    items, vocabulary = collection(args.data, args.split_seed)
    items = np.ascontiguousarray(items[np.random.default_rng(1).permutation(len(items))])  # staged in any order
    staged = items[: args.staged]

    def sample(limit: int | None) -> np.ndarray:
        return vocabulary if limit is None else vocabulary[np.linspace(0, len(vocabulary) - 1, limit).astype(int)]

    runs = [("default", None)] + ([("auto", args.fidelity)] if args.fidelity is not None else [])
    for label, target in runs:
        wall, cpu = time.perf_counter(), time.process_time()
        trained = train_for_database(staged, codec=None, bits=None, fidelity=target, queries=sample)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        report = trained.report
        queries = sample(None if report["query_weighted"] else FIDELITY_QUERIES)
        for scope, subset in (("staged", staged), ("collection", items)):
            measured = offline(trained.codec, subset, queries)
            stored = report["fidelity"]
            row = {
                "run": label,
                "data": args.data,
                "codec": report["codec"],
                "bits": report["bits_per_image"],
                "offline_over": f"{scope} ({len(subset)})",
                **{key: round(value, 3) for key, value in measured.items()},
                **{f"stats_{key}": round(stored[key], 3) for key in measured},
                # What stats prints for a database of this many images (estimated from the depth curves).
                **{
                    f"stats_at_{len(subset)}_{key}": round(value, 3)
                    for key, value in (at_collection(stored, len(subset)) or {}).items()
                },
                "train_wall_s": round(wall, 1),
                "train_cpu_s": round(cpu, 1),
            }
            if target is not None:
                row["target"] = target
                row["meets_target_offline"] = measured["text_to_image"] >= target
                row["rates_tried"] = [
                    (r["bits_per_image"], round(r["text_to_image"], 3)) for r in report["rates_tried"]
                ]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
