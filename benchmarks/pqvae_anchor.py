"""PQVAE with anchor similarity distillation on the CuPL protocol: zero-shot / mAP@100 / 10-recall@10.

Each variant is a JSON object of :class:`semdb.codecs.pqvae.PQVAEConfig` overrides, e.g.

python benchmarks/pqvae_anchor.py --bits 64 --variants '{}' '{"anchors": 512, "anchor_kl_weight": 1}'

Prints one JSON line per variant (also to ``--log``), the metrics computed as
:func:`semdb.evaluation.evaluate_codecs` computes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from codecs_cupl import load_cupl, protocol

from semdb.codecs.pqvae import PQVAECodec
from semdb.evaluation import (
    RECALL_K,
    RECALL_QUERIES,
    _flat_index,
    mean_average_precision,
    recall_at_k,
    zero_shot_accuracy,
)


def main() -> None:
    """Train one PQVAE per variant and print its metrics."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[64])
    parser.add_argument("--variants", nargs="+", default=["{}"], help="JSON objects of PQVAEConfig overrides")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    names, sentences, labels, prompts = load_cupl()
    train, test, test_labels, queries, query_labels, _ = protocol(names, sentences, labels, prompts)
    recall_queries = test[:RECALL_QUERIES]
    _, truth = _flat_index(test).search(recall_queries, RECALL_K)
    for bits in args.bits:
        for variant in args.variants:
            start = time.perf_counter()
            codec = PQVAECodec.train(train, bits, seed=args.seed, **json.loads(variant))
            seconds = time.perf_counter() - start
            codes = codec.encode(test)
            decoded = codec.decode(codes)
            index = codec.search_index(codes)
            _, found = index.search(recall_queries, RECALL_K)
            row = {
                "bits": bits,
                "variant": json.loads(variant),
                "zero_shot": round(zero_shot_accuracy(decoded, test_labels, queries, query_labels), 4),
                "map100": round(mean_average_precision(index, test_labels, queries, query_labels), 4),
                "recall10": round(recall_at_k(truth, found), 4),
                "cosine": round(float(np.mean(np.sum(decoded * test, axis=1))), 4),
                "train_seconds": round(seconds, 1),
            }
            print(json.dumps(row))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
