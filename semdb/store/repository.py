"""Every SQL statement semdb runs: a small repository over one open transaction.

A :class:`Repository` wraps a SQLAlchemy connection inside a transaction that
:class:`~semdb.store.store.Store` opened (a snapshot for reading, the write lock for writing); it
knows nothing about files, models or FAISS. Statements are SQLAlchemy Core over the tables of
:mod:`semdb.store.models`, portable between SQLite and PostgreSQL.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Dialect,
    LargeBinary,
    and_,
    bindparam,
    case,
    cast,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)

from semdb.arguments import storable_id
from semdb.errors import DatabaseDamagedError
from semdb.paths import display_path
from semdb.store.models import (
    STATUS_INDEXED,
    STATUS_SKIPPED,
    Code,
    CodecRecord,
    Content,
    ImageRecord,
    IndexChange,
    Setting,
    StagedEmbedding,
)

T = TypeVar("T")
# Sane ranges of the numeric settings: embedding dimensions and code sizes of real models are far inside.
SETTING_BOUNDS: dict[str, tuple[int, int]] = {
    "dim": (1, 16_384),
    "bits_per_image": (8, 16_384),
    "generation": (0, 2**62),
}


# Rows per IN (...) list: far below SQLite's and PostgreSQL's bound-parameter limits.
CHUNK = 500
# The change log keeps at least this many newest rows, or one per ten images if that is more: an index
# more changes behind than a tenth of its rows is rebuilt anyway (semdb.index.build), so older rows
# would never be read. It is trimmed once it holds twice that.
CHANGE_LOG_MIN_ROWS = 100_000


def _chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass(frozen=True)
class CodecRow:
    """A stored codec: its id, registry name, rate, dimension, serialised state and training size."""

    id: int
    name: str
    bits_per_image: int
    dim: int
    state: bytes
    trained_on: int


@dataclass(frozen=True)
class ImageRow:
    """A stored image record (a file seen by ingest)."""

    id: int
    path: str
    content_id: int | None
    size: int | None
    mtime_ns: int | None
    status: str
    error: str | None


@dataclass(frozen=True)
class ImageDetails:
    """What the server needs of an indexed image (issue 13): its stored path bytes, the file's
    mtime at ingest, the content's size and sha256 (what a served file must still hash to)."""

    id: int
    path_bytes: bytes
    mtime_ns: int | None
    width: int
    height: int
    sha256: str

    @property
    def path(self) -> str:
        """The path as readable text (see :func:`display_path`)."""
        return display_path(self.path_bytes)


@dataclass(frozen=True)
class Counts:
    """How many rows of each kind a database holds."""

    indexed: int
    skipped: int
    staged: int
    contents: int


_IMAGE_COLUMNS = (
    ImageRecord.id,
    ImageRecord.path,
    ImageRecord.content_id,
    ImageRecord.size,
    ImageRecord.mtime_ns,
    ImageRecord.status,
    ImageRecord.error,
)


_PATHS_SQL: dict[tuple[type, str, int], str] = {}


def _paths_sql(dialect: Dialect, count: int) -> str:
    """The SQL of ``SELECT id, path FROM images WHERE id IN (count parameters id0, id1, ...)`` for
    ``dialect``, compiled once per dialect, parameter style and count."""
    key = (type(dialect), dialect.paramstyle, count)
    if key not in _PATHS_SQL:
        statement = select(ImageRecord.id, ImageRecord.path).where(
            ImageRecord.id.in_([bindparam(f"id{i}") for i in range(count)])
        )
        compiled: Any = statement.compile(dialect=dialect)
        if compiled.positional and list(compiled.positiontup) != [f"id{i}" for i in range(count)]:
            raise AssertionError("parameters compiled out of order")
        _PATHS_SQL[key] = str(compiled)
    return _PATHS_SQL[key]


_CODEC_COLUMNS = (
    CodecRecord.id,
    CodecRecord.name,
    CodecRecord.bits_per_image,
    CodecRecord.dim,
    CodecRecord.state,
    CodecRecord.trained_on,
)


