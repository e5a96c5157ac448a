"""The search index: FAISS over the stored codes, cached next to the database.

The index is derived data. It is built from the store (codes of indexed images, plus any embeddings
still staged before the codec is trained), written atomically to ``<database>.index`` and tagged
with the store's generation and codec; a cache whose tag does not match is rebuilt. Deleting the
cache file loses nothing.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from semdb.cosine import CosineIndex, CosinePart


@dataclass
class SearchIndex:
    """FAISS indexes over the searchable images, and the image ids of their rows.

    ``coded`` searches the codes by cosine to their reconstructions (``coded_ids``: ``(n,)`` int64
    image ids); ``staged`` is an exact inner-product index over the unit-norm float embeddings not
    yet coded (``staged_ids``: ``(m,)`` int64).
    """

    tag: str
    coded: CosineIndex | None
    coded_ids: np.ndarray
    staged: faiss.Index | None
    staged_ids: np.ndarray

    @property
    def size(self) -> int:
        """Number of searchable rows."""
        return len(self.coded_ids) + len(self.staged_ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``queries``: ``(q, d)`` float32 → ``(scores, ids)``, both ``(q, k')`` with ``k' = min(k, size)``.

        Scores are cosines for unit-norm queries (to the reconstruction of a coded image, to the
        embedding of a staged one), best first; ids are image ids.
        """
        k = min(k, self.size)
        parts_scores: list[np.ndarray] = []
        parts_ids: list[np.ndarray] = []
        for index, ids in ((self.coded, self.coded_ids), (self.staged, self.staged_ids)):
            if index is None or len(ids) == 0:
                continue
            scores, rows = index.search(queries, min(k, len(ids)))
            parts_scores.append(scores)
            parts_ids.append(np.where(rows >= 0, ids[np.maximum(rows, 0)], -1))
        if not parts_scores:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores = np.concatenate(parts_scores, axis=1)
        ids = np.concatenate(parts_ids, axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def flat_index(embeddings: np.ndarray) -> faiss.Index | None:
    """An exact inner-product index over ``embeddings`` ``(m, d)`` float32 (None when ``m == 0``)."""
    if len(embeddings) == 0:
        return None
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return index


def cache_path(database_path: Path) -> Path:
    """Where the index cache of a database file lives."""
    return database_path.with_name(database_path.name + ".index")


def save_cache(index: SearchIndex, path: Path, mode: int = 0o644) -> None:
    """Write the coded part of ``index`` to ``path`` atomically (temp file + rename).

    ``mode``: the file's permissions; callers pass the database file's, so that whoever may read
    the database may read its cache (a temp file would otherwise stay owner-only, 0600).
    """
    if index.coded is None:
        path.unlink(missing_ok=True)
        return
    parts = index.coded.parts
    arrays: dict[str, np.ndarray] = {
        "tag": np.frombuffer(index.tag.encode(), dtype=np.uint8),
        "ids": index.coded_ids,
        "part_sizes": np.array([len(part.rows) for part in parts], dtype=np.int64),
        "part_rows": np.concatenate([part.rows for part in parts]),
        # An empty array stands for None: reconstructions already unit-norm.
        "inverse_norms": np.concatenate(
            [part.inverse_norms if part.inverse_norms is not None else np.empty(0, np.float32) for part in parts]
        ),
    }
    for number, part in enumerate(parts):
        arrays[f"index_{number}"] = faiss.serialize_index(part.index)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    descriptor, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(buffer.getvalue())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_cache(path: Path, tag: str) -> tuple[CosineIndex, np.ndarray] | None:
    """The cached coded index and its ids if ``path`` holds one tagged ``tag``; None otherwise.

    A missing, unreadable or stale cache is not an error: the caller rebuilds it.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            if bytes(archive["tag"]).decode() != tag:
                return None
            ids = archive["ids"].astype(np.int64)
            sizes = archive["part_sizes"].astype(np.int64)
            starts = np.cumsum(sizes)[:-1]
            rows = np.split(archive["part_rows"].astype(np.int64), starts)
            inverse_norms = archive["inverse_norms"].astype(np.float32)
            indexes = [faiss.deserialize_index(archive[f"index_{number}"]) for number in range(len(sizes))]
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
    if sizes.sum() != len(ids) or len(inverse_norms) not in (0, len(ids)):
        return None
    if any(index.ntotal != size for index, size in zip(indexes, sizes, strict=True)):
        return None
    inverse = np.split(inverse_norms, starts) if len(inverse_norms) else [None] * len(sizes)
    parts = [CosinePart(*part) for part in zip(indexes, rows, inverse, strict=True)]
    return CosineIndex(parts), ids
