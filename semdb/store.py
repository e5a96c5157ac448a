"""The store: SQLAlchemy models over SQLite, the source of truth of a semdb database.

One database file holds everything needed to answer a query: the images (paths and what became of
them), one code per distinct image content, the trained codec, the model spec and the settings.
The schema is created and evolved by the Alembic revisions in ``migrations/``, applied on open.

Tables::

    settings  key → value (model spec, embedding dim, codec name, bits per image, state generation)
    codecs    the trained codec state (one active codec; earlier ones stay referenced by their codes)
    contents  one row per distinct file content (sha256): width, height
    codes     content → code (bits_per_image / 8 bytes) and the codec that made it
    staged    content → float32 embedding, kept only until the codec is trained
    images    path → content, size, mtime, status ('indexed' or 'skipped') and the skip reason
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    BigInteger,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    event,
    inspect,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

STATUS_INDEXED = "indexed"
STATUS_SKIPPED = "skipped"


def utcnow() -> datetime:
    """Timezone-aware now, for created/updated columns."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base of semdb's tables."""


class Setting(Base):
    """A key → value setting of the database (model spec, codec choice, bits...)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class CodecRecord(Base):
    """A trained codec, serialised without pickle."""

    __tablename__ = "codecs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(32))
    bits_per_image: Mapped[int] = mapped_column(Integer)
    dim: Mapped[int] = mapped_column(Integer)
    state: Mapped[bytes] = mapped_column(LargeBinary)
    trained_on: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Content(Base):
    """One distinct file content (by sha256); several paths may share it."""

    __tablename__ = "contents"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)


class Code(Base):
    """The compressed embedding of one content."""

    __tablename__ = "codes"
    content_id: Mapped[int] = mapped_column(ForeignKey("contents.id", ondelete="CASCADE"), primary_key=True)
    codec_id: Mapped[int] = mapped_column(ForeignKey("codecs.id"), index=True)
    code: Mapped[bytes] = mapped_column(LargeBinary)


class StagedEmbedding(Base):
    """A float32 embedding waiting for the codec to be trained."""

    __tablename__ = "staged"
    content_id: Mapped[int] = mapped_column(ForeignKey("contents.id", ondelete="CASCADE"), primary_key=True)
    embedding: Mapped[bytes] = mapped_column(LargeBinary)


class ImageRecord(Base):
    """A file seen by ingest: indexed (linked to a content) or skipped (with the reason)."""

    __tablename__ = "images"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    content_id: Mapped[int | None] = mapped_column(
        ForeignKey("contents.id", ondelete="SET NULL"), index=True, nullable=True
    )
    size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    mtime_ns: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


MIGRATIONS_PACKAGE = "semdb._migrations"


def migrations_location() -> str:
    """Folder of the Alembic revisions: ``migrations/`` in a checkout, ``semdb/_migrations`` installed."""
    checkout = Path(__file__).resolve().parent.parent / "migrations"
    if (checkout / "env.py").is_file():
        return str(checkout)
    import importlib.resources

    return str(importlib.resources.files(MIGRATIONS_PACKAGE))


def alembic_config(engine: Engine) -> Config:
    """An Alembic config bound to ``engine`` (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", migrations_location())
    config.attributes["engine"] = engine
    return config


def _sqlite_pragmas(dbapi_connection: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets searches read while an ingest writes; NORMAL sync is durable across process kills.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(url: str) -> Engine:
    """A SQLAlchemy engine for ``url``; SQLite connections get WAL, foreign keys and a busy timeout."""
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def upgrade_schema(engine: Engine) -> None:
    """Apply every Alembic revision not yet applied (a no-op on an up-to-date database)."""
    command.upgrade(alembic_config(engine), "head")


def schema_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at, or None for a database never migrated."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def table_names(engine: Engine) -> list[str]:
    """Names of the tables in the database."""
    return sorted(inspect(engine).get_table_names())


class Store:
    """Sessions over one database, with its schema brought up to date on open."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        upgrade_schema(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work is committed as one transaction, or rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    def session(self) -> Session:
        """A plain session for reads."""
        return self._sessions()

    def compact(self) -> None:
        """Return free pages to the file system (SQLite ``VACUUM``; a no-op elsewhere)."""
        if self.engine.dialect.name != "sqlite":
            return
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("VACUUM")
            connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        """Release the connections."""
        self.engine.dispose()
