"""The search index in memory: FAISS over the stored codes (one group per codec) and the staging."""

from __future__ import annotations

from dataclasses import dataclass

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

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``queries``: ``(q, d)`` float32 → ``(scores, ids)``, both ``(q, k')`` with ``k' = min(k, size)``.

        Scores are cosines for unit-norm queries (to the reconstruction of a coded image, to the
        embedding of a staged one), best first; ids are image ids.
        """
        k = min(k, self.size)
        parts: list[tuple[faiss.Index | CosineIndex | None, np.ndarray]] = [
            (group.index, group.ids) for group in self.coded
        ]
        parts.append((self.staged, self.staged_ids))
        parts_scores: list[np.ndarray] = []
        parts_ids: list[np.ndarray] = []
        for index, ids in parts:
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
