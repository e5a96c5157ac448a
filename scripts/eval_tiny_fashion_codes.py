"""Measure ``tiny-fashion`` through semdb itself: the 10k test images ingested as 128-bit PQ codes.

The same queries as ``train_tiny_fashion.py`` reports on float embeddings, here answered by
``Database.search`` over the stored codes, so the table shows what compression costs::

    nice -n 5 python3 scripts/eval_tiny_fashion_codes.py --workdir /tmp/tiny-fashion-codes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from train_tiny_fashion import CLASS_PROMPTS, HELD_OUT_QUERIES

import semdb
from semdb.demo import label_from_path, write_images

TEST_SIZE = 10_000


def main(argv: Sequence[str] | None = None) -> int:
    """Ingest the test split (once), run the queries over the codes, print and save the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="where the PNGs and the database go")
    parser.add_argument("--bits", type=int, default=128)
    parser.add_argument("--figures", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    started = time.time()
    write_images(args.workdir / "images", TEST_SIZE)
    database = args.workdir / f"test-{args.bits}.semdb"
    with semdb.connect(str(database), model="tiny-fashion", bits=args.bits, codec="pq") as db:
        db.ingest([args.workdir / "images"], progress=True)

        def precision(query: str, label: int) -> float:
            hits = db.search(query, k=10)
            return float(np.mean([label_from_path(hit.path) == label for hit in hits]))

        # Zero-shot through the index: each image goes to the class prompt that scores it highest.
        scores = np.full((len(CLASS_PROMPTS), TEST_SIZE), -np.inf)
        labels = np.zeros(TEST_SIZE, dtype=np.int64)
        for label, prompt in enumerate(CLASS_PROMPTS):
            for hit in db.search(prompt, k=TEST_SIZE):
                index = int(Path(hit.path).stem)
                scores[label, index] = hit.score
                labels[index] = label_from_path(hit.path) or 0
        figures = {
            "bits_per_image": args.bits,
            "zero_shot_top1": float(np.mean(scores.argmax(axis=0) == labels)),
            "class_queries": {prompt: precision(prompt, label) for label, prompt in enumerate(CLASS_PROMPTS)},
            "held_out_queries": {query: precision(query, label) for query, label in HELD_OUT_QUERIES},
            "seconds": round(time.time() - started),
        }
    figures["mean_class_precision_at_10"] = float(np.mean(list(figures["class_queries"].values())))
    figures["mean_held_out_precision_at_10"] = float(np.mean(list(figures["held_out_queries"].values())))
    print(json.dumps(figures, indent=2))
    if args.figures:
        args.figures.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
