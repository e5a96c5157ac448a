"""Alembic environment: runs the revisions on the engine semdb hands over (online mode only)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from semdb.store import Base

config = context.config
engine: Engine = config.attributes["engine"]

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things in place; batch mode rebuilds tables when a revision needs it.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
