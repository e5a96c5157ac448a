"""The store: all durable state of a semdb database and all the SQL that touches it.

* :mod:`semdb.store.models` — the tables;
* :mod:`semdb.store.repository` — every statement, over one transaction;
* :mod:`semdb.store.store` — opening a database safely (read-only, create, migrate), the read
  snapshot and the write lock;
* :mod:`semdb.store.migrate` — the Alembic revisions in ``migrations/``;
* :mod:`semdb.store.postgres` — what differs on a PostgreSQL server (lock, snapshots, errors);
* :mod:`semdb.store.client_cache` — where a server database's index cache lives on the client.
"""

from semdb.store.models import (
    STATUS_INDEXED,
    STATUS_SKIPPED,
    Base,
    Code,
    CodecRecord,
    Content,
    ImageRecord,
    Setting,
    StagedEmbedding,
)
from semdb.store.repository import CodecRow, Counts, ImageRow, Repository
from semdb.store.store import Store

__all__ = [
    "STATUS_INDEXED",
    "STATUS_SKIPPED",
    "Base",
    "Code",
    "CodecRecord",
    "CodecRow",
    "Content",
    "Counts",
    "ImageRecord",
    "ImageRow",
    "Repository",
    "Setting",
    "StagedEmbedding",
    "Store",
]
