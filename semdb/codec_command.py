"""``semdb codec export FILE --db DB``: write a database's codec to a codec file (:mod:`semdb.codec_file`).

``semdb ingest --codec-file FILE --db NEW`` then codes a new database with it from the first batch.
"""

from __future__ import annotations

import argparse
import json
import sys

from semdb.database import DB_ENV_VAR, DEFAULT_DB_FILENAME, connect, default_database_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``codec`` sub-commands (``export``)."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    export = actions.add_parser(
        "export",
        help="write the database's codec, model spec, rate and fidelity to FILE (safetensors, no pickle)",
        description="Write the database's codec with its model spec, bits and fidelity figures to FILE; "
        "`semdb ingest --codec-file FILE` codes a new database with it, no training.",
        epilog="example:\n  semdb codec export photos.codec --db photos.semdb",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("file", metavar="FILE", help="codec file to write")
    export.add_argument(
        "--db",
        default=None,
        metavar="FILE",
        help=f"database file (default: ${DB_ENV_VAR}, else ./{DEFAULT_DB_FILENAME})",
    )
    export.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def run(args: argparse.Namespace) -> int:
    """Export the codec; one line (or JSON) on stdout."""
    with connect(args.db or default_database_path(), create=False) as db:
        db.export_codec(args.file)
        stats = db.stats()
    if args.json:
        sys.stdout.write(
            json.dumps(
                {"file": args.file, "codec": stats.codec, "bits_per_image": stats.bits_per_image, "model": stats.model},
                indent=2,
            )
            + "\n"
        )
    else:
        print(f"wrote {stats.codec} codec at {stats.bits_per_image} bits/image for model {stats.model} to {args.file}")
    return 0
