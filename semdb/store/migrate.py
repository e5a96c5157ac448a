"""Alembic, driven from code: the revisions in ``migrations/`` applied on a connection semdb holds."""

from __future__ import annotations

import threading
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

MIGRATIONS_PACKAGE = "semdb._migrations"


def migrations_location() -> str:
    """Folder of the Alembic revisions: ``migrations/`` in a checkout, ``semdb/_migrations`` installed."""
    checkout = Path(__file__).resolve().parent.parent.parent / "migrations"
    if (checkout / "env.py").is_file():
        return str(checkout)
    import importlib.resources

    return str(importlib.resources.files(MIGRATIONS_PACKAGE))


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config (no alembic.ini needed), bound to ``connection`` when one is given."""
    config = Config()
    config.set_main_option("script_location", migrations_location())
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@cache
def known_revisions() -> tuple[str, ...]:
    """Every revision this semdb knows, oldest first (the last one is the head)."""
    script = ScriptDirectory.from_config(alembic_config())
    return tuple(revision.revision for revision in reversed(list(script.walk_revisions())))


def head_revision() -> str:
    """The revision this semdb writes."""
    return known_revisions()[-1]


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at, or None for a database never migrated."""
    return MigrationContext.configure(connection).get_current_revision()


# Alembic keeps the running migration in module-level state (``alembic.context``), so two threads
# migrating at once would run each other's revisions: one at a time per process.
_UPGRADE_LOCK = threading.Lock()


def upgrade(connection: Connection) -> None:
    """Apply every revision not yet applied, inside the caller's transaction."""
    with _UPGRADE_LOCK:
        command.upgrade(alembic_config(connection), "head")
