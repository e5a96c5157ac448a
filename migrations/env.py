"""Alembic environment: runs the revisions on the connection semdb hands over (online mode only).

The caller owns the transaction (on SQLite it holds the write lock, so that two processes opening
a new database never both create its tables); this file only runs the revisions inside it.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from semdb.store.models import Base

config = context.config
connection: Connection = config.attributes["connection"]

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things in place; batch mode rebuilds tables when a revision needs it.
    render_as_batch=connection.dialect.name == "sqlite",
    transaction_per_migration=False,
)
with context.begin_transaction():
    context.run_migrations()
