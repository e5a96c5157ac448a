"""The Python API: ``semdb.connect(path)`` → :class:`Database` (ingest, search, stats).

A database is bound to one model and one codec, recorded in its settings on first use; a later
request for another model or codec is refused with :class:`ModelMismatchError` rather than answered
with nonsense. The CLI is a thin shell over this module.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from semdb.codecs import DEFAULT_CODEC, Codec, codec_class, load_codec
from semdb.codecs.base import check_bits
from semdb.cosine import CosineIndex
from semdb.encoder import DEFAULT_MODEL, Encoder, load_encoder
from semdb.errors import DatabaseNotFoundError, InvalidArgumentError, ModelMismatchError, NotReadyError
from semdb.images import DEFAULT_MAX_PIXELS, load_image
from semdb.index import SearchIndex, cache_path, flat_index, load_cache, save_cache
from semdb.ingest import DEFAULT_BATCH_SIZE, DEFAULT_TRAIN_SIZE, CodecState, Ingestor, IngestReport, resolve_roots
from semdb.store import (
    STATUS_INDEXED,
    STATUS_SKIPPED,
    Code,
    CodecRecord,
    Content,
    ImageRecord,
    Setting,
    StagedEmbedding,
    Store,
)

DEFAULT_BITS = 128
DEFAULT_DB_FILENAME = "semdb.semdb"
DB_ENV_VAR = "SEMDB_DB"


def default_database_path() -> str:
    """``$SEMDB_DB`` if set, else ``semdb.semdb`` in the current folder."""
    return os.environ.get(DB_ENV_VAR) or DEFAULT_DB_FILENAME


@dataclass(frozen=True)
class SearchResult:
    """One hit: the image's id, its path, and its similarity score (higher is better)."""

    id: int
    path: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class Stats:
    """What a database holds."""

    path: str
    images: int
    skipped: int
    staged: int
    distinct_contents: int
    bits_per_image: int | None
    bytes_per_image: float | None
    model: str | None
    codec: str | None
    codec_trained_on: int | None
    database_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


