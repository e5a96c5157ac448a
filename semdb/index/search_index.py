"""The search index in memory: FAISS over the stored codes (one group per codec) and the staging."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from semdb.cosine import CosineIndex


@dataclass
class CodedGroup:
    """The indexed images coded by one codec: its cosine index and the image id of each row.

    ``ids``: ``(n,)`` int64. A code is only ever searched through the codec that made it.
    """

    codec_id: int
    index: CosineIndex
    ids: np.ndarray


@dataclass
class SearchIndex:
    """Everything searchable, tagged with the store state it was built from.

    ``coded``: one group per codec that made codes of indexed images (normally one); ``staged`` is
    an exact inner-product index over the unit-norm float embeddings not yet coded
    (``staged_ids``: ``(m,)`` int64 image ids).
    """

    tag: str
    coded: list[CodedGroup]
    staged: faiss.Index | None
    staged_ids: np.ndarray

    @property
    def size(self) -> int:
        """Number of searchable rows."""
        return sum(len(group.ids) for group in self.coded) + len(self.staged_ids)

    def search(
        self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None, exact: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """``queries``: ``(q, d)`` float32 → ``(scores, ids)``, both ``(q, k')`` with ``k' = min(k, size)``.

        Scores are cosines for unit-norm queries (to the reconstruction of a coded image, to the
        embedding of a staged one), best first; ids are image ids. ``allowed``: a sorted ``(m,)``
        int64 array of the image ids to search among (None: all); the restriction happens inside
        FAISS (an ``IDSelectorBatch`` on the staged index, indexes of only the allowed codes for
        the coded groups), so ``k'`` results come back whenever ``m >= k``. ``exact``: every scan
        here is already exhaustive, so it changes nothing (approximate indexes honour it).
        """
        del exact  # every index here scans all its rows
        allowed = None if allowed is None else np.asarray(allowed, dtype=np.int64)
        selector = None
        parts: list[tuple[faiss.Index | CosineIndex, np.ndarray, Any, int]] = []
        for group in self.coded:
            if allowed is None:
                parts.append((group.index, group.ids, None, len(group.ids)))
                continue
            selected = np.isin(group.ids, allowed, assume_unique=True)
            count = int(selected.sum())
            if count:
                parts.append((group.index.restricted(selected), group.ids, None, count))
        if self.staged is not None and len(self.staged_ids):
            if allowed is None:
                parts.append((self.staged, self.staged_ids, None, len(self.staged_ids)))
            else:
                rows = np.flatnonzero(np.isin(self.staged_ids, allowed, assume_unique=True)).astype(np.int64)
                if len(rows):
                    # IDSelectorBatch copies the rows into its own set: the array need not outlive it.
                    selector = faiss.IDSelectorBatch(len(rows), faiss.swig_ptr(rows))
                    params: Any = faiss.SearchParameters()
                    params.sel = selector  # ``selector`` stays referenced until the search below ends
                    parts.append((self.staged, self.staged_ids, params, len(rows)))
        k = min(k, sum(count for *_, count in parts))
        parts_scores: list[np.ndarray] = []
        parts_ids: list[np.ndarray] = []
        for index, ids, params, count in parts:
            if k <= 0:
                continue
            if isinstance(index, CosineIndex):
                scores, rows = index.search(queries, min(k, count))
            else:
                scores, rows = index.search(queries, min(k, count), params=params)
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
