"""Exact cosine top-k over codes that FAISS scores by inner product.

A PQ/OPQ/RQ index scores ``<q, x̂>``, where ``x̂`` is the item's reconstruction. Reconstructions are
shorter than the unit-norm embeddings they stand for, and by varying amounts (PQ at 64 bits on CuPL:
norm 0.73–0.77 ± 0.03–0.04), so ranking by inner product lets an item's reconstruction error
reorder the results. Ranking by cosine, ``<q, x̂> / ‖x̂‖``, removes that: on CuPL it lifts PQ's
text→image mAP@100 at 64 bits from .515 to .572 (``docs/codecs.md``).

FAISS has no per-item scale in its code scanners, so :class:`CosineIndex` asks the inner-product
index for ``k' > k`` candidates, rescales them, and proves the answer exact: an item outside the
candidates has ``<q, x̂> ≤ s`` (the k'-th best inner product), so its cosine is at most
``s · max(1/‖x̂‖)`` (for ``s > 0``; ``s · min(1/‖x̂‖)`` otherwise). When the k-th best rescaled
candidate reaches that bound the top k are exact; otherwise ``k'`` grows and the query is searched
again, up to every item.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

# First candidate depth: k' = max(FIRST_DEPTH_FACTOR · k, k + FIRST_DEPTH_EXTRA); it grows 8x a round.
FIRST_DEPTH_FACTOR = 4
FIRST_DEPTH_EXTRA = 64
DEPTH_GROWTH = 8


@dataclass
class CosineIndex:
    """An inner-product index over reconstructions, searched by cosine.

    ``index`` scores ``<q, x̂_i>`` for its ``n`` rows; ``inverse_norms`` ``(n,)`` float32 holds
    ``1 / ‖x̂_i‖``, or is None when the reconstructions are unit-norm already (inner product is
    cosine, and search is one plain FAISS call).
    """

    index: faiss.Index
    inverse_norms: np.ndarray | None

    @property
    def ntotal(self) -> int:
        """Number of rows."""
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``queries`` ``(q, d)`` float32 → ``(scores, rows)``, both ``(q, min(k, n))``, best first.

        Scores are ``<q, x̂> / ‖x̂‖`` (cosine for unit-norm queries); rows index the items.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n = self.ntotal
        k = min(k, n)
        if self.inverse_norms is None or k == 0:
            scores, rows = self.index.search(queries, k)
            return scores, rows
        scores = np.empty((len(queries), k), dtype=np.float32)
        rows = np.empty((len(queries), k), dtype=np.int64)
        pending = np.arange(len(queries))
        depth = min(n, max(FIRST_DEPTH_FACTOR * k, k + FIRST_DEPTH_EXTRA))
        largest, smallest = float(self.inverse_norms.max()), float(self.inverse_norms.min())
        while len(pending):
            inner, found = self.index.search(queries[pending], depth)
            valid = found >= 0
            rescaled = np.where(valid, inner * self.inverse_norms[np.maximum(found, 0)], -np.inf)
            order = np.argsort(-rescaled, axis=1, kind="stable")[:, :k]
            best = np.take_along_axis(rescaled, order, axis=1)
            if depth >= n:
                done = np.ones(len(pending), dtype=bool)
            else:
                last = inner[:, -1]  # every item outside the candidates scores at most this
                bound = np.where(last > 0, last * largest, last * smallest)
                done = best[:, -1] >= bound
            scores[pending[done]] = best[done]
            rows[pending[done]] = np.take_along_axis(found, order, axis=1)[done]
            pending = pending[~done]
            depth = min(n, depth * DEPTH_GROWTH)
        return scores, rows


def inverse_norms(reconstructions: np.ndarray) -> np.ndarray:
    """``(n, d)`` reconstructions → ``(n,)`` float32 ``1 / ‖x̂‖`` (0 for an all-zero row, which
    then scores 0 against every query)."""
    norms = np.linalg.norm(reconstructions, axis=1)
    return np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0).astype(np.float32)
