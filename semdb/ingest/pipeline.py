"""Ingest: files → decoded images → embeddings → codes, one transaction per batch.

The pipeline reads, hashes and decodes the next batch on a worker thread while the model encodes
the current one; :class:`~semdb.ingest.writer.BatchWriter` commits each batch atomically under the
database's write lock. A killed ingest resumes where it stopped: committed files are recognised
as unchanged (size + mtime) and nothing is stored twice (paths and content hashes are unique).
Until the codec is trained, embeddings are staged in the database; the codec is trained once
``train_size`` embeddings are staged or when the ingest ends — by exactly one writer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import TypeVar, cast

import numpy as np

from semdb.encoder import Encoder
from semdb.errors import ImageReadError, InvalidArgumentError
from semdb.images import (
    ORIGINAL_SIZE_KEY,
    BadFile,
    FoundFile,
    decode_image,
    file_sha256,
    find_images,
    read_bytes,
)
from semdb.ingest.report import IngestReport
from semdb.ingest.writer import BatchWriter, Prepared
from semdb.paths import display_path
from semdb.store import STATUS_SKIPPED, Store

T = TypeVar("T")
DEFAULT_BATCH_SIZE = 64
# Enough points for FAISS k-means to train 256 centroids per sub-quantiser without warnings.
DEFAULT_TRAIN_SIZE = 10_000
# Found files whose stored records are looked up at a time (one read snapshot each).
LOOKUP_CHUNK = 1000


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def prepare(found: FoundFile, max_pixels: int, min_side: int | None) -> Prepared:
    """Read, hash and decode one file; a bad file gives its reason instead of raising."""
    item = Prepared(found.path, found.size, found.mtime_ns)
    try:
        data = read_bytes(found.path)
        item.sha256 = file_sha256(data)
        image = decode_image(data, max_pixels, min_side=min_side)
    except ImageReadError as error:
        item.sha256 = None
        item.error = str(error)
        return item
    item.image = image
    item.original_size = tuple(image.info.get(ORIGINAL_SIZE_KEY, image.size))
    return item


def prepare_batch(batch: Sequence[FoundFile], max_pixels: int, min_side: int | None) -> list[Prepared]:
    """:func:`prepare` each file of a batch."""
    return [prepare(found, max_pixels, min_side) for found in batch]


class Ingestor:
    """Runs one ingest over a store with an encoder, committing through a :class:`BatchWriter`."""

    def __init__(
        self,
        store: Store,
        encoder: Encoder | Callable[[], Encoder],
        writer: BatchWriter,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_pixels: int,
    ) -> None:
        """``encoder``: the model, or a function that loads it — called once, when the first file
        needs reading, so that a run over unchanged files never loads the model."""
        self.store = store
        self._encoder: Encoder | None = None
        self._load_encoder: Callable[[], Encoder] | None = None
        if callable(getattr(encoder, "encode_images", None)):
            self._encoder = cast(Encoder, encoder)
        else:
            self._load_encoder = cast(Callable[[], Encoder], encoder)
        self.writer = writer
        self.report = writer.report
        self.batch_size = batch_size
        self.max_pixels = max_pixels

    @property
    def encoder(self) -> Encoder:
        """The model (loaded on first use)."""
        if self._encoder is None:
            assert self._load_encoder is not None
            self._encoder = self._load_encoder()
        return self._encoder

    @property
    def min_side(self) -> int | None:
        """The side JPEGs are decoded at, at least: they can be decoded straight at a fraction of their
        size (DCT scaling); twice the model's input side keeps the resize that follows as sharp as
        from the full image."""
        input_side = getattr(self.encoder, "image_size", None)
        return 2 * input_side if isinstance(input_side, int) else None

    def run(
        self,
        roots: Sequence[str],
        prune: bool = False,
        progress: Callable[[int], None] | None = None,
        set_total: Callable[[int], None] | None = None,
    ) -> IngestReport:
        """Ingest ``roots`` (absolute paths of files and folders); see the module docstring."""
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="semdb-decode") as pool:
            batches = _chunks(self._candidates(roots, set_total), self.batch_size)
            first = next(batches, None)
            pending = pool.submit(prepare_batch, first, self.max_pixels, self.min_side) if first else None
            while pending is not None:
                prepared = pending.result()
                following = next(batches, None)
                pending = pool.submit(prepare_batch, following, self.max_pixels, self.min_side) if following else None
                self._commit(prepared)
                if progress is not None:
                    progress(len(prepared))

        self.writer.finish_training()
        if prune:
            self._prune(roots)
        self.writer.delete_orphans()
        if self.report.codec_trained_on is not None:
            # The staged float embeddings (d × 4 bytes each) were just deleted: give their pages back,
            # or the file stays the size of a float index.
            self.store.compact()
        self.report.seconds = time.perf_counter() - started
        return self.report

    def _candidates(self, roots: Sequence[str], set_total: Callable[[int], None] | None) -> Iterator[FoundFile]:
        """The files to read, streamed: the walk is taken :data:`LOOKUP_CHUNK` paths at a time, each
        chunk's bad paths recorded and its known files checked against the stored records (by the
        indexed path column), so memory holds one chunk, not every file on disk or in the database.
        ``set_total`` hears the count found so far, growing as the walk goes on."""
        total = 0
        for chunk in _chunks(find_images(roots), LOOKUP_CHUNK):
            self.writer.record_bad_paths([(item.path, item.reason) for item in chunk if isinstance(item, BadFile)])
            changed = self._changed([item for item in chunk if isinstance(item, FoundFile)])
            total += len(changed)
            if set_total is not None and changed:
                set_total(total)
            yield from changed

    def _changed(self, files: list[FoundFile]) -> list[FoundFile]:
        """The files that are new or changed since they were stored (size or mtime)."""
        candidates: list[FoundFile] = []
        for chunk in _chunks(files, LOOKUP_CHUNK):
            with self.store.reading() as repository:
                known = repository.images_by_path(item.path for item in chunk)
            for item in chunk:
                previous = known.get(item.path)
                if previous is None or (previous.size, previous.mtime_ns) != (item.size, item.mtime_ns):
                    candidates.append(item)
                elif previous.status == STATUS_SKIPPED:
                    # Still bad: report it again (without re-reading it) so every run lists it.
                    self.report.skipped.append((display_path(item.path), previous.error or ""))
                else:
                    self.report.unchanged += 1
        return candidates

    def _commit(self, prepared: list[Prepared]) -> None:
        """Encode the contents of ``prepared`` not stored yet, then commit the batch."""
        hashes = {item.sha256 for item in prepared if item.sha256 is not None and item.error is None}
        with self.store.reading() as repository:
            stored = repository.content_ids(hashes)
        to_encode: dict[str, Prepared] = {}
        for item in prepared:
            if item.error is None and item.sha256 is not None and item.sha256 not in stored:
                to_encode.setdefault(item.sha256, item)
        embeddings = self._embed(to_encode) if to_encode else {}
        refused = {sha: item.error for sha, item in to_encode.items() if item.error is not None}
        for item in prepared:
            if item.error is None and item.sha256 in refused:
                item.error = refused[item.sha256]  # a copy, under another path, of a file the model refused
            item.image = None  # the pixels are not needed past this point
        self.writer.commit(prepared, embeddings)

    def _embed(self, to_encode: dict[str, Prepared]) -> dict[str, np.ndarray]:
        """sha256 → ``(d,)`` embedding of each item, as one batch; if the batch fails, one image at a
        time, so that an image the model's preprocessing refuses is skipped with the reason (its
        ``error`` set) instead of failing the batch. An error every image meets is raised."""
        items = list(to_encode.values())
        try:
            vectors = self.encoder.encode_images([item.image for item in items if item.image is not None])
            return dict(zip(to_encode, vectors, strict=True))
        except Exception as batch_error:
            embeddings: dict[str, np.ndarray] = {}
            for sha, item in to_encode.items():
                try:
                    embeddings[sha] = self.encoder.encode_images([item.image] if item.image is not None else [])[0]
                except Exception as error:
                    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    item.error = f"the model could not take this image: {message}"
            if not embeddings:
                raise batch_error
            return embeddings

    def _prune(self, roots: Sequence[str]) -> None:
        """Forget images under ``roots`` whose files are gone from disk."""
        gone: list[int] = []
        for root in roots:
            # Page by page (by id), each page in its own snapshot: memory holds one page of records.
            after = 0
            while True:
                with self.store.reading() as repository:
                    page = repository.images_under_page(root, after, LOOKUP_CHUNK)
                if not page:
                    break
                gone.extend(image_id for image_id, path in page if not os.path.lexists(path))
                after = page[-1][0]
        self.writer.forget(sorted(set(gone)))
        self.report.pruned = len(set(gone))


def resolve_roots(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[str]:
    """User-given paths (one, or several) → absolute paths with ``~`` expanded.

    Raises :class:`InvalidArgumentError` naming every path that does not exist, before any work.
    """
    if isinstance(paths, str | bytes | os.PathLike):
        paths = [paths]
    roots = [os.path.abspath(os.path.expanduser(os.fsdecode(path))) for path in paths]
    if not roots:
        raise InvalidArgumentError("nothing to ingest: give at least one file or folder")
    missing = [display_path(root) for root in roots if not os.path.lexists(root)]
    if missing:
        raise InvalidArgumentError(f"no such file or folder: {', '.join(missing)}; check the path")
    return roots
