"""``semdb demo``: the whole job offline — Fashion-MNIST test images in, text queries out.

Writes a class-balanced sample of the Fashion-MNIST *test* split (never trained on) as PNG files
named ``DIR/<class-slug>/<index>.png``, ingests them with the bundled ``tiny-fashion`` model into a
database with semdb's default codec (for this model's low-dimensional embeddings: 64-bit PQ codes,
chosen and measured at ingest; see ``semdb stats``), and runs example queries — some in wordings the model never saw in
training — showing each query's top hits, their true labels and its precision@10. A rerun only
writes missing files, and ingest skips the unchanged ones, so it is quick.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from rich.console import Console
from rich.table import Table

from semdb import fashion_mnist
from semdb.database import SearchResult, connect
from semdb.encoder import BUNDLED_MODEL
from semdb.errors import InvalidArgumentError

DEFAULT_DB = Path("semdb-demo") / "demo.semdb"
DEFAULT_DIR = Path("semdb-demo") / "images"
DEFAULT_COUNT = 2000
TOP_K = 10

# (query, Fashion-MNIST label, held out of training?). Held-out wordings (new synonyms and
# phrasings) test how far the frozen MiniLM text tower carries the model beyond its captions.
DEMO_QUERIES: tuple[tuple[str, int, bool], ...] = (
    ("a photo of a sneaker", 7, False),
    ("a pair of trousers", 1, False),
    ("a handbag", 8, False),
    ("an ankle boot", 9, False),
    ("a pair of denim jeans", 1, True),
    ("a knitted sweater", 2, True),
    ("a plain white tee", 0, True),
    ("a leather purse", 8, True),
    ("a suede bootie", 9, True),
)


@dataclass(frozen=True)
class QueryResult:
    """One demo query: what was asked, which class it means, and what came back."""

    query: str
    expected: str
    held_out: bool
    precision_at_10: float
    hits: list[dict[str, Any]]


def label_from_path(path: str | Path) -> int | None:
    """The Fashion-MNIST label of a demo image, from its class folder; ``None`` for other files."""
    slug = Path(path).parent.name
    return fashion_mnist.CLASS_SLUGS.index(slug) if slug in fashion_mnist.CLASS_SLUGS else None


def write_images(folder: Path, count: int) -> int:
    """Write ``count`` class-balanced test-split images under ``folder``; returns how many were new.

    Pixels are written as they are (white item on black), which is what the bundled model expects.
    """
    images, labels = fashion_mnist.load("test")
    written = 0
    for index in fashion_mnist.balanced_indices(labels, count):
        path = folder / fashion_mnist.CLASS_SLUGS[labels[index]] / f"{index:05d}.png"
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index], mode="L").save(path)
        written += 1
    return written


def _query_result(query: str, label: int, held_out: bool, hits: list[SearchResult]) -> QueryResult:
    labels = [label_from_path(hit.path) for hit in hits]
    correct = sum(1 for hit_label in labels[:TOP_K] if hit_label == label)
    return QueryResult(
        query=query,
        expected=fashion_mnist.CLASS_NAMES[label],
        held_out=held_out,
        precision_at_10=correct / TOP_K,
        hits=[
            {
                "path": hit.path,
                "score": round(hit.score, 4),
                "label": None if hit_label is None else fashion_mnist.CLASS_NAMES[hit_label],
            }
            for hit, hit_label in zip(hits, labels, strict=True)
        ],
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``semdb demo`` options."""
    parser.add_argument("--db", type=Path, default=DEFAULT_DB, metavar="FILE", help=f"database (default: {DEFAULT_DB})")
    parser.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, metavar="FOLDER", help=f"where the PNGs go (default: {DEFAULT_DIR})"
    )
    parser.add_argument(
        "--count", type=int, default=DEFAULT_COUNT, metavar="N", help=f"test images to use (default: {DEFAULT_COUNT})"
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def _print_table(results: list[QueryResult], folder: Path, console: Console, bits: int | None) -> None:
    table = Table(
        "query",
        "expected",
        "P@10",
        "labels of the top 10",
        "best hit",
        title_justify="left",
        title=f"text queries over {bits}-bit codes (* = wording held out of training)",
    )
    for result in results:
        counts = Counter(hit["label"] or "?" for hit in result.hits)
        summary = ", ".join(f"{name} ×{number}" for name, number in counts.most_common())
        marker = "*" if result.held_out else ""
        best = Path(result.hits[0]["path"]) if result.hits else Path()
        # Relative to the demo folder, so the column stays narrow enough for a terminal.
        shown = best.relative_to(folder.resolve()) if best.is_relative_to(folder.resolve()) else best
        table.add_row(f"{result.query}{marker}", result.expected, f"{result.precision_at_10:.1f}", summary, str(shown))
    console.print(table)


def run(args: argparse.Namespace) -> int:
    """Write the images, ingest them, run the queries, print the results; returns the exit code."""
    if args.count < TOP_K:
        raise InvalidArgumentError(f"--count must be at least {TOP_K}, got {args.count}")
    console = Console(stderr=args.json, soft_wrap=True)
    written = write_images(args.dir, args.count)
    args.db.parent.mkdir(parents=True, exist_ok=True)
    with connect(str(args.db), model=BUNDLED_MODEL) as db:
        report = db.ingest([args.dir], progress=not args.json)
        results = [
            _query_result(query, label, held_out, db.search(query, k=TOP_K)) for query, label, held_out in DEMO_QUERIES
        ]
        stats = db.stats()
    mean_precision = sum(result.precision_at_10 for result in results) / len(results)
    if args.json:
        payload = {
            "images_dir": str(args.dir),
            "images_written": written,
            "ingest": report.to_dict(),
            "database": stats.to_dict(),
            "queries": [asdict(result) for result in results],
            "mean_precision_at_10": mean_precision,
        }
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return 0
    console.print(
        f"{written} new demo images in {args.dir}; ingest added {report.added}, unchanged {report.unchanged}, "
        f"skipped {len(report.skipped)} in {report.seconds:.1f}s",
        highlight=False,
    )
    _print_table(results, args.dir, console, stats.bits_per_image)
    console.print(
        f"mean precision@10: {mean_precision:.2f} — {stats.images} images at {stats.bits_per_image} bits each "
        f'in {stats.path}; try: semdb search "a sneaker" --db {args.db}',
        highlight=False,
    )
    return 0
