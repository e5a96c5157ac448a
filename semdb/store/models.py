"""The tables of a semdb database (SQLAlchemy 2 declarative models).

Tables::

    settings  key → value (model spec, embedding dim, codec name, bits per image, the database id,
              the change counter and token the index cache is tagged with)
    codecs    trained codec states, with their coarse centroids and report; exactly one is active (a
              unique partial index makes a second active codec impossible), earlier ones stay
              referenced by the codes they made
    contents  one row per distinct file content (sha256): width, height
    codes     content → code (bits_per_image / 8 bytes), the codec that made it, its inverted list
    staged    content → float32 embedding, kept only until the codec is trained
    images    path (bytes) → content, size, mtime, status ('indexed' or 'skipped') and the skip reason
    index_changes  what changed since an index was built: image ids, content ids (written by
              triggers, revision 0005) and each state's change token; trimmed from its oldest end

The schema itself is created and evolved by the Alembic revisions in ``migrations/``; a test
checks that the revisions and these models agree.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

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
    active: Mapped[bool] = mapped_column(Boolean, server_default=false())
    # float32 coarse centroids (lists × dim) trained with the codec, for inverted-list search; NULL: flat scan.
    lists: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # JSON: why this codec was chosen and its fidelity measured on the collection's own images.
    report: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        # At most one active codec, whatever the writers do: a second one violates this index.
        Index(
            "uq_codecs_one_active",
            "active",
            unique=True,
            sqlite_where=text("active"),
            postgresql_where=text("active"),
        ),
    )


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
    # The inverted list the embedding fell in (assigned at ingest from the float vector); NULL: no lists.
    list_no: Mapped[int | None] = mapped_column(Integer, nullable=True)


class StagedEmbedding(Base):
    """A float32 embedding waiting for the codec to be trained."""

    __tablename__ = "staged"
    content_id: Mapped[int] = mapped_column(ForeignKey("contents.id", ondelete="CASCADE"), primary_key=True)
    embedding: Mapped[bytes] = mapped_column(LargeBinary)


class ImageRecord(Base):
    """A file seen by ingest: indexed (linked to a content) or skipped (with the reason)."""

    __tablename__ = "images"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # os.fsencode(path): the file's real name, whatever its encoding (see revision 0003).
    path: Mapped[bytes] = mapped_column(LargeBinary, unique=True)
    content_id: Mapped[int | None] = mapped_column(
        ForeignKey("contents.id", ondelete="SET NULL"), index=True, nullable=True
    )
    size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    mtime_ns: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class IndexChange(Base):
    """One logged change of the searchable content (revision 0005): ``image_id`` (an image record added,
    removed, or its content or status changed) or ``content_id`` (a code added, replaced or removed),
    written by triggers; or ``token``, the change token of a content state, written by
    :meth:`~semdb.store.repository.Repository.record_change`. ``seq`` increases with every row."""

    __tablename__ = "index_changes"
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    image_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    content_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    token: Mapped[str | None] = mapped_column(String(32), index=True, nullable=True)

    __table_args__ = ({"sqlite_autoincrement": True},)
