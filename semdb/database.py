"""The Python API: ``semdb.connect(path)`` → :class:`Database` (ingest, search, stats).

A database is bound to one model and one codec, recorded in its settings on first use; a later
request for another model or codec is refused with :class:`ModelMismatchError` rather than answered
with nonsense. The CLI is a thin shell over this module.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from semdb.arguments import image_id as checked_image_id
from semdb.arguments import whole_number
from semdb.codec_file import codec_file_model, parse_report, read_codec_file, write_codec_file
from semdb.codecs import Codec, codec_class, load_codec
from semdb.codecs.base import check_bits
from semdb.codecs.choice import TrainedCodec, train_for_database
from semdb.encoder import DEFAULT_MODEL, Encoder, load_encoder
from semdb.errors import (
    DatabaseDamagedError,
    DatabaseNotFoundError,
    InvalidArgumentError,
    ModelMismatchError,
    NotReadyError,
    SchemaVersionError,
)
from semdb.images import DEFAULT_MAX_PIXELS, load_image
from semdb.index import SearchIndex, cache_path, current_index
from semdb.ingest import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_TRAIN_SIZE,
    BatchWriter,
    CodecChoice,
    Ingestor,
    IngestReport,
    resolve_roots,
)
from semdb.store import CodecRow, Counts, Repository, Store
from semdb.store.client_cache import client_cache_path
from semdb.store.postgres import display_url
from semdb.store.repository import ImageDetails

if TYPE_CHECKING:
    from PIL import Image

    from semdb.query import Query
    from semdb.text_tower import TextEncoder
from semdb.vocabulary import query_sample

# No codec here spends more than a byte per embedding dimension; this bound is checked before a
# model is loaded, the exact one (8 bits per dimension of the model's embeddings) right after.
MAX_BITS_PER_IMAGE = 16_384
DEFAULT_DB_FILENAME = "semdb.semdb"
FILTER_CACHE_SIZE = 8  # filters whose allowed ids are kept (issue 13)
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
    # Why the codec was chosen and what its codes keep (semdb.codecs.choice); None before one exists.
    codec_report: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


class Database:
    """A semdb database: one SQLite file (or SQLAlchemy URL), one model, one codec.

    Opening never writes: an existing database is opened read-only (so a read-only file can be
    searched, and a file that is not semdb's is refused untouched); a new one is created, and an
    old one migrated, by the first :meth:`ingest`.
    """

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
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        location = os.fspath(location)
        self.url = location if "://" in location else None
        self.path: Path | None = None if self.url is not None else Path(location).expanduser()
        self.device = device
        self.on_wait = on_wait
        self._encoder = encoder
        self._text_encoder: TextEncoder | None = None
        self._filtered: dict[tuple[str, str], np.ndarray] = {}
        self._index: SearchIndex | None = None
        self._index_version: int | None = None  # the store's data_version when _index was current
        self._older_schema: SchemaVersionError | None = None
        self._cache_file: Path | None = None
        self._codecs: dict[int, Codec] = {}
        # The embedding dimension once the database records one (it never changes after).
        self._search_dim: int | None = None
        # Validate before anything is opened, so that a mistake never leaves a database behind.
        if bits is not None:
            check_bits(bits)
            if bits > MAX_BITS_PER_IMAGE:
                raise InvalidArgumentError(
                    f"--bits {bits} is more than any codec can use (at most {MAX_BITS_PER_IMAGE}); "
                    "codes of 32 to 256 bits are the useful range"
                )
        if codec is not None:
            codec_class(codec)  # raises with the valid names
        self._wanted = {
            "model": model if model is not None else (encoder.spec if encoder is not None else None),
            "codec": codec,
            "bits_per_image": str(bits) if bits is not None else None,
        }
        self._store: Store | None = None
        if self.path is not None and (not self.path.exists() or (create and _is_empty_file(self.path))):
            if not create:
                raise DatabaseNotFoundError(
                    f"database {self.path} does not exist; create it with `semdb ingest PATH --db {self.path}`"
                )
            if not self.path.parent.is_dir():
                raise InvalidArgumentError(f"folder {self.path.parent} does not exist; create it first")
            return
        try:
            self._store = Store.open(location)
        except SchemaVersionError as error:
            if not (error.older and create):
                raise
            # An older schema: the first ingest migrates it; until then a search says so.
            self._older_schema = error
            return
        except NotReadyError:
            if not (create and self.url is not None):
                raise
            return  # an empty server database: the first ingest creates the tables
        with self._store.reading() as repository:
            self._check_binding(repository)

    # --- settings -------------------------------------------------------------------------------

    def _check_binding(self, repository: Repository) -> dict[str, str]:
        """Refuse a model, codec or bits other than the database's; returns the settings to record.

        The codec and bits may still change until the codec is trained (nothing is coded yet).
        """
        settings = repository.settings()
        model = self._wanted["model"]
        stored_model = settings.get("model")
        if model is not None and stored_model is not None and model != stored_model:
            raise ModelMismatchError(
                f"database {self.location} was built with model {stored_model!r}, not {model!r}; "
                f"omit --model or pass --model {stored_model}"
            )
        active = repository.active_codec()
        trained = {"codec": active.name, "bits_per_image": str(active.bits_per_image)} if active else {}
        to_record: dict[str, str] = {}
        for key in ("codec", "bits_per_image"):
            value = self._wanted[key]
            if value is None or value == trained.get(key, settings.get(key)):
                continue
            if key in trained:
                raise ModelMismatchError(
                    f"database {self.location} already uses {key.replace('_', ' ')} {trained[key]}, not {value}; "
                    "a database has one codec: use another --db for another setting"
                )
            to_record[key] = value
        return to_record

    @property
    def location(self) -> str:
        """The database file path, or its URL (without the password)."""
        return str(self.path) if self.path is not None else display_url(str(self.url))

    @property
    def store(self) -> Store | None:
        """The open store (None until a new database is first written)."""
        return self._store

    def setting(self, key: str) -> str | None:
        """One stored setting (``model``, ``codec``, ``bits_per_image``, ``generation``...)."""
        if self._store is None:
            return None
        with self._store.reading() as repository:
            return repository.setting(key)

    @property
    def model_spec(self) -> str:
        """The model the database is bound to (else the one asked for, else the default model)."""
        return self.setting("model") or self._wanted["model"] or DEFAULT_MODEL

    # --- model and codec ------------------------------------------------------------------------

    @property
    def encoder(self) -> Encoder:
        """The bound model, loaded on first use."""
        if self._encoder is None:
            self._encoder = load_encoder(self.model_spec, device=self.device)
        return self._encoder

    def _load_codec(self, row: CodecRow) -> Codec:
        """The stored codec ``row``, deserialised once per process and checked against its record."""
        if row.id not in self._codecs:
            codec = load_codec(row.name, row.state, bits_per_image=row.bits_per_image)
            if (codec.dim, codec.bits_per_image) != (row.dim, row.bits_per_image):
                raise DatabaseDamagedError(
                    f"{self.location} is damaged: codec {row.id} says {row.dim}-d at {row.bits_per_image} bits, "
                    f"its state is {codec.dim}-d at {codec.bits_per_image} bits"
                )
            self._codecs[row.id] = codec
        return self._codecs[row.id]

    # --- ingest ---------------------------------------------------------------------------------

    def _writable_store(self) -> Store:
        """The store opened for writing: created, or migrated, here if need be."""
        if self._store is None or not self._store.writable:
            store = Store.open(self.url or str(self.path), write=True, create=True, on_wait=self.on_wait)
            if self._store is not None:
                self._store.close()
            self._store = store
            self._index_version = None  # another connection's data_version: not comparable
            self._older_schema = None  # migrated on opening for writing
        self._store.on_wait = self.on_wait
        return self._store

    def ingest(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        prune: bool = False,
        progress: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        train_size: int = DEFAULT_TRAIN_SIZE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        ray: bool | str = False,
        actors: int | None = None,
        codec_file: str | os.PathLike[str] | None = None,
        fidelity: float | None = None,
    ) -> IngestReport:
        """Ingest image files and folders (one path or several; folders recursively).

        Bad files are skipped and reported. ``train_size``: embeddings staged before the codec is
        trained (it is also trained when the ingest ends with fewer). ``codec_file``: a codec
        written by :meth:`export_codec` (or shipped), used from the first batch instead of training
        one. ``fidelity``: with no bits given, code at the smallest rate whose text→image fidelity
        on the staged images reaches it (``--bits auto``). Every argument is checked, and every path
        must exist, before anything is read or created.

        ``ray``: run the work on a Ray cluster — ``True`` for ``$RAY_ADDRESS`` or a new local cluster,
        or the cluster's address — with ``actors`` encoder actors (default: one per GPU, else one);
        the database must then be one every worker reaches (PostgreSQL, or a file on this machine).
        """
        if batch_size < 1 or train_size < 1 or max_pixels < 1 or (actors is not None and actors < 1):
            raise InvalidArgumentError("batch size, train size, max pixels and actors must be positive")
        if fidelity is not None and not 0 < fidelity <= 1:
            raise InvalidArgumentError(f"--fidelity must be a share of the float top-10 in (0, 1], got {fidelity}")
        if fidelity is not None and self._wanted["bits_per_image"] is not None:
            raise InvalidArgumentError("--fidelity F chooses the rate: give it with --bits auto, not --bits N")
        roots = resolve_roots(paths)
        # A database that records its model and dimension needs the model only for files to encode:
        # it is loaded (and its dimension checked) when the first one is found, so that a run over
        # unchanged files never loads it. A new database, a codec file or Ray need it now.
        recorded_dim = self._recorded_dim()
        if (
            codec_file is not None
            and self._encoder is None
            and self._wanted["model"] is None
            and self.setting("model") is None
        ):
            self._wanted["model"] = codec_file_model(codec_file)  # a new database takes its codec file's model
        deferred = self._encoder is None and recorded_dim is not None and codec_file is None and ray is False
        encoder = None if deferred else self.encoder
        spec, dim = (self.model_spec, recorded_dim) if encoder is None else (encoder.spec, encoder.dim)
        assert dim is not None
        shipped = self._shipped_codec(codec_file, encoder) if codec_file is not None and encoder is not None else None
        bits = self._wanted["bits_per_image"]
        if bits is not None and int(bits) > 8 * dim:
            raise InvalidArgumentError(
                f"--bits {bits} is more than {spec}'s {dim}-d embeddings can use "
                f"(at most {8 * dim}, one byte per dimension)"
            )
        store = self._writable_store()
        with store.writing() as repository:
            to_record = self._check_binding(repository)
            settings = repository.settings()
            stored_dim = repository.int_setting("dim")
            if stored_dim is not None and stored_dim != dim:
                raise self._dim_mismatch(spec, dim, stored_dim)
            stored_bits = repository.int_setting("bits_per_image")
            if "model" not in settings:
                to_record["model"] = spec
            if "dim" not in settings:
                to_record["dim"] = str(dim)
            if to_record:
                repository.set_settings(to_record)
            settings.update(to_record)
        report = IngestReport()
        choice = CodecChoice(
            settings.get("codec"),
            int(to_record.get("bits_per_image") or stored_bits or 0) or None,
            shipped,
        )
        writer = self.batch_writer(choice, train_size=train_size, report=report, dim=dim, fidelity=fidelity)
        if ray is not False:
            return self._ingest_on_ray(roots, writer, ray, actors, prune, progress, batch_size, train_size, max_pixels)

        def load_encoder() -> Encoder:
            loaded = self.encoder
            if loaded.dim != dim:
                raise self._dim_mismatch(loaded.spec, loaded.dim, dim)
            return loaded

        ingestor = Ingestor(store, encoder or load_encoder, writer, batch_size=batch_size, max_pixels=max_pixels)
        if not progress:
            ingestor.run(roots, prune=prune)
        else:
            from semdb.progress import ingest_progress

            with ingest_progress() as (advance, set_total):
                ingestor.run(roots, prune=prune, progress=advance, set_total=set_total)
        return report

    def _recorded_dim(self) -> int | None:
        """The embedding dimension the database records with its model, if it records both."""
        if self._store is None:
            return None
        with self._store.reading() as repository:
            if repository.setting("model") is None:
                return None
            return repository.int_setting("dim")

    def _dim_mismatch(self, spec: str, dim: int, stored_dim: int) -> ModelMismatchError:
        return ModelMismatchError(
            f"model {spec} gives {dim}-d embeddings; database {self.location} holds {stored_dim}-d ones"
        )

    def batch_writer(
        self,
        choice: CodecChoice,
        *,
        train_size: int,
        report: IngestReport,
        dim: int | None = None,
        fidelity: float | None = None,
    ) -> BatchWriter:
        """The writer of ingest batches into this database (the store opened for writing); ``dim``:
        the embeddings' dimension (default: the encoder's, which loads the model); ``fidelity``: see
        :meth:`ingest`. The codec it trains is weighted by the query sample of this database's model."""
        return BatchWriter(
            self._writable_store(),
            choice,
            train_size=train_size,
            dim=self.encoder.dim if dim is None else dim,
            train_codec=lambda name, embeddings, bits: train_for_database(
                embeddings,
                codec=name,
                bits=bits,
                fidelity=fidelity,
                queries=lambda limit: query_sample(self.encoder, limit),
            ),
            load_codec=self._load_codec,
            report=report,
        )

    # --- distributed ingest (issue 12) ------------------------------------------------------------

    def _ingest_on_ray(
        self,
        roots: list[str],
        writer: BatchWriter,
        ray: bool | str,
        actors: int | None,
        prune: bool,
        progress: bool,
        batch_size: int,
        train_size: int,
        max_pixels: int,
    ) -> IngestReport:
        """:meth:`ingest` on a Ray cluster (see :mod:`semdb.ingest.distributed`)."""
        from semdb.ingest.distributed import run_on_ray

        options: dict[str, Any] = {
            "address": ray if isinstance(ray, str) and ray else None,
            "actors": actors,
            "batch_size": batch_size,
            "train_size": train_size,
            "max_pixels": max_pixels,
            "prune": prune,
        }
        if not progress:
            return run_on_ray(self, roots, writer, **options)
        from semdb.progress import ingest_progress

        with ingest_progress() as (advance, set_total):
            return run_on_ray(self, roots, writer, progress=advance, set_total=set_total, **options)

    def add_embeddings(
        self,
        paths: Sequence[str | os.PathLike[str]],
        vectors: np.ndarray,
        *,
        train_size: int = DEFAULT_TRAIN_SIZE,
    ) -> IngestReport:
        """Import precomputed embeddings ``vectors`` ``(n, d)`` of the images at ``paths`` (issue 10).

        The vectors must come from the database's model (``model=`` at connect, else the default);
        they are normalised, coded and indexed exactly as an ingest would (:mod:`semdb.ingest.bulk`).
        """
        from semdb.ingest.bulk import check_embeddings, import_embeddings

        absolute, unit = check_embeddings(paths, vectors)
        if train_size < 1:
            raise InvalidArgumentError("train size must be positive")
        dim = unit.shape[1]
        store = self._writable_store()
        with store.writing() as repository:
            to_record = self._check_binding(repository)
            stored_dim = repository.int_setting("dim")
            if stored_dim is not None and stored_dim != dim:
                raise ModelMismatchError(f"vectors are {dim}-d; database {self.location} holds {stored_dim}-d ones")
            settings = repository.settings()
            to_record.setdefault("model", settings.get("model") or self.model_spec)
            to_record.setdefault("dim", str(dim))
            repository.set_settings({key: value for key, value in to_record.items() if settings.get(key) != value})
            settings.update(to_record)
        report = IngestReport()
        writer = self.batch_writer(
            CodecChoice(settings.get("codec"), int(settings.get("bits_per_image") or 0) or None),
            train_size=train_size,
            report=report,
            dim=dim,
        )
        import_embeddings(writer, absolute, unit)
        if report.codec_trained_on is not None:
            store.compact()  # the staged floats are gone: give their pages back (as ingest does)
        return report

    # --- search ---------------------------------------------------------------------------------

    def index(self) -> SearchIndex:
        """The search index of the database's current state (see :func:`semdb.index.current_index`)."""
        if self._store is None:
            if self._older_schema is not None:
                raise self._older_schema
            return SearchIndex("", [], None, np.empty(0, np.int64))
        cache_file = cache_path(self.path) if self.path is not None else self._client_cache_file()
        previous = self._index
        # Unchanged file, unchanged index: no transaction at all (read before the index is, so that a
        # commit landing meanwhile makes the next call look again).
        version = self._store.data_version()
        if previous is not None and version is not None and version == self._index_version:
            return previous
        try:
            self._index = current_index(self._store, previous, cache_file, self._load_codec)
            self._index_version = version
        except BaseException:
            # Catching up changes the earlier index's fast scan in place: never reuse one half caught up.
            self._index = None
            raise
        return self._index

    def _client_cache_file(self) -> Path:
        """Where the index cache of a server database lives on this machine (see :mod:`semdb.store.client_cache`)."""
        if self._cache_file is None:
            assert self._store is not None and self.url is not None
            with self._store.reading() as repository:
                database_id = repository.setting("database_id") or ""
            self._cache_file = client_cache_path(self.url, database_id)
        return self._cache_file

    def search_vectors(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        allowed: np.ndarray | None = None,
        exact: bool = False,
        nprobe: int | None = None,
        image_queries: bool = False,
    ) -> list[list[SearchResult]]:
        """Search with ready-made query embeddings ``(q, d)`` float32; one best-first list per query.

        ``allowed``: sorted int64 image ids the scan is restricted to (None: all); ``exact``: the
        proven-exact cosine scan instead of the fast scan with exact re-rank (see :mod:`semdb.index`);
        ``nprobe``: inverted lists the fast scan probes on large collections (more: slower, closer to
        exact; default :data:`semdb.index.fastscan.DEFAULT_NPROBE`); ``image_queries``: the queries
        are image embeddings (search by image), scored through the codec's item path where it has
        one (the default codec's second decoder, ``docs/codecs.md`` §11j) — text embeddings otherwise.
        """
        if nprobe is not None and nprobe < 1:
            raise InvalidArgumentError(f"nprobe must be at least 1, got {nprobe}")
        k = whole_number(k, "k (results per query)", low=1)
        index = self.index()
        if index.size == 0 or self._store is None:
            raise NotReadyError(f"database {self.location} has no searchable images yet; run `semdb ingest` first")
        scores, ids = index.search(
            self._checked_queries(queries),
            k,
            allowed=allowed,
            exact=exact,
            image_queries=image_queries,
            **({"nprobe": nprobe} if nprobe is not None else {}),
        )
        with self._store.reading() as repository:
            paths = repository.image_paths(int(i) for i in ids.ravel() if i >= 0)
        return [
            [
                # Rounding in float32 can put a cosine a hair beyond ±1 (a code shared by two images).
                SearchResult(int(image_id), paths[int(image_id)], max(-1.0, min(1.0, float(score))))
                for score, image_id in zip(row_scores, row_ids, strict=True)
                if image_id >= 0 and int(image_id) in paths
            ]
            for row_scores, row_ids in zip(scores, ids, strict=True)
        ]

    def _checked_queries(self, queries: np.ndarray) -> np.ndarray:
        """``queries`` as a C-contiguous ``(q, d)`` float32 array of finite values, ``d`` the dimension
        the database records; a one-line error otherwise."""
        array = np.asarray(queries, dtype=np.float32)
        if self._search_dim is None:
            self._search_dim = self._recorded_dim()
        dim = self._search_dim
        if array.ndim != 2 or (dim is not None and array.shape[1] != dim):
            raise InvalidArgumentError(
                f"queries must be a (q, {dim if dim is not None else 'd'}) array of the database's embeddings, "
                f"got shape {array.shape}"
            )
        if not np.isfinite(array).all():
            raise InvalidArgumentError("queries contain NaN or infinite values; pass finite embeddings")
        return np.ascontiguousarray(array)

    def _check_model(self) -> None:
        if self.setting("model") is None:
            raise NotReadyError(f"database {self.location} is empty; run `semdb ingest PATH --db {self.location}`")

    def search(
        self,
        query: str,
        k: int = 10,
        *,
        offset: int = 0,
        under: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] = (),
        modified_after: str | None = None,
        modified_before: str | None = None,
        min_width: int | None = None,
        min_height: int | None = None,
        min_score: float | None = None,
        exact: bool = False,
    ) -> list[SearchResult]:
        """Text → the ``k`` most similar images, best first (llm's ``similar()`` in one call).

        The keyword filters are those of :class:`semdb.query.Query`, which this builds; the text is
        taken literally (use :meth:`query` for the ``+``/``-`` query language).
        """
        from semdb.query import Query

        # One folder (a str or a path), several, or None: what Query.under is given is checked there.
        folders: list[Any] = list(under) if isinstance(under, list | tuple) else [under] if under else []
        built = Query(database=self).text(query).limit(k).offset(offset).under(*folders).exact(exact)
        if modified_after is not None or modified_before is not None:
            built = built.modified(modified_after, modified_before)
        if min_width is not None or min_height is not None:
            built = built.min_size(min_width, min_height)
        if min_score is not None:
            built = built.min_score(min_score)
        return built.results()

    def search_image(
        self, image: str | os.PathLike[str] | Image.Image, k: int = 10, *, exact: bool = False
    ) -> list[SearchResult]:
        """Image (a file path or a decoded PIL image) → the ``k`` most similar images, best first
        (``exact``: see :meth:`search_vectors`)."""
        return self.search_vectors(self.image_vector(image)[None, :], k, exact=exact, image_queries=True)[0]

    # --- issue 13: the query type, and what it needs of the database ----------------------------

    def query(self, expression: str | None = None, *, allow_paths: bool = True) -> Query:
        """A :class:`~semdb.query.Query` bound to this database, with the terms of ``expression``
        (``"red dress + 0.5:beach - night"``, ``"id:42"``, an image path); chain filters, then
        ``.results()``: ``db.query("a dog").under("~/Pictures").limit(20).results()``."""
        from semdb.query import Query

        built = Query(database=self)
        return built.parse(expression, allow_paths=allow_paths) if expression is not None else built

    @property
    def text_encoder(self) -> TextEncoder:
        """What encodes text queries: the loaded model if there is one, else its text tower alone
        (:func:`semdb.text_tower.load_text_encoder`), loaded on first use."""
        if self._encoder is not None:
            return self._encoder
        if self._text_encoder is None:
            self._check_model()
            from semdb.text_tower import has_text_tower, load_text_encoder

            if not has_text_tower(self.model_spec):
                return self.encoder  # loaded once, for texts and images alike
            self._text_encoder = load_text_encoder(self.model_spec, device=self.device)
        return self._text_encoder

    def image_vector(self, image: str | os.PathLike[str] | Image.Image) -> np.ndarray:
        """The model's ``(d,)`` float32 embedding of an image file or a decoded PIL image."""
        from PIL import Image

        if not isinstance(image, str | os.PathLike | Image.Image):
            raise InvalidArgumentError(f"an image is a file path or a PIL image, got {type(image).__name__}")
        self._check_model()
        picture = load_image(image) if isinstance(image, str | os.PathLike) else image
        return np.asarray(self.encoder.encode_images([picture])[0], dtype=np.float32)

    def stored_vector(self, image_id: int) -> np.ndarray:
        """What image ``image_id`` is searched as: its stored code decoded by the codec that made
        it (or its staged embedding), ``(d,)`` float32; the file is not read."""
        if self._store is None:
            raise NotReadyError(f"database {self.location} is empty; run `semdb ingest PATH --db {self.location}`")
        with self._store.reading() as repository:
            source = repository.stored_vector_source(checked_image_id(image_id))
            dim = repository.int_setting("dim", 0) or 0
            row = repository.codec(source[0]) if source is not None and source[0] is not None else None
        if source is None:
            raise InvalidArgumentError(f"no image with id {image_id} is searchable in {self.location}")
        codec_id, blob = source
        if codec_id is None:
            if len(blob) != 4 * dim:
                raise DatabaseDamagedError(f"{self.location} is damaged: image {image_id}'s staged embedding")
            return np.frombuffer(blob, dtype=np.float32).copy()
        if row is None:
            raise DatabaseDamagedError(f"{self.location} is damaged: image {image_id}'s codec is not stored")
        codec = self._load_codec(row)
        code = np.frombuffer(blob, dtype=np.uint8)[None, :]
        if code.shape[1] != codec.code_size:
            raise DatabaseDamagedError(f"{self.location} is damaged: image {image_id}'s code has the wrong length")
        # The item path's reconstruction where the codec has one: it is fitted to the item itself,
        # where the text path's is fitted to what text queries see of it.
        decoded = codec.item_vectors(code) if codec.has_item_path else None
        return np.asarray((decoded if decoded is not None else codec.decode(code))[0], dtype=np.float32)

    def filtered_ids(self, **filters: Any) -> np.ndarray:
        """Sorted ids of the indexed images passing ``filters`` (see
        :meth:`~semdb.store.repository.Repository.filtered_image_ids`)."""
        if self._store is None:
            return np.empty(0, np.int64)
        with self._store.reading() as repository:
            # Kept per store state: "load more" and a query refined under the same filters reuse
            # the ids (at 1M images, one folder of 100,000 took 1.3 s to read from SQLite under load).
            key = (repository.state_tag(), repr(sorted(filters.items())))
            if key not in self._filtered:
                if len(self._filtered) >= FILTER_CACHE_SIZE:
                    self._filtered.pop(next(iter(self._filtered)))
                self._filtered[key] = repository.filtered_image_ids(**filters)
            return self._filtered[key]

    def image_details(self, image_ids: Sequence[int]) -> dict[int, ImageDetails]:
        """image id → path bytes, mtime, pixel size and content sha256, for indexed images."""
        if self._store is None:
            return {}
        with self._store.reading() as repository:
            return repository.image_details(image_ids)

    # --- stats ----------------------------------------------------------------------------------

    def stats(self) -> Stats:
        """Counts, bits per image, model and codec."""
        settings: dict[str, str] = {}
        counts = Counts(0, 0, 0, 0)
        active = None
        stored_bits = None
        report = None
        if self._store is not None:
            with self._store.reading() as repository:
                settings = repository.settings()
                counts = repository.counts()
                active = repository.active_codec()
                stored_bits = repository.int_setting("bits_per_image")
                report = repository.codec_report(active.id) if active else None
        bits = active.bits_per_image if active else stored_bits
        database_bytes = self._store.size_bytes() if self._store is not None else 0
        return Stats(
            path=self.location,
            images=counts.indexed,
            skipped=counts.skipped,
            staged=counts.staged,
            distinct_contents=counts.contents,
            bits_per_image=bits,
            bytes_per_image=bits / 8 if bits else None,
            model=settings.get("model"),
            codec=active.name if active else settings.get("codec"),
            codec_trained_on=active.trained_on if active else None,
            database_bytes=database_bytes,
            codec_report=parse_report(report),
        )

    # --- codec files (issue 11) -----------------------------------------------------------------

    def export_codec(self, path: str | os.PathLike[str]) -> None:
        """Write the database's codec, its model spec and report to ``path`` (:mod:`semdb.codec_file`)."""
        if self._store is None:
            raise NotReadyError(f"database {self.location} is empty; run `semdb ingest PATH --db {self.location}`")
        with self._store.reading() as repository:
            active = repository.active_codec()
            report = repository.codec_report(active.id) if active else None
            model = repository.setting("model")
        if active is None or model is None:
            raise NotReadyError(f"database {self.location} has no codec yet; ingest more images first")
        write_codec_file(path, self._load_codec(active), model=model, report=parse_report(report) or {})

    def _shipped_codec(self, path: str | os.PathLike[str], encoder: Encoder) -> TrainedCodec:
        """The codec in file ``path``, refused unless it was made for ``encoder``'s model and matches
        the codec and bits this database is bound to or asked for."""
        shipped = read_codec_file(path, model=encoder.spec, dim=encoder.dim)
        codec = shipped.codec
        if self._store is not None:
            with self._store.reading() as repository:
                active = repository.active_codec()
            if active is not None and active.state != codec.to_bytes():
                raise ModelMismatchError(
                    f"database {self.location} already has its codec; --codec-file is for a new database: "
                    "use another --db"
                )
        for key, value in (("codec", shipped.report.get("codec")), ("bits_per_image", str(codec.bits_per_image))):
            wanted = self._wanted[key] or self.setting(key)
            if wanted is not None and wanted != value:
                raise ModelMismatchError(
                    f"codec file {os.fspath(path)} holds {value} for {key.replace('_', ' ')}, not {wanted}: "
                    "drop --codec/--bits or use another --db"
                )
        return shipped

    def skipped(self) -> list[tuple[str, str]]:
        """Every file recorded as skipped, with its reason."""
        if self._store is None:
            return []
        with self._store.reading() as repository:
            return repository.skipped()

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` result (``"ok"`` when healthy)."""
        return self._store.integrity_check() if self._store is not None else "ok"

    def migrate(self) -> None:
        """Bring the database's schema up to this semdb's (what the first ingest also does)."""
        self._writable_store()

    def close(self) -> None:
        """Release the database connections."""
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _is_empty_file(path: Path) -> bool:
    """A 0-byte file: a database another ingest is creating right now, or one made with ``touch``."""
    try:
        return path.is_file() and path.stat().st_size == 0
    except OSError:
        return False


def connect(
    location: str | os.PathLike[str] | None = None,
    *,
    model: str | None = None,
    codec: str | None = None,
    bits: int | None = None,
    device: str | None = None,
    create: bool = True,
    encoder: Encoder | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> Database:
    """Open (or create) a semdb database.

    ``location``: a file path (default ``$SEMDB_DB`` or ``./semdb.semdb``) or a SQLAlchemy URL.
    ``model``/``codec``/``bits`` bind a new database and must match an existing one.
    ``encoder``: an already-loaded encoder (e.g. a fake one in tests), used instead of ``model``.
    ``on_wait``: called with a message when a write has queued behind another writer for a while.
    Opening writes nothing; the first :meth:`Database.ingest` creates or upgrades the database.
    """
    return Database(
        location if location is not None else default_database_path(),
        model=model,
        codec=codec,
        bits=bits,
        device=device,
        create=create,
        encoder=encoder,
        on_wait=on_wait,
    )
