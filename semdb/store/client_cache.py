"""Where the index cache of a server database lives: on the client, tagged with the database's identity.

A database file keeps its cache beside it (``photos.semdb.index``). A PostgreSQL database has no
folder of its own, and the cache is this machine's copy anyway, so it goes to the user's cache
folder::

    $XDG_CACHE_HOME/semdb/<database_id>-<server>.index      (default ~/.cache/semdb/)

``database_id`` is the random id stored in the database when it was created; ``server`` is a hash
of host, port, database name and user (never the password). Two databases never share a file, a
copy of one database restored on another server gets its own, and the file itself carries the
database's state tag (id, generation, change token), so a stale one is rebuilt, exactly as beside a
file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import numpy as np

from semdb.index import SearchIndex, save_cache
from semdb.store.postgres import server_identity

CACHE_HOME_ENV = "XDG_CACHE_HOME"


def cache_folder() -> Path:
    """``$XDG_CACHE_HOME/semdb``, else ``~/.cache/semdb``."""
    base = os.environ.get(CACHE_HOME_ENV) or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "semdb"


def client_cache_path(location: str, database_id: str) -> Path:
    """The index cache file of the server database at URL ``location`` whose stored id is ``database_id``."""
    server = hashlib.sha256(server_identity(location).encode()).hexdigest()[:16]
    safe_id = "".join(c for c in database_id if c.isalnum())[:64] or "unknown"
    return cache_folder() / f"{safe_id}-{server}.index"


def _stored_tag(path: Path) -> str | None:
    """The state tag a cache file carries (its other members are not read); None if unreadable."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return bytes(archive["tag"]).decode()
    except Exception:  # a cache is disposable: unreadable means "write it again"
        return None


def keep_client_cache(index: SearchIndex, path: Path) -> None:
    """Write ``index`` to ``path`` unless the file already holds this state (the index was loaded from it).

    The folder is created owner-only; a cache that cannot be written (read-only home) is skipped:
    the cache only saves the rebuild on the next start.
    """
    if not index.coded or _stored_tag(path) == index.tag:
        return
    with contextlib.suppress(OSError):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        save_cache(index, path, mode=0o600)
