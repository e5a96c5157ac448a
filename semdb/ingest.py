"""Ingest: files → decoded images → embeddings → codes, one transaction per batch.

The pipeline reads, hashes and decodes the next batch on a worker thread while the model encodes
the current one. Every batch is committed atomically, so a killed ingest resumes where it stopped:
committed files are recognised as unchanged (size + mtime) and nothing is stored twice (paths and
content hashes are unique). Until the codec is trained, embeddings are staged in the database; the
codec is trained once ``train_size`` embeddings are staged or when the ingest ends, and then the
staged embeddings are coded and deleted in the same transaction.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import TypeVar

import numpy as np
from PIL import Image
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from semdb.codecs import Codec, train_codec
from semdb.encoder import Encoder
from semdb.errors import ImageReadError
from semdb.images import ORIGINAL_SIZE_KEY, BadFile, FoundFile, decode_image, file_sha256, find_images, read_bytes
from semdb.store import (
    STATUS_INDEXED,
    STATUS_SKIPPED,
    Code,
    CodecRecord,
    Content,
    ImageRecord,
    StagedEmbedding,
    Store,
)

T = TypeVar("T")
DEFAULT_BATCH_SIZE = 64
# Enough points for FAISS k-means to train 256 centroids per sub-quantiser without warnings.
DEFAULT_TRAIN_SIZE = 10_000


@dataclass
class IngestReport:
    """What an ingest run did."""

    added: int = 0
    unchanged: int = 0
    duplicates: int = 0
    updated: int = 0
    pruned: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    codec_trained_on: int | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready summary."""
        return {
            "added": self.added,
            "unchanged": self.unchanged,
            "duplicates": self.duplicates,
            "updated": self.updated,
            "pruned": self.pruned,
            "skipped": [{"path": path, "reason": reason} for path, reason in self.skipped],
            "codec_trained_on": self.codec_trained_on,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class _Prepared:
    """A file read, hashed and decoded (or the reason it could not be)."""

    found: FoundFile
    sha256: str | None = None
    image: Image.Image | None = None
    error: str | None = None


class CodecState:
    """The database's codec choice and, once trained, the codec itself."""

    def __init__(self, name: str, bits_per_image: int, codec: Codec | None, record_id: int | None) -> None:
        self.name = name
        self.bits_per_image = bits_per_image
        self.codec = codec
        self.record_id = record_id


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _prepare(found: FoundFile, max_pixels: int, min_side: int | None) -> _Prepared:
    try:
        data = read_bytes(found.path)
        sha = file_sha256(data)
        return _Prepared(found, sha, decode_image(data, max_pixels, min_side=min_side))
    except ImageReadError as error:
        return _Prepared(found, error=str(error))


def _prepare_batch(batch: Sequence[FoundFile], max_pixels: int, min_side: int | None) -> list[_Prepared]:
    return [_prepare(found, max_pixels, min_side) for found in batch]


class Ingestor:
    """Runs one ingest over a store with an encoder and the database's codec state."""

    def __init__(
        self,
        store: Store,
        encoder: Encoder,
        codec_state: CodecState,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        train_size: int = DEFAULT_TRAIN_SIZE,
        max_pixels: int,
        on_change: Callable[[Session], None],
    ) -> None:
        self.store = store
        self.encoder = encoder
        self.codec_state = codec_state
        self.batch_size = batch_size
        self.train_size = train_size
        self.max_pixels = max_pixels
        # JPEGs can be decoded straight at a fraction of their size (DCT scaling); twice the model's
        # input side keeps the resize that follows as sharp as from the full image.
        input_side = getattr(encoder, "image_size", None)
        self.min_side = 2 * input_side if isinstance(input_side, int) else None
        # Called inside every write transaction (bumps the store generation the index cache is tagged with).
        self.on_change = on_change
        self.report = IngestReport()

    def run(
        self,
        roots: Sequence[str | os.PathLike[str]],
        prune: bool = False,
        progress: Callable[[int], None] | None = None,
        set_total: Callable[[int], None] | None = None,
    ) -> IngestReport:
        """Ingest ``roots`` (files and folders); see the module docstring."""
        started = time.perf_counter()
        found = list(find_images(roots))
        with self.store.session() as session:
            known = {
                row.path: (row.size, row.mtime_ns, row.status, row.error)
                for row in session.execute(
                    select(
                        ImageRecord.path, ImageRecord.size, ImageRecord.mtime_ns, ImageRecord.status, ImageRecord.error
                    )
                )
            }
        bad = [item for item in found if isinstance(item, BadFile)]
        candidates: list[FoundFile] = []
        for item in found:
            if isinstance(item, FoundFile):
                previous = known.get(item.path)
                if previous is not None and previous[:2] == (item.size, item.mtime_ns):
                    if previous[2] == STATUS_SKIPPED:
                        # Still bad: report it again (without re-reading it) so every run lists it.
                        self.report.skipped.append((item.path, previous[3] or ""))
                    else:
                        self.report.unchanged += 1
                else:
                    candidates.append(item)
        if set_total is not None:
            set_total(len(candidates))
        if bad:
            with self.store.transaction() as session:
                for item in bad:
                    self._record_skip(session, item.path, item.reason, None)
                self.on_change(session)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="semdb-decode") as pool:
            batches = _chunks(candidates, self.batch_size)
            first = next(batches, None)
            pending = pool.submit(_prepare_batch, first, self.max_pixels, self.min_side) if first else None
            while pending is not None:
                prepared = pending.result()
                following = next(batches, None)
                pending = pool.submit(_prepare_batch, following, self.max_pixels, self.min_side) if following else None
                self._commit_batch(prepared)
                if progress is not None:
                    progress(len(prepared))

        self.finish_training()
        if prune:
            self._prune(roots)
        self._delete_orphans()
        if self.report.codec_trained_on is not None:
            # The staged float embeddings (d × 4 bytes each) were just deleted: give their pages back,
            # or the file stays the size of a float index.
            self.store.compact()
        self.report.seconds = time.perf_counter() - started
        return self.report

    def _record_skip(
        self,
        session: Session,
        path: str,
        reason: str,
        found: FoundFile | None,
        records: dict[str, ImageRecord] | None = None,
    ) -> None:
        self.report.skipped.append((path, reason))
        if records is not None:
            record = records.get(path)
        else:
            record = session.scalar(select(ImageRecord).where(ImageRecord.path == path))
        if record is None:
            record = ImageRecord(path=path)
            session.add(record)
        record.status = STATUS_SKIPPED
        record.error = reason
        record.content_id = None
        record.size = found.size if found else None
        record.mtime_ns = found.mtime_ns if found else None

    def _commit_batch(self, prepared: list[_Prepared]) -> None:
        """Encode what is new in ``prepared`` and commit the whole batch in one transaction."""
        good = [item for item in prepared if item.error is None]
        with self.store.session() as session:
            hashes = sorted({item.sha256 for item in good if item.sha256})
            existing = dict(session.execute(select(Content.sha256, Content.id).where(Content.sha256.in_(hashes))).all())
        to_encode: dict[str, _Prepared] = {}
        for item in good:
            assert item.sha256 is not None  # set whenever error is None
            if item.sha256 not in existing and item.sha256 not in to_encode:
                to_encode[item.sha256] = item
        images = [item.image for item in to_encode.values() if item.image is not None]
        embeddings = self.encoder.encode_images(images) if images else None
        codec = self.codec_state.codec
        codes = codec.encode(embeddings) if codec is not None and embeddings is not None else None

        with self.store.transaction() as session:
            content_ids = dict(existing)
            new_contents = {
                sha: Content(sha256=sha, width=width, height=height)
                for sha, item in to_encode.items()
                if item.image is not None
                for width, height in [item.image.info.get(ORIGINAL_SIZE_KEY, item.image.size)]
            }
            session.add_all(new_contents.values())
            session.flush()  # one round trip assigns every new content its id
            for row, (sha, content) in enumerate(new_contents.items()):
                assert embeddings is not None
                content_ids[sha] = content.id
                if codes is not None:
                    session.add(
                        Code(content_id=content.id, codec_id=self.codec_state.record_id, code=codes[row].tobytes())
                    )
                else:
                    session.add(StagedEmbedding(content_id=content.id, embedding=embeddings[row].tobytes()))
            paths = [item.found.path for item in prepared]
            records = {
                record.path: record
                for record in session.scalars(select(ImageRecord).where(ImageRecord.path.in_(paths)))
            }
            for item in prepared:
                if item.error is not None:
                    self._record_skip(session, item.found.path, item.error, item.found, records)
                    continue
                assert item.sha256 is not None
                self._record_image(
                    session,
                    item,
                    content_ids[item.sha256],
                    newly_encoded=item.sha256 in to_encode,
                    record=records.get(item.found.path),
                )
            self.on_change(session)
            if self.codec_state.codec is None:
                staged_count = session.scalar(select(func.count()).select_from(StagedEmbedding)) or 0
                if staged_count >= self.train_size:
                    self._train_and_code_staged(session)

    def _record_image(
        self, session: Session, item: _Prepared, content_id: int, newly_encoded: bool, record: ImageRecord | None
    ) -> None:
        if record is None:
            record = ImageRecord(path=item.found.path)
            session.add(record)
            if newly_encoded:
                self.report.added += 1
            else:
                self.report.duplicates += 1
        elif record.content_id == content_id and record.status == STATUS_INDEXED:
            self.report.unchanged += 1  # touched (new mtime) but same content
        else:
            self.report.updated += 1
        record.content_id = content_id
        record.status = STATUS_INDEXED
        record.error = None
        record.size = item.found.size
        record.mtime_ns = item.found.mtime_ns

    def finish_training(self) -> None:
        """Train the codec on whatever is staged, if it is not trained yet."""
        if self.codec_state.codec is not None:
            return
        with self.store.transaction() as session:
            if session.scalar(select(func.count()).select_from(StagedEmbedding)):
                self._train_and_code_staged(session)
                self.on_change(session)

    def _train_and_code_staged(self, session: Session) -> None:
        """Train the codec on every staged embedding, code them and delete the staging (same transaction)."""
        rows = session.execute(select(StagedEmbedding.content_id, StagedEmbedding.embedding)).all()
        content_ids = [row.content_id for row in rows]
        embeddings = np.frombuffer(b"".join(row.embedding for row in rows), dtype=np.float32).reshape(len(rows), -1)
        codec = train_codec(self.codec_state.name, embeddings, self.codec_state.bits_per_image)
        record = CodecRecord(
            name=codec.name,
            bits_per_image=codec.bits_per_image,
            dim=codec.dim,
            state=codec.to_bytes(),
            trained_on=len(rows),
        )
        session.add(record)
        session.flush()
        codes = codec.encode(embeddings)
        session.add_all(
            Code(content_id=content_id, codec_id=record.id, code=code.tobytes())
            for content_id, code in zip(content_ids, codes, strict=True)
        )
        session.execute(delete(StagedEmbedding))
        self.codec_state.codec = codec
        self.codec_state.record_id = record.id
        self.report.codec_trained_on = len(rows)

    def _prune(self, roots: Sequence[str | os.PathLike[str]]) -> None:
        """Forget images under ``roots`` whose files are gone from disk."""
        prefixes = [os.path.abspath(os.fspath(root)) for root in roots]
        with self.store.transaction() as session:
            gone = [
                image_id
                for image_id, path in session.execute(select(ImageRecord.id, ImageRecord.path)).all()
                if any(path == prefix or path.startswith(prefix.rstrip(os.sep) + os.sep) for prefix in prefixes)
                and not os.path.lexists(path)
            ]
            for start in range(0, len(gone), 500):
                session.execute(delete(ImageRecord).where(ImageRecord.id.in_(gone[start : start + 500])))
            if gone:
                self.on_change(session)
        self.report.pruned = len(gone)

    def _delete_orphans(self) -> None:
        """Delete contents (and their codes) no image refers to any more."""
        with self.store.transaction() as session:
            referenced = select(ImageRecord.content_id).where(ImageRecord.content_id.is_not(None))
            result = session.execute(delete(Content).where(Content.id.not_in(referenced)))
            if getattr(result, "rowcount", 0):
                # Codes and staged rows go with their content (ON DELETE CASCADE); be explicit for
                # databases opened without foreign-key enforcement.
                session.execute(delete(Code).where(Code.content_id.not_in(select(Content.id))))
                session.execute(delete(StagedEmbedding).where(StagedEmbedding.content_id.not_in(select(Content.id))))
                self.on_change(session)


def resolve_roots(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Expand ``~`` in user-given paths."""
    return [os.path.expanduser(os.fspath(path)) for path in paths]


__all__ = ["CodecState", "IngestReport", "Ingestor", "resolve_roots"]
