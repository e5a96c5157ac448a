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

import hashlib
import os
from pathlib import Path

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
