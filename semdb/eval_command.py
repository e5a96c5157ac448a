"""``semdb eval DIR --train DIR``: rate–accuracy of codecs on a labelled image folder.

``DIR`` holds one sub-folder per class; the folder name is the class text (``_`` read as a space)
and the class query is ``"a photo of a {name}."``. Codecs train on the images of ``--train`` (any
layout) and are measured on ``DIR`` by :func:`semdb.evaluation.evaluate_codecs`. Float embeddings
are computed once per model and file list and cached (``--cache-dir``). Files that cannot be
read are skipped with a one-line reason, as ingest does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from semdb.codecs import codec_class
from semdb.codecs.base import check_bits
from semdb.errors import DatasetMissingError, ImageReadError, InvalidArgumentError, SemdbError
from semdb.evaluation import Row, evaluate_codecs
from semdb.images import BadFile, FoundFile, find_images, load_image

DEFAULT_MODEL = "tiny-fashion"
DEFAULT_CODECS = "pq,opq,rq,pqvae"
DEFAULT_BITS = "8,16,32,64,128"
PROMPT = "a photo of a {}."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``semdb eval`` arguments to ``parser``."""
    parser.add_argument("dir", metavar="DIR", help="test images: one sub-folder per class, named by the class")
    parser.add_argument("--train", metavar="DIR", required=True, help="images the codecs are trained on")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec (default: {DEFAULT_MODEL})")
    parser.add_argument("--codec", default=DEFAULT_CODECS, help=f"comma-separated codecs (default: {DEFAULT_CODECS})")
    parser.add_argument("--bits", default=DEFAULT_BITS, help=f"comma-separated bit rates (default: {DEFAULT_BITS})")
    parser.add_argument("--seed", type=int, default=0, help="codec training seed (default: 0)")
    parser.add_argument(
        "--query-weighted",
        action="store_true",
        help="train the codecs query-weighted by the class prompts of --train (needs class sub-folders there)",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list on stdout")
    parser.add_argument("--plot", metavar="FILE.png", help="draw the rate–accuracy curves into this image")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where float embeddings are cached (default: $XDG_CACHE_HOME/semdb/eval or ~/.cache/semdb/eval)",
    )


def parse_bits(text: str) -> list[int]:
    """``"16,32"`` → ``[16, 32]``, each a valid bit rate."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidArgumentError(f"--bits must be comma-separated integers such as 16,32,64, got {text!r}") from None
    if not values:
        raise InvalidArgumentError("--bits needs at least one bit rate, e.g. --bits 32")
    return [check_bits(value) for value in values]


def parse_codecs(text: str) -> list[str]:
    """``"pq,opq"`` → ``["pq", "opq"]``, each a registered codec."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise InvalidArgumentError("--codec needs at least one codec, e.g. --codec pq")
    for name in names:
        codec_class(name)
    return names


def class_folders(folder: Path) -> list[tuple[str, Path]]:
    """``(class text, sub-folder)`` for each sub-folder of ``folder``, sorted by folder name."""
    if not folder.is_dir():
        raise DatasetMissingError(f"no such folder: {folder}")
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subfolders:
        raise InvalidArgumentError(f"{folder} has no class sub-folders; put each class's images in DIR/<class name>/")
    return [(sub.name.replace("_", " "), sub) for sub in subfolders]


def _image_files(root: Path, skipped: list[BadFile]) -> list[FoundFile]:
    files: list[FoundFile] = []
    for found in find_images([root]):
        if isinstance(found, BadFile):
            skipped.append(found)
        else:
            files.append(found)
    return files


def _cache_dir(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "semdb" / "eval"


def embed_files(
    files: list[FoundFile], model: str, cache_dir: Path, skipped: list[BadFile], console: Console
) -> tuple[np.ndarray, np.ndarray]:
    """Embed ``files`` with ``model`` → ``(embeddings (m, d) float32, kept (m,) int64 indices)``.

    Cached in ``cache_dir`` under a hash of the model spec and each file's path, size and mtime, so
    a changed file or model recomputes; unreadable files are skipped and added to ``skipped``.
    """
    key = hashlib.sha256(model.encode())
    for f in files:
        key.update(f"\0{f.path}\0{f.size}\0{f.mtime_ns}".encode())
    cache = cache_dir / f"{key.hexdigest()[:32]}.npz"
    if cache.exists():
        data = np.load(cache)
        for i in np.setdiff1d(np.arange(len(files)), data["kept"]):
            skipped.append(BadFile(files[i].path, "unreadable (cached)"))
        return data["embeddings"], data["kept"]

    encoder = _load_encoder(model)
    chunks: list[np.ndarray] = []
    kept: list[int] = []
    batch: list[Any] = []
    with console.status(f"embedding {len(files)} images with {model}") as status:
        for i, f in enumerate(files):
            try:
                batch.append(load_image(f.path))
                kept.append(i)
            except ImageReadError as error:
                skipped.append(BadFile(f.path, str(error)))
            if len(batch) == 256 or (i == len(files) - 1 and batch):
                chunks.append(encoder.encode_images(batch))
                batch = []
                status.update(f"embedding images with {model}: {i + 1}/{len(files)}")
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    kept_array = np.asarray(kept, dtype=np.int64)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, embeddings=embeddings, kept=kept_array)
    tmp.replace(cache)
    return embeddings, kept_array


