"""Ablation of the PQVAE training choices on the CuPL protocol: zero-shot / mAP@100 / 10-recall@10.

Each variant is a JSON object of :class:`semdb.codecs.pqvae.PQVAEConfig` overrides, trained at each
``--bits``; the metrics are computed as :func:`semdb.evaluation.evaluate_codecs` computes them.

python benchmarks/pqvae_ablation.py --bits 64 --variants '{"similarity_weight": 0}' '{"steps": 3000}'
python benchmarks/pqvae_ablation.py --bits 32 64 128 --seed 1 --variants '{}' '{"anchors": 0}'
python benchmarks/pqvae_ablation.py --bits 32 64 128 --query-weighted --variants '{"encoder": "principal"}'

``--query-weighted`` trains each variant weighted by the 800 training classes' prompts
(:mod:`semdb.codecs.query_weighted`), never the held-out ones, as ``codecs_cupl.py`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from codecs_cupl import load_cupl, protocol, split

from semdb.codecs.pqvae import PQVAECodec
from semdb.codecs.query_weighted import QueryWeightedCodec
from semdb.evaluation import RECALL_K, RECALL_QUERIES, mean_average_precision, recall_at_k, zero_shot_accuracy
from semdb.index import flat_index


def main() -> None:
    """Train one PQVAE per bit rate and variant and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[64], help="bit rates (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    parser.add_argument("--variants", nargs="+", default=["{}"], help="JSON objects of PQVAEConfig overrides")
    parser.add_argument("--query-weighted", action="store_true", help="weight by the 800 training classes' prompts")
    args = parser.parse_args()
    names, sentences, labels, prompts = load_cupl()
    train, test, test_labels, queries, query_labels, _ = protocol(names, sentences, labels, prompts)
    recall_queries = test[:RECALL_QUERIES]
    exact = flat_index(test)
    assert exact is not None
    _, truth = exact.search(recall_queries, RECALL_K)
    for bits in args.bits:
        for variant in args.variants:
            start = time.perf_counter()
            overrides = json.loads(variant)
            if args.query_weighted:
                train_queries = prompts[split(labels, len(names))[0]]
                codec = QueryWeightedCodec.train(
                    train, bits, seed=args.seed, base_name="pqvae", queries=train_queries, **overrides
                )
            else:
                codec = PQVAECodec.train(train, bits, seed=args.seed, **overrides)
            seconds = time.perf_counter() - start
            codes = codec.encode(test)
            decoded = codec.decode(codes)
            index = codec.cosine_index(codes)
            zs = zero_shot_accuracy(decoded, test_labels, queries, query_labels)
            ap = mean_average_precision(index, test_labels, queries, query_labels)
            recall = recall_at_k(truth, index.search(recall_queries, RECALL_K)[1])
            cosine = float(np.mean(np.sum(decoded * test, axis=1)))
            print(
                f"{bits} bits seed {args.seed}{' weighted' * args.query_weighted} {variant}: "
                f"zero-shot {zs:.3f} mAP@100 {ap:.3f} "
                f"10-R@10 {recall:.3f} cosine {cosine:.3f} train {seconds:.0f}s"
            )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
