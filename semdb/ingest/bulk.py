"""Bulk import of precomputed embeddings: ``Database.add_embeddings(paths, vectors)``.

Each ``(path, vector)`` becomes an image record whose content is the vector itself (its identity
is the sha256 of the float32 bytes, so the same vector under two paths is stored once), committed
through the ingest's own :class:`~semdb.ingest.writer.BatchWriter`: the same staging, once-only
codec training, inverted-list assignment and change tracking as a folder ingest, without decoding
or encoding any image. A path that exists on disk keeps its size and mtime, so a later ingest of its
folder sees it as unchanged; one that does not is recorded without them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np

from semdb.errors import InvalidArgumentError
from semdb.ingest.writer import BatchWriter, Prepared

BULK_BATCH = 10_000  # rows per write transaction


def embedding_sha256(vector: np.ndarray) -> str:
    """The content identity of an imported embedding: sha256 of a tag and its float32 bytes."""
    return hashlib.sha256(b"semdb-embedding\0" + np.ascontiguousarray(vector, dtype="<f4").tobytes()).hexdigest()


def check_embeddings(paths: Sequence[str | os.PathLike[str]], vectors: np.ndarray) -> tuple[list[str], np.ndarray]:
    """``paths`` as absolute strings and ``vectors`` as unit-norm ``(n, d)`` float32, or a one-line error."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim != 2 or len(array) != len(paths):
        raise InvalidArgumentError(
            f"vectors must be an (n, d) array with one row per path: got shape {array.shape} for {len(paths)} paths"
        )
    if not np.isfinite(array).all():
        raise InvalidArgumentError("vectors contain NaN or infinite values; pass finite embeddings")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if (norms == 0).any():
        raise InvalidArgumentError("a vector is all zeros; every embedding needs a direction")
    absolute = [os.path.abspath(os.path.expanduser(os.fsdecode(path))) for path in paths]
    if len(set(absolute)) != len(absolute):
        raise InvalidArgumentError("a path is given twice; give each image once")
    return absolute, np.ascontiguousarray(array / norms, dtype=np.float32)


def import_embeddings(writer: BatchWriter, paths: list[str], vectors: np.ndarray, batch: int = BULK_BATCH) -> None:
    """Commit ``vectors`` ``(n, d)`` (unit-norm) under ``paths`` through ``writer``, ``batch`` rows a transaction."""
    for start in range(0, len(paths), batch):
        items: list[Prepared] = []
        embeddings: dict[str, np.ndarray] = {}
        for path, vector in zip(paths[start : start + batch], vectors[start : start + batch], strict=True):
            size: int | None = None
            mtime_ns: int | None = None
            try:
                status = os.stat(path)
                size, mtime_ns = int(status.st_size), int(status.st_mtime_ns)
            except OSError:
                pass  # no file (yet): recorded without size and mtime
            sha = embedding_sha256(vector)
            items.append(Prepared(path, size, mtime_ns, sha256=sha, original_size=(0, 0)))
            embeddings[sha] = vector
        writer.commit(items, embeddings)
    writer.finish_training()
