"""Ablation of the PQVAE training choices on the CuPL protocol (one bit rate, zero-shot / mAP / recall).

python benchmarks/pqvae_ablation.py --bits 64 --variants '{"similarity_weight": 0}' '{"steps": 3000}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from codecs_cupl import load_cupl, protocol

from semdb.codecs.pqvae import PQVAECodec
from semdb.evaluation import mean_average_precision, zero_shot_accuracy


def main() -> None:
    """Train one PQVAE per variant (JSON hyper-parameter overrides) and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    parser.add_argument("--variants", nargs="+", default=["{}"], help="JSON objects of PQVAEConfig overrides")
    args = parser.parse_args()
    names, sentences, labels, prompts = load_cupl()
    train, test, test_labels, queries, query_labels, _ = protocol(names, sentences, labels, prompts)
    for variant in args.variants:
        overrides = json.loads(variant)
        start = time.perf_counter()
        codec = PQVAECodec.train(train, args.bits, seed=args.seed, **overrides)
        seconds = time.perf_counter() - start
        codes = codec.encode(test)
        decoded = codec.decode(codes)
        zs = zero_shot_accuracy(decoded, test_labels, queries, query_labels)
        ap = mean_average_precision(codec.cosine_index(codes), test_labels, queries, query_labels)
        cosine = float(np.mean(np.sum(decoded * test, axis=1)))
        print(
            f"{args.bits} bits seed {args.seed} {variant}: zero-shot {zs:.3f} mAP@100 {ap:.3f} "
            f"cosine {cosine:.3f} train {seconds:.0f}s"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
