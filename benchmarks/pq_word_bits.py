"""Benchmark: ``pq`` with 8-bit words (its default layout) against the same bits as 4-bit words (issue 10).

FAISS's fast-scan kernels take 4-bit words only, so a ``pq`` database can use the fast scan only if
its codes are 4-bit words. This measures what that layout costs in fidelity on the codec benchmark
(CuPL, ``codecs_cupl.py``'s protocol and cached embeddings: zero-shot, mAP@100 by exact cosine,
10-recall@10 against float) at the same bits per image. The default codec is not changed here.

    python benchmarks/pq_word_bits.py --bits 64,128
    python benchmarks/pq_word_bits.py --bits 32,64,128 --data fashion
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import faiss
import numpy as np
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codecs_cupl import Protocol, load_cupl, protocol

from semdb.codecs import Codec, train_codec
from semdb.codecs.faiss_codecs import PQCodec, train_pq
from semdb.eval_command import parse_bits, render_table
from semdb.evaluation import evaluate_codecs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", default="64,128")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", choices=("cupl", "fashion"), default="cupl", help="fashion: the bundled model")
    args = parser.parse_args()
    if args.data == "fashion":
        from codecs_fashion import load_fashion

        fashion = load_fashion()
        data = Protocol(
            train=fashion["train"],
            test=fashion["test"],
            test_labels=fashion["test_labels"],
            queries=fashion["prompts"],
            query_labels=np.arange(len(fashion["prompts"])),
            n_train_classes=len(fashion["prompts"]),
        )
    else:
        data = protocol(*load_cupl())

    def trained(name: str, bits: int) -> Codec:
        if name == "pq":
            return train_codec("pq", data.train, bits, seed=args.seed)
        index = faiss.IndexPQ(data.train.shape[1], bits // 4, 4, faiss.METRIC_INNER_PRODUCT)
        train_pq(index.pq, data.train, args.seed)
        index.is_trained = True
        return PQCodec(index)

    rows = evaluate_codecs(
        data.train, data.test, data.test_labels, data.queries, data.query_labels,
        ["pq", "pq-4bit"], parse_bits(args.bits), seed=args.seed, trained=trained,
    )  # fmt: skip
    title = "Fashion-MNIST, bundled model" if args.data == "fashion" else "CuPL held-out classes"
    Console(width=160).print(render_table(rows, f"{title}: pq at 8-bit vs 4-bit words"))


if __name__ == "__main__":
    main()
