"""The write side of ingest: each batch in one transaction under the write lock, and the once-only codec step.

Everything a writer decides from the database's contents — which contents are new, which paths
already have records, whether a codec exists — is decided again inside the write transaction, so
it still holds at commit however many writers run: duplicate content from two writers is
deduplicated, a path is never inserted twice, and the codec is trained by exactly one of them.
A writer that finds a codec trained by another adopts it and codes its own embeddings with it.

Which codec is trained, and at which rate, is decided from the staged embeddings by
:func:`semdb.codecs.choice.train_for_database` (the writer passes the user's choice, or None for
the default); its report — why, and the fidelity measured on a held-out sample — is stored with the
codec. A codec read from a file (:mod:`semdb.codec_file`) is installed by the first batch instead,
so that nothing is staged.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from semdb.codecs import Codec, registry_name
from semdb.codecs.choice import TrainedCodec
from semdb.index.lists import assign_lists, lists_from_bytes, lists_to_bytes, train_lists
from semdb.ingest.report import IngestReport
from semdb.paths import display_path
from semdb.store import STATUS_INDEXED, STATUS_SKIPPED, CodecRow, ImageRow, Repository, Store


@dataclass
class Prepared:
    """A file read, hashed and decoded (or the reason it could not be)."""

    path: str
    size: int | None
    mtime_ns: int | None
    sha256: str | None = None
    image: Image.Image | None = None
    original_size: tuple[int, int] | None = None
    error: str | None = None


@dataclass(frozen=True)
class CodecChoice:
    """The codec a database is to be trained with, when nobody has trained one yet.

    ``name``/``bits_per_image``: None lets :mod:`semdb.codecs.choice` decide. ``shipped``: a codec
    read from a file, with its report, installed as it is instead of training one.
    """

    name: str | None
    bits_per_image: int | None
    shipped: TrainedCodec | None = None


# (codec name or None, staged embeddings (n, d) float32, bits per image or None) → the trained codec
# and its report.
TrainCodec = Callable[[str | None, np.ndarray, int | None], TrainedCodec]
LoadCodec = Callable[[CodecRow], Codec]


class BatchWriter:
    """Commits ingest batches to ``store`` (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        choice: CodecChoice,
        *,
        train_size: int,
        dim: int,
        train_codec: TrainCodec,
        load_codec: LoadCodec,
        report: IngestReport,
    ) -> None:
        self.store = store
        self.choice = choice
        self.train_size = train_size
        self.dim = dim
        self.train_codec = train_codec
        self.load_codec = load_codec
        self.report = report
        self.codec: Codec | None = None
        self.codec_id: int | None = None
        self.lists: np.ndarray | None = None  # the active codec's coarse centroids (lists, d), if any

    # --- the codec --------------------------------------------------------------------------------

    def _adopt(self, repository: Repository) -> None:
        """Use the database's active codec (whoever trained it); None before one exists."""
        row = repository.active_codec() if repository.active_codec_id() != self.codec_id else None
        if row is not None:
            self.codec, self.codec_id = self.load_codec(row), row.id
            self.lists = lists_from_bytes(repository.codec_lists(row.id), row.dim)

    def _train_staged(self, repository: Repository) -> None:
        """Train the codec on every staged embedding, code them and delete the staging.

        Runs inside a write transaction after :meth:`_adopt` found no codec, so no other writer
        can train one at the same time; the unique index on ``codecs.active`` backs that up.
        """
        content_ids, embeddings = repository.staged(self.dim)
        # The database's settings, not this writer's: another writer may have bound them first.
        name = repository.setting("codec") or self.choice.name
        bits = repository.int_setting("bits_per_image") or self.choice.bits_per_image
        trained = self.train_codec(name, embeddings, bits)
        codec = trained.codec
        lists = train_lists(embeddings)  # inverted lists for large collections (semdb.index.lists)
        codec_id = repository.add_active_codec(
            registry_name(codec),
            codec.bits_per_image,
            codec.dim,
            codec.to_bytes(),
            trained_on=len(content_ids),
            lists=lists_to_bytes(lists),
        )
        repository.set_codec_report(codec_id, json.dumps(trained.report))
        self.lists = lists
        repository.add_codes(content_ids.tolist(), codec_id, codec.encode(embeddings), assign_lists(lists, embeddings))
        repository.clear_staged()
        repository.record_change()
        self.codec, self.codec_id = codec, codec_id
        self.report.codec_trained_on = len(content_ids)

    def _install_shipped(self, repository: Repository) -> None:
        """Make the codec read from a file the database's codec (after :meth:`_adopt` found none),
        coding whatever an earlier ingest left staged."""
        shipped = self.choice.shipped
        if shipped is None or self.codec is not None:
            return
        codec = shipped.codec
        codec_id = repository.add_active_codec(
            registry_name(codec), codec.bits_per_image, codec.dim, codec.to_bytes(), trained_on=0
        )
        repository.set_codec_report(codec_id, json.dumps(shipped.report))
        content_ids, embeddings = repository.staged(self.dim)
        if len(content_ids):
            repository.add_codes(content_ids.tolist(), codec_id, codec.encode(embeddings))
            repository.clear_staged()
        repository.record_change()
        self.codec, self.codec_id = codec, codec_id

    def finish_training(self) -> None:
        """Train the codec on whatever is staged, unless one exists (trained here or by another writer).
        With nothing staged there is nothing to do, and the codec is not loaded (an ingest that found
        nothing new needs no codec)."""
        with self.store.writing() as repository:
            if not repository.staged_count():
                return
            self._adopt(repository)
            if self.codec is None:
                self._train_staged(repository)

    # --- batches ----------------------------------------------------------------------------------

    def commit(self, batch: Sequence[Prepared], embeddings: dict[str, np.ndarray]) -> None:
        """Store one batch: ``embeddings`` maps the sha256 of each content this writer encoded to its
        ``(d,)`` float32 embedding; the rest of the batch is already stored or is skipped."""
        with self.store.writing() as repository:
            self._adopt(repository)
            self._install_shipped(repository)
            good = [item for item in batch if item.error is None and item.sha256 is not None]
            content_ids = repository.content_ids(item.sha256 for item in good if item.sha256)
            new: dict[str, Prepared] = {}
            for item in good:
                assert item.sha256 is not None
                if item.sha256 not in content_ids and item.sha256 in embeddings and item.sha256 not in new:
                    new[item.sha256] = item
            added = repository.add_contents([(sha, *(item.original_size or (0, 0))) for sha, item in new.items()])
            content_ids.update(added)
            if added:
                ids = [added[sha] for sha in new]
                vectors = np.stack([embeddings[sha] for sha in new]).astype(np.float32)
                if self.codec is not None and self.codec_id is not None:
                    repository.add_codes(
                        ids, self.codec_id, self.codec.encode(vectors), assign_lists(self.lists, vectors)
                    )
                else:
                    repository.stage(ids, vectors)
            changed = self._save_records(repository, batch, content_ids, set(added))
            if changed:
                repository.record_change()
            if self.codec is None and repository.staged_count() >= self.train_size:
                self._train_staged(repository)

    def _save_records(
        self, repository: Repository, batch: Sequence[Prepared], content_ids: dict[str, int], new: set[str]
    ) -> bool:
        """Insert or update the image record of every item; True if what is searchable changed."""
        records = repository.images_by_path(item.path for item in batch)
        inserts: list[dict[str, object]] = []
        updates: list[dict[str, object]] = []
        changed = False
        for item in batch:
            if item.error is None and item.sha256 is not None and item.sha256 not in content_ids:
                # Stored when this writer looked, deleted by another writer's prune since: nothing to
                # link to. No size or mtime, so that the next run reads the file again.
                item.error = "its content was removed by another ingest while this one ran; run ingest again"
                item.size = item.mtime_ns = None
        for item in batch:
            record = records.get(item.path)
            if item.error is not None or item.sha256 is None:
                reason = item.error or "not decoded"
                self.report.skipped.append((display_path(item.path), reason))
                values: dict[str, object] = {
                    "path": item.path,
                    "content_id": None,
                    "size": item.size,
                    "mtime_ns": item.mtime_ns,
                    "status": STATUS_SKIPPED,
                    "error": reason,
                }
                changed |= record is not None and record.status == STATUS_INDEXED
            else:
                content_id = content_ids[item.sha256]
                values = {
                    "path": item.path,
                    "content_id": content_id,
                    "size": item.size,
                    "mtime_ns": item.mtime_ns,
                    "status": STATUS_INDEXED,
                    "error": None,
                }
                if record is None:
                    if item.sha256 in new:
                        self.report.added += 1
                    else:
                        self.report.duplicates += 1
                elif record.content_id == content_id and record.status == STATUS_INDEXED:
                    self.report.unchanged += 1  # touched (new mtime) but same content
                else:
                    self.report.updated += 1
                changed |= record is None or record.content_id != content_id or record.status != STATUS_INDEXED
            if record is None:
                inserts.append(values)
                records[item.path] = ImageRow(0, item.path, None, None, None, "", None)  # a path twice in a batch
            elif record.id:
                updates.append({**values, "id": record.id})
        repository.add_images(inserts)
        repository.update_images([{key: value for key, value in row.items() if key != "path"} for row in updates])
        return changed

    def record_bad_paths(self, bad: Sequence[tuple[str, str]]) -> None:
        """Record paths the folder walk could not use, ``(path, reason)``; only what differs is written."""
        if not bad:
            return
        self.report.skipped.extend((display_path(path), reason) for path, reason in bad)
        with self.store.writing() as repository:
            records = repository.images_by_path(path for path, _ in bad)
            inserts = []
            updates = []
            changed = False
            for path, reason in dict(bad).items():
                record = records.get(path)
                values = {"content_id": None, "size": None, "mtime_ns": None, "status": STATUS_SKIPPED, "error": reason}
                if record is None:
                    inserts.append({"path": path, **values})
                elif (record.status, record.error) != (STATUS_SKIPPED, reason):
                    updates.append({"id": record.id, **values})
                    changed |= record.status == STATUS_INDEXED
            repository.add_images(inserts)
            repository.update_images(updates)
            if changed:
                repository.record_change()

    def forget(self, image_ids: Sequence[int]) -> None:
        """Delete image records (pruned files)."""
        if image_ids:
            with self.store.writing() as repository:
                repository.delete_images(image_ids)
                repository.record_change()

    def delete_orphans(self) -> None:
        """Delete contents no image refers to any more, with their codes."""
        with self.store.writing() as repository:
            if repository.delete_orphans():
                repository.record_change()
