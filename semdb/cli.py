"""The ``semdb`` command: a thin shell over the Python API (parse, call, print).

Human-readable output goes to stdout as rich tables, progress bars to stderr, and ``--json`` prints
machine-readable JSON on stdout. A :class:`~semdb.errors.SemdbError` becomes one line on stderr and
exit code 1; argparse usage errors exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from semdb.codecs import list_codecs
from semdb.codecs.choice import DEFAULT_BITS, DEFAULT_FIDELITY
from semdb.database import DB_ENV_VAR, DEFAULT_DB_FILENAME, SearchResult, connect, default_database_path
from semdb.encoder import BUNDLED_MODEL, DEFAULT_MODEL
from semdb.errors import SemdbError
from semdb.fidelity import report_lines
from semdb.images import DEFAULT_MAX_PIXELS

EXIT_ERROR = 1
stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)


def _print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")


def _add_db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        default=None,
        metavar="FILE",
        help=f"database file (default: ${DB_ENV_VAR}, else ./{DEFAULT_DB_FILENAME})",
    )


def _add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 1, got {value}")
    return value


# --- ingest -------------------------------------------------------------------------------------


def _tell_waiting(message: str) -> None:
    stderr.print(message, highlight=False, markup=False)


def _bits(text: str) -> int | str:
    """``--bits``: a whole number ≥ 1, or ``auto``."""
    return "auto" if text == "auto" else _positive_int(text)


def _cmd_ingest(args: argparse.Namespace) -> int:
    if args.fidelity is not None and args.bits != "auto":
        raise SemdbError("--fidelity F chooses the rate: give it with --bits auto")
    auto = args.bits == "auto"
    db = connect(
        args.db or default_database_path(),
        model=args.model,
        codec=args.codec,
        bits=None if auto else args.bits,
        device=args.device,
        on_wait=_tell_waiting,
    )
    with db:
        report = db.ingest(
            args.paths,
            prune=args.prune,
            progress=not args.json and not args.quiet,
            batch_size=args.batch_size,
            max_pixels=args.max_pixels,
            codec_file=args.codec_file,
            fidelity=(args.fidelity or DEFAULT_FIDELITY) if auto else None,
        )
        stats = db.stats()
    if args.json:
        _print_json({**report.to_dict(), "database": stats.to_dict()})
        return 0
    summary = (
        f"added {report.added}, unchanged {report.unchanged}, duplicates {report.duplicates}, "
        f"updated {report.updated}, pruned {report.pruned}, skipped {len(report.skipped)} "
        f"in {report.seconds:.1f}s"
    )
    stdout.print(summary, highlight=False)
    if report.codec_trained_on is not None:
        stdout.print(
            f"trained {stats.codec} codec at {stats.bits_per_image} bits/image on {report.codec_trained_on} embeddings",
            highlight=False,
        )
        for line in report_lines(stats.codec_report):
            stdout.print(line, highlight=False)
    if report.skipped:
        table = Table("skipped file", "reason", title=f"{len(report.skipped)} files skipped", title_justify="left")
        for path, reason in report.skipped:
            table.add_row(path, reason)
        stdout.print(table)
    stdout.print(f"{stats.path}: {stats.images} images searchable at {stats.bits_per_image} bits each", highlight=False)
    return 0


def _add_ingest(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "ingest",
        help="add image files and folders to a database",
        description="Embed images with the database's model, compress them to codes and store them. "
        "Folders are walked recursively; unchanged files are skipped; bad files are skipped and reported.",
        epilog="example:\n  semdb ingest ~/Pictures --db photos.semdb --model tiny-fashion --bits 64",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    _add_db_option(parser)
    parser.add_argument(
        "--model",
        default=None,
        metavar="SPEC",
        help=f"ARCH:TAG, ARCH:/path/checkpoint or {BUNDLED_MODEL} (default for a new database: {DEFAULT_MODEL}; "
        "an existing database keeps its own)",
    )
    parser.add_argument(
        "--codec",
        default=None,
        choices=list_codecs(),
        help="codec for a new database (default: chosen from the staged embeddings — pqvae-pca query-weighted "
        "by a generic query sample, pq for tiny or low-dimensional collections; see `semdb stats`)",
    )
    parser.add_argument(
        "--bits",
        type=_bits,
        default=None,
        metavar="N|auto",
        help=f"bits per image, a multiple of 8, for a new database (default: {DEFAULT_BITS}); auto: the smallest "
        "rate whose fidelity on the staged images reaches --fidelity",
    )
    parser.add_argument(
        "--fidelity",
        type=float,
        default=None,
        metavar="F",
        help=f"with --bits auto: the share of the text→image top-10 the codes must keep (default {DEFAULT_FIDELITY})",
    )
    parser.add_argument(
        "--codec-file",
        default=None,
        metavar="FILE",
        help="code a new database with this codec file (`semdb codec export`) from its first batch, no training",
    )
    parser.add_argument("--prune", action="store_true", help="forget files under PATH that are gone from disk")
    parser.add_argument("--batch-size", type=_positive_int, default=64, metavar="N", help="images per batch")
    parser.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="skip images with more pixels than this (decompression-bomb guard)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_json_option(parser)
    parser.set_defaults(handler=_cmd_ingest)


# --- search -------------------------------------------------------------------------------------


def _print_results(results: list[SearchResult], as_json: bool, title: str) -> None:
    if as_json:
        _print_json([result.to_dict() for result in results])
        return
    table = Table("#", "score", "path", title=title, title_justify="left")
    for rank, result in enumerate(results, start=1):
        table.add_row(str(rank), f"{result.score:.3f}", result.path)
    stdout.print(table)


def _cmd_search(args: argparse.Namespace) -> int:
    if (args.text is None) == (args.image is None):
        raise SemdbError("give either search TEXT or --image PATH (not both)")
    with connect(args.db or default_database_path(), model=args.model, create=False, device=args.device) as db:
        if args.image is not None:
            results = db.search_image(args.image, k=args.k)
            title = f"images like {args.image}"
        else:
            results = db.search(args.text, k=args.k)
            title = f"“{args.text}”"
    _print_results(results, args.json, title)
    return 0


def _add_search(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "search",
        help="find images by text, or by a query image",
        description="Search a database by text (CLIP text encoder) or by an example image, over the stored codes.",
        epilog='examples:\n  semdb search "a dog on a beach" -k 5 --db photos.semdb\n'
        "  semdb search --image query.jpg --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("text", nargs="?", default=None, metavar="TEXT", help="what to look for")
    parser.add_argument("--image", default=None, metavar="PATH", help="search by this image instead of text")
    parser.add_argument("-k", type=_positive_int, default=10, metavar="N", help="number of results (default 10)")
    _add_db_option(parser)
    parser.add_argument(
        "--model", default=None, metavar="SPEC", help="must match the database's model (checked, not needed)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available)")
    _add_json_option(parser)
    parser.set_defaults(handler=_cmd_search)


# --- stats --------------------------------------------------------------------------------------


def _cmd_stats(args: argparse.Namespace) -> int:
    with connect(args.db or default_database_path(), create=False) as db:
        stats = db.stats()
        skipped = db.skipped() if args.skipped else []
    if args.json:
        payload = stats.to_dict()
        if args.skipped:
            payload["skipped_files"] = [{"path": path, "reason": reason} for path, reason in skipped]
        _print_json(payload)
        return 0
    table = Table("", "", show_header=False, title=stats.path, title_justify="left")
    for key, value in stats.to_dict().items():
        if key not in ("path", "codec_report"):
            table.add_row(key.replace("_", " "), "—" if value is None else str(value))
    stdout.print(table)
    for line in report_lines(stats.codec_report):
        stdout.print(line, highlight=False)
    if args.skipped:
        skipped_table = Table("skipped file", "reason")
        for path, reason in skipped:
            skipped_table.add_row(path, reason)
        stdout.print(skipped_table)
    return 0


def _add_stats(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "stats",
        help="what a database holds",
        description="Counts of searchable and skipped images, bits per image, model and codec.",
        epilog="example:\n  semdb stats --db photos.semdb --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_db_option(parser)
    parser.add_argument("--skipped", action="store_true", help="also list the skipped files and why")
    _add_json_option(parser)
    parser.set_defaults(handler=_cmd_stats)


# --- migrate ------------------------------------------------------------------------------------


def _cmd_migrate(args: argparse.Namespace) -> int:
    with connect(args.db or default_database_path(), create=False) as db:
        db.migrate()
    if args.json:
        _print_json({"database": db.location, "up_to_date": True})
    else:
        stdout.print(f"{db.location}: schema up to date", highlight=False)
    return 0


def _add_migrate(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "migrate",
        help="upgrade a database made by an older semdb",
        description="Apply the schema migrations this semdb has and the database lacks (ingest does it too). "
        "Other commands never write to a database, so they refuse one whose schema is behind.",
        epilog="example:\n  semdb migrate --db photos.semdb",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_db_option(parser)
    _add_json_option(parser)
    parser.set_defaults(handler=_cmd_migrate)


# --- commands that live in their own modules ----------------------------------------------------

_MODULE_COMMANDS: dict[str, tuple[str, str, str]] = {
    # name: (module, one-line help, example)
    "demo": (
        "semdb.demo",
        "offline demo: ingest Fashion-MNIST images with the bundled model and query them",
        "semdb demo --dir semdb-demo/images --db semdb-demo/demo.semdb",
    ),
    "codec": (
        "semdb.codec_command",
        "write a database's codec to a file, to ship it or code another database with it",
        "semdb codec export photos.codec --db photos.semdb",
    ),
    "eval": (
        "semdb.eval_command",
        "rate–accuracy evaluation of codecs on a labelled image folder",
        "semdb eval data/test --train data/train --codec pq,opq,pqvae --bits 16,32,64",
    ),
}


def _add_module_command(subparsers: Any, name: str) -> None:
    module_name, help_text, example = _MODULE_COMMANDS[name]
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description=help_text[0].upper() + help_text[1:] + ".",
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise

        def unavailable(_args: argparse.Namespace) -> int:
            raise SemdbError(f"`semdb {name}` is not available in this build")

        parser.set_defaults(handler=unavailable)
        return
    module.add_arguments(parser)
    parser.set_defaults(handler=module.run)


def build_parser() -> argparse.ArgumentParser:
    """The ``semdb`` argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="semdb",
        description="A semantic retrieval database for images: CLIP embeddings compressed to a few bytes, "
        "stored in SQLite, searched by text.",
        epilog="example:\n  semdb demo                     # offline, bundled model and data\n"
        '  semdb ingest ~/Pictures --db photos.semdb\n  semdb search "a dog on a beach" --db photos.semdb',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_ingest(subparsers)
    _add_search(subparsers)
    _add_stats(subparsers)
    _add_migrate(subparsers)
    for name in _MODULE_COMMANDS:
        _add_module_command(subparsers, name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``semdb`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except SemdbError as error:
        stderr.print(f"semdb {args.command}: error: {error}", highlight=False, markup=False)
        return EXIT_ERROR
    except KeyboardInterrupt:
        stderr.print("interrupted; committed batches are kept and the next run resumes", highlight=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())
