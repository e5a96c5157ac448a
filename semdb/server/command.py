"""The ``semdb serve`` sub-command: open the database, load the model once, run uvicorn.

This module imports neither FastAPI nor uvicorn until the command runs, so ``semdb`` works
without the ``server`` extra and says how to install it when ``serve`` is asked for.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from semdb.database import connect, default_database_path
from semdb.errors import InvalidArgumentError, SemdbError
from semdb.server.thumbnails import DEFAULT_CACHE_BYTES, ThumbnailCache, default_cache_dir

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``semdb serve``."""
    parser.add_argument(
        "--db", default=None, metavar="FILE", help="database file (default: $SEMDB_DB, else ./semdb.semdb)"
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 shows every image "
        "of the database to whoever reaches the port)",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free one)"
    )
    parser.add_argument(
        "--thumbnails", default=None, metavar="DIR", help=f"thumbnail cache folder (default {default_cache_dir()})"
    )
    parser.add_argument(
        "--cache-mb", type=int, default=DEFAULT_CACHE_BYTES // 2**20, metavar="MB", help="thumbnail cache bound (256)"
    )
    parser.add_argument("--max-upload-mb", type=int, default=20, metavar="MB", help="largest image upload (20)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available)")


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    try:
        import uvicorn

        from semdb.server.app import create_app
    except ModuleNotFoundError as error:
        raise SemdbError(f"`semdb serve` needs {error.name}: pip install 'semdb[server]'") from None
    if not 0 <= args.port <= 65535 or args.cache_mb < 1 or args.max_upload_mb < 1:
        raise InvalidArgumentError("--port must be 0..65535, --cache-mb and --max-upload-mb at least 1")
    console = Console(stderr=True, highlight=False)
    folder = Path(args.thumbnails) if args.thumbnails else default_cache_dir()
    try:
        thumbnails = ThumbnailCache(folder, args.cache_mb * 2**20)
    except OSError as error:
        raise InvalidArgumentError(
            f"cannot keep thumbnails in {folder}: {error.strerror or error}; give a writable folder with --thumbnails"
        ) from None
    db = connect(args.db or default_database_path(), create=False, device=args.device)
    stats = db.stats()
    if stats.images == 0:
        raise SemdbError(f"database {db.location} has no searchable images yet; run `semdb ingest` first")
    with console.status(f"loading {stats.model}…"):
        _ = db.encoder  # the whole model: uploads need the image tower, and it stays loaded
        db.index()
    hosts = None if args.host in LOOPBACK else ["*"]
    if hosts is not None:
        console.print(
            f"[bold]warning:[/] listening on {args.host}: anyone who reaches port {args.port} can see every image "
            "in the database"
        )
    app = create_app(db, thumbnails, max_upload_bytes=args.max_upload_mb * 2**20, allowed_hosts=hosts)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    shown_host = f"[{args.host}]" if ":" in args.host else args.host

    original_startup = server.startup

    async def startup(sockets: list[Any] | None = None) -> None:
        await original_startup(sockets)
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else args.port
        # The address on stdout, alone on its line, for scripts (and tests) that start the server.
        sys.stdout.write(f"http://{shown_host}:{port}/\n")
        sys.stdout.flush()
        console.print(f"{db.location}: {stats.images} images; Ctrl-C stops")

    server.startup = startup  # type: ignore[method-assign]
    server.run()
    db.close()
    return 0