class Database:
    """A semdb database: one SQLite file (or SQLAlchemy URL), one model, one codec."""

    def __init__(
        self,
        location: str | os.PathLike[str],
        *,
        model: str | None = None,
        codec: str | None = None,
        bits: int | None = None,
        device: str | None = None,
        create: bool = True,
        encoder: Encoder | None = None,
    ) -> None:
        location = os.fspath(location)
        if "://" in location:
            self.url = location
            self.path: Path | None = None
        else:
            self.path = Path(location).expanduser()
            if not self.path.exists():
                if not create:
                    raise DatabaseNotFoundError(
                        f"database {self.path} does not exist; create it with `semdb ingest PATH --db {self.path}`"
                    )
                if not self.path.parent.is_dir():
                    raise InvalidArgumentError(f"folder {self.path.parent} does not exist; create it first")
            self.url = f"sqlite:///{self.path}"
        self.device = device
        self._encoder = encoder
        self._index: SearchIndex | None = None
        self._codec_cache: tuple[int, Codec] | None = None
        # Validate before the store exists, so that a mistake never leaves an empty database behind.
        if bits is not None:
            check_bits(bits)
        if codec is not None:
            codec_class(codec)  # raises with the valid names
        self.store = Store(self.url)
        self._bind(model if model is not None else (encoder.spec if encoder is not None else None), codec, bits)

    # --- settings -------------------------------------------------------------------------------

    def _settings(self, session: Session) -> dict[str, str]:
        return dict(session.execute(select(Setting.key, Setting.value)).all())

    def _bind(self, model: str | None, codec: str | None, bits: int | None) -> None:
        """Record the model, codec and bits on first use; refuse different ones afterwards.

        The codec and bits may still change until the codec is trained (nothing is coded yet).
        """
        with self.store.transaction() as session:
            settings = self._settings(session)
            stored_model = settings.get("model")
            if model is not None and stored_model is not None and model != stored_model:
                raise ModelMismatchError(
                    f"database {self.location} was built with model {stored_model!r}, not {model!r}; "
                    f"omit --model or pass --model {stored_model}"
                )
            record = self._latest_codec(session)
            trained = {"codec": record.name, "bits_per_image": str(record.bits_per_image)} if record else {}
            wanted = {"codec": codec, "bits_per_image": str(bits) if bits is not None else None}
            for key, value in wanted.items():
                stored = trained.get(key, settings.get(key))
                if value is None or value == stored:
                    continue
                if key in trained:
                    raise ModelMismatchError(
                        f"database {self.location} already uses {key.replace('_', ' ')} {stored}, not {value}; "
                        "a database has one codec: use another --db for another setting"
                    )
                session.merge(Setting(key=key, value=value))
            if model is not None and stored_model is None:
                session.merge(Setting(key="model", value=model))
            if "generation" not in settings:
                session.merge(Setting(key="generation", value="0"))

    @staticmethod
    def _latest_codec(session: Session) -> CodecRecord | None:
        """The codec in use: the most recently trained one (None before training)."""
        return session.scalars(select(CodecRecord).order_by(CodecRecord.id.desc()).limit(1)).first()

    @property
    def location(self) -> str:
        """The database file path, or its URL."""
        return str(self.path) if self.path is not None else self.url

    def setting(self, key: str) -> str | None:
        """One stored setting (``model``, ``codec``, ``bits_per_image``, ``generation``...)."""
        with self.store.session() as session:
            setting = session.get(Setting, key)
            return setting.value if setting is not None else None

    @property
    def model_spec(self) -> str:
        """The model the database is bound to (the default model if nothing is bound yet)."""
        return self.setting("model") or DEFAULT_MODEL

    @staticmethod
    def _bump_generation(session: Session) -> None:
        current = session.get(Setting, "generation")
        if current is None:
            session.add(Setting(key="generation", value="1"))
        else:
            current.value = str(int(current.value) + 1)

    # --- model and codec ------------------------------------------------------------------------

    @property
    def encoder(self) -> Encoder:
        """The bound model, loaded on first use."""
        if self._encoder is None:
            self._encoder = load_encoder(self.model_spec, device=self.device)
        return self._encoder

    def _codec_state(self) -> CodecState:
        with self.store.session() as session:
            settings = self._settings(session)
            record = self._latest_codec(session)
        name = settings.get("codec", DEFAULT_CODEC)
        bits = int(settings.get("bits_per_image", DEFAULT_BITS))
        if record is None:
            return CodecState(name, bits, None, None)
        return CodecState(record.name, record.bits_per_image, self._load_codec(record), record.id)

    def _load_codec(self, record: CodecRecord) -> Codec:
        if self._codec_cache is None or self._codec_cache[0] != record.id:
            self._codec_cache = (record.id, load_codec(record.name, record.state))
        return self._codec_cache[1]

    # --- ingest ---------------------------------------------------------------------------------

    def ingest(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        prune: bool = False,
        progress: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        train_size: int = DEFAULT_TRAIN_SIZE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> IngestReport:
        """Ingest image files and folders (recursively); bad files are skipped and reported.

        ``train_size``: embeddings staged before the codec is trained (it is also trained when the
        ingest ends with fewer).
        """
        if not paths:
            raise InvalidArgumentError("nothing to ingest: give at least one file or folder")
        if batch_size < 1 or train_size < 1 or max_pixels < 1:
            raise InvalidArgumentError("batch size, train size and max pixels must be positive")
        encoder = self.encoder
        with self.store.transaction() as session:
            stored_dim = session.get(Setting, "dim")
            if stored_dim is not None and int(stored_dim.value) != encoder.dim:
                raise ModelMismatchError(
                    f"model {encoder.spec} gives {encoder.dim}-d embeddings; database {self.location} holds "
                    f"{stored_dim.value}-d ones"
                )
            session.merge(Setting(key="dim", value=str(encoder.dim)))
            session.merge(Setting(key="model", value=encoder.spec))
        ingestor = Ingestor(
            self.store,
            encoder,
            self._codec_state(),
            batch_size=batch_size,
            train_size=train_size,
            max_pixels=max_pixels,
            on_change=self._bump_generation,
        )
        roots = resolve_roots(paths)
        if not progress:
            report = ingestor.run(roots, prune=prune)
        else:
            from semdb.progress import ingest_progress

            with ingest_progress() as (advance, set_total):
                report = ingestor.run(roots, prune=prune, progress=advance, set_total=set_total)
        self._index = None
        return report

    # --- search ---------------------------------------------------------------------------------

    def _store_tag(self, session: Session) -> str:
        settings = self._settings(session)
        record_id = session.scalar(select(func.max(CodecRecord.id)))
        return f"generation={settings.get('generation', '0')};codec={record_id}"

    def index(self) -> SearchIndex:
        """The search index, from memory, from the cache file if its tag matches, or rebuilt."""
        with self.store.session() as session:
            tag = self._store_tag(session)
            if self._index is not None and self._index.tag == tag:
                return self._index
            staged_rows = session.execute(
                select(ImageRecord.id, StagedEmbedding.embedding)
                .join(StagedEmbedding, StagedEmbedding.content_id == ImageRecord.content_id)
                .where(ImageRecord.status == STATUS_INDEXED)
                .order_by(ImageRecord.id)
            ).all()
            dim = int(self._settings(session).get("dim", 0))
            cached = load_cache(cache_path(self.path), tag) if self.path is not None else None
            if cached is None:
                rows = session.execute(
                    select(ImageRecord.id, Code.code)
                    .join(Code, Code.content_id == ImageRecord.content_id)
                    .where(ImageRecord.status == STATUS_INDEXED)
                    .order_by(ImageRecord.id)
                ).all()
        staged_ids = np.array([row[0] for row in staged_rows], dtype=np.int64)
        staged = np.frombuffer(b"".join(row[1] for row in staged_rows), dtype=np.float32).reshape(len(staged_rows), dim)
        coded_index: CosineIndex | None
        if cached is not None:
            coded_index, coded_ids = cached
        else:
            # Only a rebuild needs the codec itself (deserialised from the store).
            codec = self._codec_state().codec
            code_size = codec.code_size if codec is not None else 0
            coded_ids = np.array([row[0] for row in rows], dtype=np.int64)
            codes = np.frombuffer(b"".join(row[1] for row in rows), dtype=np.uint8).reshape(len(rows), code_size)
            coded_index = codec.cosine_index(codes) if codec is not None and len(codes) else None
        self._index = SearchIndex(tag, coded_index, coded_ids, flat_index(staged), staged_ids)
        if cached is None and self.path is not None:
            # The cache is an optimisation: a read-only folder must not break search.
            with contextlib.suppress(OSError):
                save_cache(self._index, cache_path(self.path), mode=self.path.stat().st_mode & 0o666)
        return self._index

    def search_vectors(self, queries: np.ndarray, k: int = 10) -> list[list[SearchResult]]:
        """Search with ready-made query embeddings ``(q, d)`` float32; one best-first list per query."""
        if k < 1:
            raise InvalidArgumentError(f"k must be at least 1, got {k}")
        index = self.index()
        if index.size == 0:
            raise NotReadyError(f"database {self.location} has no searchable images yet; run `semdb ingest` first")
        scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
        with self.store.session() as session:
            paths = dict(
                session.execute(select(ImageRecord.id, ImageRecord.path).where(ImageRecord.id.in_(wanted))).all()
            )
        return [
            [
                SearchResult(int(image_id), paths[int(image_id)], float(score))
                for score, image_id in zip(row_scores, row_ids, strict=True)
                if image_id >= 0 and int(image_id) in paths
            ]
            for row_scores, row_ids in zip(scores, ids, strict=True)
        ]

    def _check_model(self) -> None:
        if self.setting("model") is None:
            raise NotReadyError(f"database {self.location} is empty; run `semdb ingest PATH --db {self.location}`")

    def search(self, query: str, k: int = 10) -> list[SearchResult]:
        """Text → the ``k`` most similar images, best first."""
        if not query.strip():
            raise InvalidArgumentError("empty query: give some text to search for")
        self._check_model()
        return self.search_vectors(self.encoder.encode_texts([query]), k)[0]

    def search_image(self, path: str | os.PathLike[str], k: int = 10) -> list[SearchResult]:
        """Image → the ``k`` most similar images, best first."""
        self._check_model()
        image = load_image(path)
        return self.search_vectors(self.encoder.encode_images([image]), k)[0]

    # --- stats ----------------------------------------------------------------------------------

    def stats(self) -> Stats:
        """Counts, bits per image, model and codec."""
        with self.store.session() as session:
            settings = self._settings(session)

            def count(statement: Any) -> int:
                return int(session.scalar(statement) or 0)

            images = count(select(func.count()).select_from(ImageRecord).where(ImageRecord.status == STATUS_INDEXED))
            skipped = count(select(func.count()).select_from(ImageRecord).where(ImageRecord.status == STATUS_SKIPPED))
            staged = count(select(func.count()).select_from(StagedEmbedding))
            contents = count(select(func.count()).select_from(Content))
            record = self._latest_codec(session)
        bits = (
            record.bits_per_image
            if record
            else (int(settings["bits_per_image"]) if "bits_per_image" in settings else None)
        )
        database_bytes = 0
        if self.path is not None:
            for suffix in ("", "-wal"):
                candidate = self.path.with_name(self.path.name + suffix)
                if candidate.exists():
                    database_bytes += candidate.stat().st_size
        return Stats(
            path=self.location,
            images=images,
            skipped=skipped,
            staged=staged,
            distinct_contents=contents,
            bits_per_image=bits,
            bytes_per_image=bits / 8 if bits else None,
            model=settings.get("model"),
            codec=record.name if record else settings.get("codec"),
            codec_trained_on=record.trained_on if record else None,
            database_bytes=database_bytes,
        )

    def skipped(self) -> list[tuple[str, str]]:
        """Every file recorded as skipped, with its reason."""
        with self.store.session() as session:
            return [
                (path, error or "")
                for path, error in session.execute(
                    select(ImageRecord.path, ImageRecord.error).where(ImageRecord.status == STATUS_SKIPPED)
                ).all()
            ]

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` result (``"ok"`` when healthy)."""
        with self.store.engine.connect() as connection:
            return str(connection.execute(text("PRAGMA integrity_check")).scalar())

    def close(self) -> None:
        """Release the database connections."""
        self.store.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def connect(
    location: str | os.PathLike[str] | None = None,
    *,
    model: str | None = None,
    codec: str | None = None,
    bits: int | None = None,
    device: str | None = None,
    create: bool = True,
    encoder: Encoder | None = None,
) -> Database:
    """Open (or create) a semdb database.

    ``location``: a file path (default ``$SEMDB_DB`` or ``./semdb.semdb``) or a SQLAlchemy URL.
    ``model``/``codec``/``bits`` bind a new database and must match an existing one.
    ``encoder``: an already-loaded encoder (e.g. a fake one in tests), used instead of ``model``.
    """
    return Database(
        location if location is not None else default_database_path(),
        model=model,
        codec=codec,
        bits=bits,
        device=device,
        create=create,
        encoder=encoder,
    )
