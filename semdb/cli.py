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
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from semdb import __version__
from semdb.codecs import list_codecs
from semdb.codecs.choice import DEFAULT_BITS, DEFAULT_FIDELITY
from semdb.database import (
    DB_ENV_VAR,
    DEFAULT_DB_FILENAME,
    Database,
    SearchResult,
    connect,
    default_database_path,
)
from semdb.encoder import BUNDLED_MODEL, DEFAULT_MODEL
from semdb.errors import SemdbError
from semdb.fidelity import report_lines
from semdb.images import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from semdb.query import Query

EXIT_ERROR = 1
stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)


def _print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")


def _add_db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        default=None,
        metavar="FILE|URL",
        help=f"database file, or a PostgreSQL URL postgresql+psycopg://USER:PASSWORD@HOST/DB "
        f"(default: ${DB_ENV_VAR}, else ./{DEFAULT_DB_FILENAME})",
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
            ray=False if args.ray is None else (args.ray or True),
            actors=args.actors,
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
        for line in report_lines(stats.codec_report, stats.images):
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
        epilog="examples:\n  semdb ingest ~/Pictures --db photos.semdb --model tiny-fashion --bits 64\n"
        "  semdb ingest /data/images --db postgresql+psycopg://semdb:secret@db-host/photos --ray auto",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    _add_db_option(parser)
    parser.add_argument(
        "--model",
        default=None,
        metavar="SPEC",
        help=f"ARCH:TAG, ARCH:/path/checkpoint or {BUNDLED_MODEL} (default for a new database: {DEFAULT_MODEL}, "
        "or with --codec-file the model the file was made for; an existing database keeps its own)",
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
    parser.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on a Ray cluster: ADDRESS, else $RAY_ADDRESS, else a new local one (see 'Beyond one machine')",
    )
    parser.add_argument(
        "--actors",
        type=_positive_int,
        default=None,
        metavar="N",
        help="encoder actors with --ray (default: one per GPU)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_json_option(parser)
    parser.set_defaults(handler=_cmd_ingest)


# --- search -------------------------------------------------------------------------------------


def _print_results(results: list[SearchResult], output_format: str, title: str) -> None:
    """``paths``: one path per line (for pipes: ``xargs``, ``feh``...); ``table``: rank, score and
    the whole path, folded rather than cut when the terminal is narrow; ``json``: a list of hits."""
    if output_format == "json":
        _print_json([result.to_dict() for result in results])
    elif output_format == "paths":
        sys.stdout.write("".join(result.path + "\n" for result in results))
    else:
        table = Table("#", "score", title=title, title_justify="left")
        table.add_column("path", overflow="fold")
        for rank, result in enumerate(results, start=1):
            table.add_row(str(rank), f"{result.score:.3f}", result.path)
        stdout.print(table)


def _build_query(db: Database, args: argparse.Namespace) -> Query:
    """The command line's terms, filters and paging as one :class:`~semdb.query.Query`."""
    query = db.query(args.text) if args.text is not None else db.query()
    if args.image is not None:
        query = query.image(args.image)
    for image_id in args.like:
        query = query.like(image_id)
    if not query.terms:
        raise SemdbError("give search TEXT, --image PATH or --like ID (`semdb search --help` shows the query language)")
    query = query.limit(args.k).offset(args.offset).under(*args.under).exact(args.exact)
    if args.after is not None or args.before is not None:
        query = query.modified(args.after, args.before)
    if args.min_width is not None or args.min_height is not None:
        query = query.min_size(args.min_width, args.min_height)
    if args.min_score is not None:
        query = query.min_score(args.min_score)
    return query


def _cmd_search(args: argparse.Namespace) -> int:
    output_format = "json" if args.json else args.format or ("table" if stdout.is_terminal else "paths")
    with connect(args.db or default_database_path(), model=args.model, create=False, device=args.device) as db:
        query = _build_query(db, args)
        kinds = {term.kind for term in query.terms}
        # Load the model before searching, under a spinner (on a terminal): it is most of a cold search.
        with stderr.status(f"loading {db.model_spec}…"):
            if "image" in kinds:
                _ = db.encoder
            elif "text" in kinds:
                _ = db.text_encoder
        results = query.results()
    _print_results(results, output_format, query.describe())
    return 0


QUERY_LANGUAGE = """query language:
  red dress + 0.5:beach - night   terms joined by " + " or " - " (spaces around the sign)
  2:sneaker                       a weight before a colon ("-" or a negative weight: "not")
  id:42                           the database's image 42, by its stored code (--like 42)
  ./photo.jpg + snow              an image file, by its path (--image PATH)
"""


def _add_search(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "search",
        help="find images by text, by a query image, or both, with filters",
        description="Search a database by text (CLIP text encoder), by example images, or a weighted mix, "
        "over the stored codes; filters restrict the scan to the images that pass them. "
        "Prints one path per line when stdout is not a terminal, a table when it is.",
        epilog=QUERY_LANGUAGE + '\nexamples:\n  semdb search "a dog on a beach" -k 5 --db photos.semdb\n'
        '  semdb search "a handbag - leather" --under ~/Pictures/2023 --after 2023-06-01 --format table\n'
        "  semdb search --image query.jpg --json\n"
        '  semdb search "sneaker" --format paths | xargs feh',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("text", nargs="?", default=None, metavar="QUERY", help="what to look for (see below)")
    parser.add_argument("--image", default=None, metavar="PATH", help="search by this image (with QUERY: both)")
    parser.add_argument(
        "--like", type=int, action="append", default=[], metavar="ID", help="search by a stored image (repeatable)"
    )
    parser.add_argument("-k", "--limit", dest="k", type=_positive_int, default=10, metavar="N", help="results (10)")
    parser.add_argument("--offset", type=int, default=0, metavar="N", help="skip the N best (the next page)")
    parser.add_argument(
        "--under", action="append", default=[], metavar="DIR", help="only images in this folder (repeatable: any)"
    )
    parser.add_argument("--after", default=None, metavar="DATE", help="only files modified on or after DATE")
    parser.add_argument("--before", default=None, metavar="DATE", help="only files modified before DATE (or on it)")
    parser.add_argument("--min-width", type=_positive_int, default=None, metavar="PX", help="only images this wide")
    parser.add_argument("--min-height", type=_positive_int, default=None, metavar="PX", help="only images this high")
    parser.add_argument("--min-score", type=float, default=None, metavar="S", help="only hits scoring at least S")
    parser.add_argument(
        "--exact",
        action="store_true",
        help="scan every code exactly (proven exact cosine; slower on large collections than the default fast scan)",
    )
    _add_db_option(parser)
    parser.add_argument(
        "--model", default=None, metavar="SPEC", help="must match the database's model (checked, not needed)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available)")
    parser.add_argument(
        "--format",
        choices=("paths", "table", "json"),
        default=None,
        help="paths: one per line; table; json (default: table on a terminal, else paths)",
    )
    parser.add_argument("--json", action="store_true", help="same as --format json")
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
    for line in report_lines(stats.codec_report, stats.images):
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
    from semdb.store import Store

    # The store itself, not a Database: a Database refuses to open an older schema, which is what
    # this command is for. Opening for writing applies the pending revisions; a missing file is an error.
    store = Store.open(args.db or default_database_path(), write=True)
    store.close()
    if args.json:
        _print_json({"database": store.location, "up_to_date": True})
    else:
        stdout.print(f"{store.location}: schema up to date", highlight=False)
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


# --- models -------------------------------------------------------------------------------------


def _cmd_models(args: argparse.Namespace) -> int:
    from semdb.encoder import list_models

    models = list_models()
    if args.json:
        _print_json([model.to_dict() for model in models])
        return 0
    table = Table("model spec", "where", title="models for --model", title_justify="left")
    table.columns[0].overflow = "fold"
    for model in models:
        table.add_row(model.spec, model.where)
    stdout.print(table)
    stdout.print(
        f"or ARCH:/path/to/checkpoint.safetensors for local weights; default: {DEFAULT_MODEL}", highlight=False
    )
    return 0


def _add_models(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the models --model accepts",
        description="The bundled offline model and every open_clip ARCH:TAG, with whether its weights "
        "are already on this machine (else they are downloaded on first use).",
        epilog="example:\n  semdb models --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_json_option(parser)
    parser.set_defaults(handler=_cmd_models)


# --- commands that live in their own modules ----------------------------------------------------

_MODULE_COMMANDS: dict[str, tuple[str, str, str]] = {
    # name: (module, one-line help, example)
    "demo": (
        "semdb.demo",
        "offline demo: ingest Fashion-MNIST images with the bundled model and query them",
        "semdb demo --dir semdb-demo/images --db semdb-demo/demo.semdb",
    ),
    "serve": (
        "semdb.server.command",
        "a search page and JSON API on localhost, with the model kept loaded",
        "semdb serve --db photos.semdb --port 8765",
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
    parser.add_argument("--version", action="version", version=f"semdb {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_ingest(subparsers)
    _add_search(subparsers)
    _add_stats(subparsers)
    _add_migrate(subparsers)
    _add_models(subparsers)
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
