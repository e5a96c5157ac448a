"""Inverted lists: coarse centroids trained with the codec, and each embedding's list.

The centroids live in the embedding space (``(lists, d)`` float32, unit rows: spherical k-means),
so a code's list is assigned once, at coding time, from the float embedding that is gone
afterwards, and a query probes the lists of its nearest centroids by inner product
(:class:`semdb.index.fastscan.FastScan`). Stored as ``codecs.lists`` and ``codes.list_no``.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from semdb.errors import DatabaseDamagedError

# k-means wants ~40 training points per centroid; fewer lists than this are not worth probing.
POINTS_PER_LIST = 40
MIN_LISTS = 16
MAX_LISTS = 4096


def list_count(n_train: int) -> int:
    """Lists to train on ``n_train`` embeddings: a power of two up to ``n_train / 40`` (0: none)."""
    most = min(MAX_LISTS, n_train // POINTS_PER_LIST)
    if most < MIN_LISTS:
        return 0
    return int(2 ** int(np.log2(most)))


def train_lists(embeddings: np.ndarray, seed: int = 0, lists: int | None = None) -> np.ndarray | None:
    """Spherical k-means centroids ``(lists, d)`` float32 of ``embeddings`` ``(n, d)``; None when too
    few. ``lists``: how many (default :func:`list_count`)."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    lists = list_count(len(x)) if lists is None else lists
    if not lists:
        return None
    kmeans = faiss.Kmeans(x.shape[1], lists, niter=20, spherical=True, seed=seed, verbose=False)
    kmeans.train(x)
    trained: Any = kmeans.centroids
    return np.asarray(trained, dtype=np.float32)


def assign_lists(centroids: np.ndarray | None, embeddings: np.ndarray) -> np.ndarray | None:
    """The list of each of ``embeddings`` ``(n, d)``: ``(n,)`` int64 index of its nearest centroid
    by inner product (None when there are no centroids)."""
    if centroids is None:
        return None
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    nearest: np.ndarray = index.search(np.ascontiguousarray(embeddings, dtype=np.float32), 1)[1][:, 0]
    return nearest.astype(np.int64)


def lists_to_bytes(centroids: np.ndarray | None) -> bytes | None:
    """What ``codecs.lists`` stores: the float32 centroids row by row (None: no lists)."""
    return None if centroids is None else np.ascontiguousarray(centroids, dtype="<f4").tobytes()


def lists_from_bytes(blob: bytes | None, dim: int) -> np.ndarray | None:
    """Inverse of :func:`lists_to_bytes` for a ``dim``-d codec; a blob of the wrong size is damage."""
    if blob is None:
        return None
    row = 4 * dim
    if not blob or len(blob) % row or len(blob) // row > MAX_LISTS:
        raise DatabaseDamagedError(
            f"the database is damaged: codecs.lists holds {len(blob)} bytes, not lists x {dim} floats"
        )
    centroids = np.frombuffer(blob, dtype="<f4").reshape(-1, dim).astype(np.float32)
    if not np.isfinite(centroids).all():
        raise DatabaseDamagedError("the database is damaged: codecs.lists holds non-finite values")
    return centroids