class Repository:
    """The SQL of one transaction (see the module docstring)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    # --- settings and change tracking -------------------------------------------------------------

    def settings(self) -> dict[str, str]:
        """Every setting, key → value."""
        return {str(row.key): str(row.value) for row in self.connection.execute(select(Setting.key, Setting.value))}

    def setting(self, key: str) -> str | None:
        """One setting, or None."""
        return self.connection.scalar(select(Setting.value).where(Setting.key == key))

    def int_setting(self, key: str, default: int | None = None) -> int | None:
        """A whole-number setting, checked against :data:`SETTING_BOUNDS` before anything sizes an
        array by it (a database is a file people hand each other); ``default`` when absent."""
        value = self.setting(key)
        if value is None:
            return default
        low, high = SETTING_BOUNDS[key]
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or not low <= number <= high:
            raise DatabaseDamagedError(
                f"the database is damaged: setting {key}={value[:40]!r} is not a whole number in {low}..{high}"
            )
        return number

    def set_settings(self, values: dict[str, str]) -> None:
        """Insert or update settings."""
        present = set(self.connection.scalars(select(Setting.key).where(Setting.key.in_(list(values)))))
        for key, value in values.items():
            if key in present:
                self.connection.execute(update(Setting).where(Setting.key == key).values(value=value))
            else:
                self.connection.execute(insert(Setting).values(key=key, value=value))

    def record_change(self) -> None:
        """Mark the searchable content as changed: a new generation and a new random change token.

        The token is what the index cache is checked against: a restored backup or a lost WAL brings
        back an old token that no later cache carries, and later changes draw fresh ones, so a cache
        built from another state never matches (a counter alone repeats after a restore).
        """
        generation = (self.int_setting("generation") or 0) + 1
        token = uuid.uuid4().hex
        self.set_settings({"generation": str(generation), "change_token": token})
        # The state's marker in the change log: an index built from this state catches up from here.
        self.connection.execute(insert(IndexChange).values(token=token))
        self._trim_change_log()

    def _trim_change_log(self) -> None:
        """Delete the oldest change-log rows beyond what any catch-up could use (:data:`CHANGE_LOG_MIN_ROWS`)."""
        low, high = self.connection.execute(select(func.min(IndexChange.seq), func.max(IndexChange.seq))).one()
        if low is None:
            return
        keep = max(CHANGE_LOG_MIN_ROWS, self.largest_image_id() // 10)
        if high - low + 1 > 2 * keep:
            # Always a prefix (the oldest rows): a state's marker still logged means every later change is.
            self.connection.execute(delete(IndexChange).where(IndexChange.seq <= high - keep))

    # --- the change log (revision 0005): what an index catches up with ------------------------------

    def last_change(self) -> int:
        """The newest change-log ``seq`` (0 when the log is empty): what an index of this snapshot covers."""
        return int(self.connection.scalar(select(func.max(IndexChange.seq))) or 0)

    def state_logged(self, token: str) -> bool:
        """Whether the change log still holds the marker of the state with change token ``token``:
        the database passed through that state (a restored backup from before it did not) and every
        change since is logged (the log is only ever trimmed from its oldest end)."""
        return self.connection.scalar(select(IndexChange.seq).where(IndexChange.token == token).limit(1)) is not None

    def changes_after(self, seq: int, at_most: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Image ids and content ids logged after ``seq``: ``(image_ids (a,), content_ids (c,))`` int64,
        unique; None when more than ``at_most`` rows were logged (catching up would not pay)."""
        rows = self.connection.execute(
            select(IndexChange.image_id, IndexChange.content_id).where(IndexChange.seq > seq).limit(at_most + 1)
        ).all()
        if len(rows) > at_most:
            return None
        images = np.unique(np.array([row[0] for row in rows if row[0] is not None], dtype=np.int64))
        contents = np.unique(np.array([row[1] for row in rows if row[1] is not None], dtype=np.int64))
        return images, contents

    def images_of_contents(self, content_ids: Sequence[int]) -> np.ndarray:
        """``(n,)`` int64 ids of the image records of ``content_ids``, sorted."""
        found: list[int] = []
        for chunk in _chunks(list(content_ids)):
            found.extend(self.connection.scalars(select(ImageRecord.id).where(ImageRecord.content_id.in_(chunk))))
        return np.unique(np.array(found, dtype=np.int64))

    def coded_rows(self, image_ids: Sequence[int]) -> list[tuple[int, int, bytes, int]]:
        """``(image id, codec id, code, list_no or -1)`` of those of ``image_ids`` indexed with a code, by id."""
        rows: list[tuple[int, int, bytes, int]] = []
        for chunk in _chunks(list(image_ids)):
            statement = (
                select(ImageRecord.id, Code.codec_id, Code.code, Code.list_no)
                .join(Code, Code.content_id == ImageRecord.content_id)
                .where(ImageRecord.status == STATUS_INDEXED, ImageRecord.id.in_(chunk))
            )
            rows.extend(
                (int(image_id), int(codec_id), bytes(code), -1 if list_no is None else int(list_no))
                for image_id, codec_id, code, list_no in self.connection.execute(statement)
            )
        return sorted(rows)

    def state_tag(self) -> str:
        """The database's identity and content state, ``database_id:generation:change_token``."""
        settings = self.settings()
        return ":".join(settings.get(key, "") for key in ("database_id", "generation", "change_token"))

    # --- codecs ---------------------------------------------------------------------------------

    def active_codec(self) -> CodecRow | None:
        """The codec new images are coded with (None before one is trained)."""
        row = self.connection.execute(select(*_CODEC_COLUMNS).where(CodecRecord.active)).first()
        return CodecRow(*row) if row is not None else None

    def active_codec_id(self) -> int | None:
        """The active codec's id, without reading its state."""
        return self.connection.scalar(select(CodecRecord.id).where(CodecRecord.active))

    def codec(self, codec_id: int) -> CodecRow | None:
        """A stored codec by id."""
        row = self.connection.execute(select(*_CODEC_COLUMNS).where(CodecRecord.id == codec_id)).first()
        return CodecRow(*row) if row is not None else None

    def add_active_codec(
        self, name: str, bits_per_image: int, dim: int, state: bytes, trained_on: int, lists: bytes | None = None
    ) -> int:
        """Store a trained codec as the active one; returns its id.

        Raises IntegrityError if another codec is active (the unique partial index): callers hold
        the write lock and check :meth:`active_codec_id` first, so that is a bug, not a race.
        """
        result = self.connection.execute(
            insert(CodecRecord).values(
                name=name,
                bits_per_image=bits_per_image,
                dim=dim,
                state=state,
                trained_on=trained_on,
                active=True,
                lists=lists,
            )
        )
        key = result.inserted_primary_key
        if key is None:
            raise RuntimeError("the database returned no id for the new codec")
        return int(key[0])

    def codec_count(self) -> int:
        """How many codecs were ever stored."""
        return int(self.connection.scalar(select(func.count()).select_from(CodecRecord)) or 0)

    def codec_dims(self) -> dict[int, int]:
        """codec id → its embedding dimension, for every stored codec (no states read)."""
        return {int(i): int(d) for i, d in self.connection.execute(select(CodecRecord.id, CodecRecord.dim))}

    def largest_image_id(self) -> int:
        """The largest image record id (0 when none): a bound on how many images are indexed, read in O(1)."""
        return int(self.connection.scalar(select(func.max(ImageRecord.id))) or 0)

    # --- codec reports (issue 11): why a codec was chosen, and its fidelity, as JSON ---------------

    def set_codec_report(self, codec_id: int, report: str) -> None:
        """Store the JSON ``report`` of codec ``codec_id`` (``codecs.report``)."""
        self.connection.execute(update(CodecRecord).where(CodecRecord.id == codec_id).values(report=report))

    def codec_report(self, codec_id: int) -> str | None:
        """The JSON report of codec ``codec_id``; None for codecs stored without one."""
        report: str | None = self.connection.scalar(select(CodecRecord.report).where(CodecRecord.id == codec_id))
        return report

    # --- contents, codes and staged embeddings ----------------------------------------------------

    def content_ids(self, hashes: Iterable[str]) -> dict[str, int]:
        """sha256 → content id, for the hashes already stored."""
        wanted = sorted(set(hashes))
        found: dict[str, int] = {}
        for chunk in _chunks(wanted):
            statement = select(Content.sha256, Content.id).where(Content.sha256.in_(chunk))
            found.update((str(sha), int(content_id)) for sha, content_id in self.connection.execute(statement))
        return found

    def add_contents(self, contents: Sequence[tuple[str, int, int]]) -> dict[str, int]:
        """Store new ``(sha256, width, height)`` contents; returns sha256 → new content id."""
        if not contents:
            return {}
        self.connection.execute(
            insert(Content), [{"sha256": sha, "width": width, "height": height} for sha, width, height in contents]
        )
        return self.content_ids(sha for sha, _, _ in contents)

    def add_codes(
        self, content_ids: Sequence[int], codec_id: int, codes: np.ndarray, list_nos: np.ndarray | None = None
    ) -> None:
        """Store ``codes`` ``(n, code_size)`` uint8 for ``content_ids`` (n,), made by codec ``codec_id``;
        ``list_nos`` ``(n,)``: each code's inverted list (None: no lists)."""
        if len(content_ids):
            lists = [None] * len(content_ids) if list_nos is None else [int(number) for number in list_nos]
            self.connection.execute(
                insert(Code),
                [
                    {"content_id": content_id, "codec_id": codec_id, "code": code.tobytes(), "list_no": list_no}
                    for content_id, code, list_no in zip(content_ids, codes, lists, strict=True)
                ],
            )

    def stage(self, content_ids: Sequence[int], embeddings: np.ndarray) -> None:
        """Keep float32 ``embeddings`` ``(n, d)`` of ``content_ids`` until the codec is trained."""
        if len(content_ids):
            self.connection.execute(
                insert(StagedEmbedding),
                [
                    {"content_id": content_id, "embedding": np.asarray(vector, np.float32).tobytes()}
                    for content_id, vector in zip(content_ids, embeddings, strict=True)
                ],
            )

    def staged_count(self) -> int:
        """Embeddings staged, waiting for the codec."""
        return int(self.connection.scalar(select(func.count()).select_from(StagedEmbedding)) or 0)

    def staged(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Every staged embedding: ``(content_ids (n,) int64, embeddings (n, dim) float32)``.

        In content-hash order, not id order: ids follow the order in which writers committed, and the
        codec trained on these rows must not depend on that (a Ray ingest with several writers and a
        single-process ingest of the same files train the same codec).
        """
        rows = self.connection.execute(
            select(StagedEmbedding.content_id, StagedEmbedding.embedding)
            .join(Content, Content.id == StagedEmbedding.content_id)
            .order_by(Content.sha256)
        ).all()
        return _ids_and_blobs(rows, np.float32, dim)

    def clear_staged(self) -> None:
        """Delete every staged embedding (after they were coded)."""
        self.connection.execute(delete(StagedEmbedding))

    # --- images ---------------------------------------------------------------------------------

    def images_by_path(self, paths: Iterable[str]) -> dict[str, ImageRow]:
        """Stored records of ``paths`` (those that have one), path → record."""
        wanted = sorted({os.fsencode(path) for path in paths})
        found: dict[str, ImageRow] = {}
        for chunk in _chunks(wanted):
            for row in self.connection.execute(select(*_IMAGE_COLUMNS).where(ImageRecord.path.in_(chunk))):
                record = ImageRow(row.id, os.fsdecode(row.path), *row[2:])
                found[record.path] = record
        return found

    def add_images(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert image records (dicts with path, content_id, size, mtime_ns, status, error)."""
        if rows:
            self.connection.execute(insert(ImageRecord), [{**row, "path": os.fsencode(row["path"])} for row in rows])

    def update_images(self, rows: Sequence[dict[str, Any]]) -> None:
        """Update image records by ``id`` (dicts with id, content_id, size, mtime_ns, status, error)."""
        if not rows:
            return
        statement = (
            update(ImageRecord)
            .where(ImageRecord.id == bindparam("image_id"))
            .values(
                content_id=bindparam("content_id"),
                size=bindparam("size"),
                mtime_ns=bindparam("mtime_ns"),
                status=bindparam("status"),
                error=bindparam("error"),
            )
        )
        self.connection.execute(
            statement, [{**{k: v for k, v in row.items() if k != "id"}, "image_id": row["id"]} for row in rows]
        )

    def delete_images(self, image_ids: Sequence[int]) -> None:
        """Forget image records."""
        for chunk in _chunks(list(image_ids)):
            self.connection.execute(delete(ImageRecord).where(ImageRecord.id.in_(chunk)))

    def delete_orphans(self) -> int:
        """Delete contents no image refers to, with their codes and staged rows; returns how many."""
        referenced = select(ImageRecord.content_id).where(ImageRecord.content_id.is_not(None))
        orphans = select(Content.id).where(Content.id.not_in(referenced))
        # Explicit, not left to ON DELETE CASCADE: a connection may run without foreign-key enforcement.
        self.connection.execute(delete(Code).where(Code.content_id.in_(orphans)))
        self.connection.execute(delete(StagedEmbedding).where(StagedEmbedding.content_id.in_(orphans)))
        result = self.connection.execute(delete(Content).where(Content.id.not_in(referenced)))
        return int(result.rowcount or 0)

    def image_paths(self, image_ids: Iterable[int]) -> dict[int, str]:
        """image id → path, readable (see :func:`display_path`)."""
        wanted = sorted({image_id for image_id in image_ids if storable_id(image_id)})
        found: dict[int, str] = {}
        for chunk in _chunks(wanted):
            # Asked after every search: through the driver's cursor, the statement compiled once per
            # number of ids (SQLAlchemy's execution cost more than SQLite's look-up of a few rows).
            sql = _paths_sql(self.connection.dialect, len(chunk))
            values = {f"id{i}": value for i, value in enumerate(chunk)}
            with self._driver_cursor(sql, tuple(chunk) if self.connection.dialect.positional else values) as cursor:
                found.update((int(image_id), display_path(path)) for image_id, path in cursor.fetchall())
        return found

    def skipped(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of every skipped file, paths readable (see :func:`display_path`)."""
        statement = (
            select(ImageRecord.path, ImageRecord.error)
            .where(ImageRecord.status == STATUS_SKIPPED)
            .order_by(ImageRecord.path)
        )
        return [(display_path(path), error or "") for path, error in self.connection.execute(statement)]

    def counts(self) -> Counts:
        """Indexed and skipped images, staged embeddings, distinct contents."""

        def count(statement: Any) -> int:
            return int(self.connection.scalar(statement) or 0)

        by_status = dict(
            self.connection.execute(select(ImageRecord.status, func.count()).group_by(ImageRecord.status)).all()
        )
        return Counts(
            indexed=int(by_status.get(STATUS_INDEXED, 0)),
            skipped=int(by_status.get(STATUS_SKIPPED, 0)),
            staged=count(select(func.count()).select_from(StagedEmbedding)),
            contents=count(select(func.count()).select_from(Content)),
        )

    # --- what the search index is built from ----------------------------------------------------

    def codecs_of_codes(self) -> list[int]:
        """The ids of the codecs that made any stored code, ascending (one walk of the codec_id index)."""
        return [
            int(codec_id)
            for codec_id in self.connection.scalars(select(Code.codec_id).distinct().order_by(Code.codec_id))
        ]

    def coded_images(self, codec_id: int, code_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Indexed images coded by ``codec_id``: ``(image_ids (n,) int64, codes (n, code_size) uint8)``.

        A stored code of another length than ``code_size`` means a damaged row: ValueError.
        """
        statement = (
            select(ImageRecord.id, Code.code)
            .join(Code, Code.content_id == ImageRecord.content_id)
            .where(ImageRecord.status == STATUS_INDEXED, Code.codec_id == codec_id)
            .order_by(ImageRecord.id)
        )
        return _ids_and_blobs(self.connection.execute(statement).all(), np.uint8, code_size)

    def staged_images(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Indexed images not coded yet: ``(image_ids (m,) int64, embeddings (m, dim) float32)``."""
        # Asked before every search of a changed database, and nearly always empty once a codec is
        # trained: without this check SQLite plans the join from the images (a scan of all of them).
        if self.connection.scalar(select(StagedEmbedding.content_id).limit(1)) is None:
            return np.empty(0, np.int64), np.empty((0, dim), np.float32)
        statement = (
            select(ImageRecord.id, StagedEmbedding.embedding)
            .join(StagedEmbedding, StagedEmbedding.content_id == ImageRecord.content_id)
            .where(ImageRecord.status == STATUS_INDEXED)
            .order_by(ImageRecord.id)
        )
        return _ids_and_blobs(self.connection.execute(statement).all(), np.float32, dim)

    # --- issue 10: inverted lists and the streamed index build --------------------------------------

    def codec_lists(self, codec_id: int) -> bytes | None:
        """The coarse centroids stored with codec ``codec_id`` (``codecs.lists``), None if it has none."""
        value = self.connection.scalar(select(CodecRecord.lists).where(CodecRecord.id == codec_id))
        return bytes(value) if value is not None else None

    def images_under_page(self, folder: str, after: int, rows: int) -> list[tuple[int, str]]:
        """Up to ``rows`` ``(id, path)`` of the records at ``folder`` or below it with ids above
        ``after``, by id: a prune pages through them in bounded memory."""
        statement = (
            select(ImageRecord.id, ImageRecord.path)
            .where(ImageRecord.id > after, _at_or_below(folder))
            .order_by(ImageRecord.id)
            .limit(rows)
        )
        return [(int(image_id), os.fsdecode(path)) for image_id, path in self.connection.execute(statement)]

    def coded_chunks(
        self, codec_id: int, code_size: int, rows: int = 65_536, *, by_row: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Indexed images coded by ``codec_id``, by id, ``rows`` at a time:
        ``(image_ids (m,) int64, codes (m, code_size) uint8, list_nos (m,) int64, -1 where NULL)``.

        Streamed: only one chunk is ever held at a time, and no Python object is made per row
        (:meth:`_coded_pages`). ``by_row``: through the driver's tuple per row instead (what the
        benchmarks and tests compare with). A code of another length than ``code_size`` means a
        damaged row: ValueError.
        """
        dialect = self.connection.dialect.name
        if not by_row and (dialect == "postgresql" or (dialect == "sqlite" and self._sqlite_utf8())):
            yield from self._coded_pages(codec_id, code_size, rows)
            return
        statement = (
            select(ImageRecord.id, Code.code, func.coalesce(Code.list_no, -1))
            .join(Code, Code.content_id == ImageRecord.content_id)
            .where(ImageRecord.status == STATUS_INDEXED, Code.codec_id == codec_id)
            .order_by(ImageRecord.id)
        )
        # Through the driver's own cursor: SQLAlchemy's result rows cost about as much again as the
        # driver's fetch for a million rows (docs/benchmarks.md, "full build"); the statement is still
        # the Core select above, compiled for this dialect.
        compiled: Any = statement.compile(dialect=self.connection.dialect)  # a SQLCompiler
        values = compiled.construct_params()
        parameters = tuple(values[name] for name in compiled.positiontup or ()) if compiled.positional else values
        with self._driver_cursor(str(compiled), parameters, stream=True) as cursor:
            while chunk := cursor.fetchmany(rows):
                ids, codes = _ids_and_blobs(chunk, np.uint8, code_size)
                yield ids, codes, np.fromiter(map(itemgetter(2), chunk), dtype=np.int64, count=len(chunk))

    def _sqlite_utf8(self) -> bool:
        """Whether this SQLite database stores text as UTF-8 (semdb's always do): then
        ``group_concat`` of blobs keeps their bytes as they are."""
        return str(self.connection.exec_driver_sql("PRAGMA encoding").scalar()).upper() == "UTF-8"

    def _coded_pages(
        self, codec_id: int, code_size: int, rows: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """:meth:`coded_chunks` on SQLite and PostgreSQL: one result row per page of ``rows`` images,
        its ids, codes and list numbers joined by the database itself, so that a million codes make
        no Python object per row (``docs/benchmarks.md``, "full build")."""
        page = (
            select(ImageRecord.id, ImageRecord.content_id)
            .where(ImageRecord.id > bindparam("after"), ImageRecord.status == STATUS_INDEXED)
            .order_by(ImageRecord.id)
            .limit(rows)
            .subquery("page")
        )
        coded = Code.content_id.is_not(None)  # images of the page that codec_id coded (outer join)
        list_no = func.coalesce(Code.list_no, -1)
        sqlite = self.connection.dialect.name == "sqlite"
        if sqlite:
            # group_concat skips NULLs: only the coded images' ids and list numbers, as decimal text.
            joined = (
                func.group_concat(case((coded, page.c.id))),
                cast(func.group_concat(Code.code, ""), LargeBinary),
                func.group_concat(case((coded, list_no))),
            )
            # Bytes, also of a code stored as text; values of the wrong type (a damaged row) that
            # group_concat would quietly turn into text.
            length = func.length(cast(Code.code, LargeBinary))
            wrong_types = func.count(case((func.typeof(Code.code) != "blob", 1))) + func.count(
                case((func.typeof(Code.list_no).not_in(("integer", "null")), 1))
            )
        else:
            # PostgreSQL: int8send gives each integer's 8 big-endian bytes; string_agg skips NULLs.
            # No ORDER BY in the aggregate (a sort of each page, per column, on the server): the
            # three see the rows in the same order, and the page is sorted here when it is not.
            def bytes_of(value: Any) -> Any:
                return func.string_agg(value, literal_column("''::bytea"))

            joined = (
                bytes_of(func.int8send(cast(page.c.id, BigInteger))).filter(coded),
                bytes_of(Code.code),
                bytes_of(func.int8send(cast(list_no, BigInteger))).filter(coded),
            )
            length = func.length(Code.code)
            wrong_types = literal_column("0")  # the column types hold them
        statement = (
            select(
                func.count(),
                func.max(page.c.id),
                func.count(Code.content_id),
                *joined,
                func.min(length),
                func.max(length),
                wrong_types,
            )
            .select_from(page)
            .outerjoin(Code, and_(Code.content_id == page.c.content_id, Code.codec_id == codec_id))
        )
        after = -1
        while True:
            page_rows, last, count, ids_joined, blob, lists_joined, shortest, longest, wrong = self.connection.execute(
                statement, {"after": after}
            ).one()
            if not page_rows:
                return
            after = int(last)
            if not count:
                continue
            if wrong or shortest != code_size or longest != code_size or len(blob) != count * code_size:
                raise ValueError(f"stored codes of {code_size} bytes expected")
            if sqlite:
                ids = np.fromstring(ids_joined, dtype=np.int64, sep=",")
                lists = np.fromstring(lists_joined, dtype=np.int64, sep=",")
            else:
                ids = np.frombuffer(ids_joined, ">i8").astype(np.int64)
                lists = np.frombuffer(lists_joined, ">i8").astype(np.int64)
            if len(ids) != count or len(lists) != count:
                raise ValueError("a stored list number is not an integer")
            codes = np.frombuffer(blob, np.uint8).reshape(count, code_size)
            # In the page's order in practice; SQL does not promise it for an aggregate.
            if count > 1 and not bool(np.all(ids[1:] > ids[:-1])):
                order = np.argsort(ids, kind="stable")
                ids, codes, lists = ids[order], codes[order], lists[order]
            yield ids, codes, lists

    @contextmanager
    def _driver_cursor(self, sql: str, parameters: Any, *, stream: bool = False) -> Iterator[Any]:
        """A DBAPI cursor of this transaction's connection, executing ``sql`` (compiled from a Core
        statement for this dialect) with ``parameters``: plain tuples, no SQLAlchemy row per result.
        ``stream``: on PostgreSQL a server-side cursor, so that rows come in ``fetchmany`` batches
        instead of all at once (SQLite's cursor steps through the result as it is fetched anyway)."""
        driver: Any = self.connection.connection
        named = stream and self.connection.dialect.name == "postgresql"
        cursor = driver.cursor(name=f"semdb_{uuid.uuid4().hex}") if named else driver.cursor()
        try:
            cursor.execute(sql, parameters)
            yield cursor
        finally:
            cursor.close()

    # --- issue 13: query filters, stored vectors of one image, image details for the server ------

    def filtered_image_ids(
        self,
        *,
        under: Sequence[str] = (),
        modified_after_ns: int | None = None,
        modified_before_ns: int | None = None,
        min_width: int | None = None,
        min_height: int | None = None,
    ) -> np.ndarray:
        """Sorted ``(m,)`` int64 ids of the indexed images that pass every filter given.

        ``under``: folders (absolute); an image passes when it is in any of them, at any depth.
        ``modified_*_ns``: the file's mtime (ns since the epoch) at ingest, after ≤ it < before.
        ``min_width``/``min_height``: the stored pixel size of its content.
        """
        statement = select(ImageRecord.id).where(ImageRecord.status == STATUS_INDEXED)
        if under:
            statement = statement.where(or_(*(_at_or_below(folder) for folder in under)))
        if modified_after_ns is not None:
            statement = statement.where(ImageRecord.mtime_ns >= modified_after_ns)
        if modified_before_ns is not None:
            statement = statement.where(ImageRecord.mtime_ns < modified_before_ns)
        if min_width is not None or min_height is not None:
            statement = statement.join(Content, Content.id == ImageRecord.content_id)
            if min_width is not None:
                statement = statement.where(Content.width >= min_width)
            if min_height is not None:
                statement = statement.where(Content.height >= min_height)
        ids = self.connection.scalars(statement.order_by(ImageRecord.id)).all()
        return np.fromiter(ids, dtype=np.int64, count=len(ids))

    def stored_vector_source(self, image_id: int) -> tuple[int | None, bytes] | None:
        """What an indexed image is searched by: ``(codec_id, code)`` when coded, ``(None, float32
        embedding bytes)`` while staged; None when the id is not an indexed image."""
        if not storable_id(image_id):
            return None
        content_id = self.connection.scalar(
            select(ImageRecord.content_id).where(ImageRecord.id == image_id, ImageRecord.status == STATUS_INDEXED)
        )
        if content_id is None:
            return None
        coded = self.connection.execute(select(Code.codec_id, Code.code).where(Code.content_id == content_id)).first()
        if coded is not None:
            return int(coded.codec_id), bytes(coded.code)
        staged = self.connection.scalar(
            select(StagedEmbedding.embedding).where(StagedEmbedding.content_id == content_id)
        )
        return (None, bytes(staged)) if staged is not None else None

    def image_details(self, image_ids: Iterable[int]) -> dict[int, ImageDetails]:
        """image id → :class:`ImageDetails` of the indexed images among ``image_ids``."""
        wanted = sorted({image_id for image_id in image_ids if storable_id(image_id)})
        found: dict[int, ImageDetails] = {}
        columns = (
            ImageRecord.id,
            ImageRecord.path,
            ImageRecord.mtime_ns,
            Content.width,
            Content.height,
            Content.sha256,
        )
        for chunk in _chunks(wanted):
            statement = (
                select(*columns)
                .join(Content, Content.id == ImageRecord.content_id)
                .where(ImageRecord.id.in_(chunk), ImageRecord.status == STATUS_INDEXED)
            )
            for row in self.connection.execute(statement):
                found[int(row.id)] = ImageDetails(
                    int(row.id), bytes(row.path), row.mtime_ns, int(row.width), int(row.height), str(row.sha256)
                )
        return found


def _at_or_below(folder: str) -> ColumnElement[bool]:
    """The records whose path is ``folder`` itself or lies below it: a range on the path bytes
    instead of LIKE (no wildcard escaping, and it uses the unique index on ``images.path``)."""
    exact = os.fsencode(folder)
    prefix = exact.rstrip(b"/") + b"/"
    upper = prefix[:-1] + b"0"  # b"0" is the byte after b"/"
    return or_(ImageRecord.path == exact, (ImageRecord.path >= prefix) & (ImageRecord.path < upper))


def _ids_and_blobs(rows: Sequence[Any], dtype: type[np.generic], width: int) -> tuple[np.ndarray, np.ndarray]:
    """``[(id, blob, ...)]`` rows → ``(ids (n,) int64, array (n, width) dtype)``; ValueError on a blob of
    the wrong size."""
    if not rows:
        return np.empty(0, np.int64), np.empty((0, width), dtype)
    # Columns taken with map(itemgetter): no Python frame per row (a million rows in a full build).
    ids = np.fromiter(map(itemgetter(0), rows), dtype=np.int64, count=len(rows))
    blobs = list(map(itemgetter(1), rows))
    item = np.dtype(dtype).itemsize * width
    blob = b"".join(blobs)
    # The total and the longest both right: every blob is right.
    if len(blob) != item * len(rows) or max(map(len, blobs)) != item:
        raise ValueError(f"stored rows of {item} bytes expected")
    return ids, np.frombuffer(blob, dtype=dtype).reshape(len(rows), width)