def _class_queries(encoder: Any, classes: list[tuple[str, Path]]) -> np.ndarray:
    """The class prompts of ``classes`` (from :func:`class_folders`) embedded → ``(c, d)`` float32."""
    queries: np.ndarray = encoder.encode_texts([PROMPT.format(name) for name, _ in classes])
    return queries


_encoders: dict[str, Any] = {}


def _load_encoder(model: str) -> Any:
    """One encoder per model spec for the whole run (train and test share it)."""
    if model not in _encoders:
        from semdb.encoder import load_encoder

        _encoders[model] = load_encoder(model)
    return _encoders[model]


def render_table(rows: Sequence[Row], title: str = "rate–accuracy") -> Table:
    """A rich table of evaluation rows (see :func:`semdb.evaluation.evaluate_codecs`)."""
    table = Table(title=title)
    for column in ("codec", "bits", "bpp@224²", "zero-shot", "zs/float", "mAP@100", "mAP/float", "10-R@10", "train s"):
        table.add_column(column, justify="left" if column == "codec" else "right")
    for row in rows:
        table.add_row(
            row["codec"],
            str(row["bits_per_image"]),
            f"{row['bpp_224']:.2e}",
            f"{row['zero_shot']:.3f}",
            _percent(row["zero_shot_ratio"]),
            f"{row['map100']:.3f}",
            _percent(row["map100_ratio"]),
            f"{row['recall10']:.3f}",
            f"{row['train_seconds']:.1f}",
        )
    return table


def _percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{100 * ratio:.1f}%"


def plot_rows(rows: Sequence[Row], path: Path) -> None:
    """Draw zero-shot and mAP@100 against bits per image, one line per codec, float as a dashed line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SemdbError("--plot needs matplotlib: pip install 'semdb[eval]'") from None
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric, label in zip(
        axes, ("zero_shot", "map100"), ("zero-shot top-1", "text→image mAP@100"), strict=True
    ):
        for codec in dict.fromkeys(row["codec"] for row in rows if row["codec"] != "float"):
            points = sorted((row["bits"], row[metric]) for row in rows if row["codec"] == codec)
            axis.plot(*zip(*points, strict=True), marker="o", label=codec)
        for row in rows:
            if row["codec"] == "float":
                axis.axhline(row[metric], linestyle="--", color="grey", label="float")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("bits per image")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    try:
        figure.savefig(path)
    except OSError as error:
        raise InvalidArgumentError(f"cannot write the plot to {path}: {error.strerror}") from None
    finally:
        plt.close(figure)


def run(args: argparse.Namespace) -> int:
    """Run ``semdb eval``; returns the exit code. User mistakes raise :class:`SemdbError`."""
    codecs = parse_codecs(args.codec)
    bits = parse_bits(args.bits)
    console = Console(stderr=True)
    cache_dir = _cache_dir(args.cache_dir)
    skipped: list[BadFile] = []

    classes = class_folders(Path(args.dir))
    test_files: list[FoundFile] = []
    file_labels: list[int] = []
    for label, (_, folder) in enumerate(classes):
        found = _image_files(folder, skipped)
        test_files += found
        file_labels += [label] * len(found)
    train_root = Path(args.train)
    if not train_root.is_dir():
        raise DatasetMissingError(f"no such --train folder: {train_root}")
    train_files = _image_files(train_root, skipped)
    if not test_files:
        raise InvalidArgumentError(f"no images found under {args.dir}")
    if not train_files:
        raise InvalidArgumentError(f"no images found under --train {train_root}")

    test, kept = embed_files(test_files, args.model, cache_dir, skipped, console)
    train, _ = embed_files(train_files, args.model, cache_dir, skipped, console)
    if not len(test) or not len(train):
        raise InvalidArgumentError("no readable images in DIR or --train")
    for bad in skipped:
        console.print(f"[yellow]skipped[/] {bad.path}: {bad.reason}", soft_wrap=True)
    encoder = _load_encoder(args.model)
    queries = _class_queries(encoder, classes)
    train_queries = None
    if args.query_weighted:
        # The training set's own classes, never DIR's: the codec must not see the test queries.
        train_classes = class_folders(train_root)
        if len(train_classes) < 2:
            raise InvalidArgumentError("--query-weighted needs at least 2 class sub-folders in --train")
        train_queries = _class_queries(encoder, train_classes)

    rows = evaluate_codecs(
        train,
        test,
        np.asarray(file_labels, dtype=np.int64)[kept],
        queries,
        np.arange(len(classes)),
        codecs,
        bits,
        seed=args.seed,
        train_queries=train_queries,
        on_row=lambda row: console.print(
            f"  {row['codec']} {row['bits_per_image']} bits: zero-shot {row['zero_shot']:.3f}"
        ),
    )
    console.print(
        render_table(rows, f"{args.model}: {len(test)} test images, {len(classes)} classes, {len(train)} train")
    )
    if args.plot:
        plot_rows(rows, Path(args.plot))
        console.print(f"plot written to {args.plot}")
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
    return 0
