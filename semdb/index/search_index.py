"""The search index in memory: FAISS over the stored codes (one group per codec) and the staging."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from semdb.cosine import CosineIndex
from semdb.errors import InvalidArgumentError
from semdb.index.fastscan import DEFAULT_NPROBE, FastScan

# An allowed set of at most this many images of a group is searched by the exact scan of their codes.
EXACT_ALLOWED_MAX = 20_000


@dataclass
class CodedGroup:
    """The indexed images coded by one codec: its scans and the image id (and list) of each row.

    Rows are in ascending image id. A code is only ever searched through the codec that made it.
    ``fast``: the fast approximate scan with exact re-rank (:mod:`semdb.index.fastscan`) when the
    codec's words are 4 bits and the group is large enough to gain from it; None: the exact scan.
    A fast scan holds the group's ids, codes and lists itself, once: then ``row_ids`` and
    ``row_lists`` are None and :attr:`ids`, :attr:`lists` and :meth:`arrays` are read from it.
    ``index``: the exact cosine scan; None while a fast scan holds everything it needs:
    :meth:`exact_index` builds it from that, with ``make_index``, on the first exact search.
    """

    codec_id: int
    index: CosineIndex | None
    # (n,) int64 image ids, sorted; None where the fast scan holds them.
    row_ids: np.ndarray | None
    fast: FastScan | None = None
    # (n,) int16 inverted list of each row (None: no lists, or the fast scan holds them), and the
    # sha256 of the codec's state: what the cache keeps to reconcile a later state (semdb.index.build).
    row_lists: np.ndarray | None = None
    codec_digest: bytes = b""
    make_index: Callable[[np.ndarray], faiss.Index] | None = None
    # Codes (n, code_size) uint8 and 1/‖x̂‖ (n,) or None by row, as a cache file holds them until the
    # group's fast scan is built from them (semdb.index.build); None otherwise.
    stored_arrays: tuple[np.ndarray, np.ndarray | None] | None = None
    # The ids by row while an exact scan built from the fast scan is held (its hits are rows).
    exact_ids: np.ndarray | None = None
    # What builds the exact scan of image queries from the codes by row, where the codec scores them
    # through an item path of its own (Codec.item_cosine_index); None: they search ``index``.
    make_item_index: Callable[[np.ndarray], CosineIndex | None] | None = None
    # That scan, built on the first exact image search (rows: :attr:`ids` then), and the ids by row.
    item_index: CosineIndex | None = None
    item_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.index is None and self.stored_arrays is None and (self.fast is None or self.make_index is None):
            raise ValueError("a group without its exact index needs a fast scan and make_index to build it")
        if self.row_ids is None and self.fast is None:
            raise ValueError("a group without a fast scan needs its ids")
        self.hold_in_fast()

    def hold_in_fast(self) -> None:
        """Drop the ids and lists by row where the fast scan holds them (one copy, not two)."""
        if self.fast is None or self.stored_arrays is not None:
            return
        if self.row_ids is not None and len(self.row_ids) != self.fast.ntotal:
            raise ValueError("the fast scan does not hold the group's rows")
        if self.index is not None and self.exact_ids is None:
            self.exact_ids = self.row_ids  # the exact scan's rows, while it is held
        self.row_ids = None
        if self.fast.has_lists:
            self.row_lists = None

    @property
    def count(self) -> int:
        """Rows."""
        if self.row_ids is not None:
            return len(self.row_ids)
        assert self.fast is not None
        return self.fast.ntotal

    @property
    def ids(self) -> np.ndarray:
        """``(n,)`` int64 image ids, ascending (read from the fast scan where it holds them)."""
        if self.row_ids is not None:
            return self.row_ids
        if self.exact_ids is not None:
            return self.exact_ids
        assert self.fast is not None
        return self.fast.ids_by_row()

    @property
    def lists(self) -> np.ndarray | None:
        """``(n,)`` int16 inverted list of each row, or None (no lists)."""
        if self.row_lists is not None or self.fast is None or not self.fast.has_lists:
            return self.row_lists
        return self.fast.rows()[2]

    @property
    def has_lists(self) -> bool:
        """Whether every row has an inverted list."""
        return self.row_lists is not None or (self.fast is not None and self.fast.has_lists)

    def exact_index(self) -> CosineIndex:
        """The exact cosine scan, built (and kept) from the fast scan's arrays if not held."""
        if self.index is None:
            assert self.fast is not None and self.make_index is not None
            ids, codes, norms, _ = self.rows()
            self.index = CosineIndex.build(codes, self.make_index, norms)
            self.exact_ids = ids if self.row_ids is None else None
        return self.index

    def image_exact_index(self) -> tuple[CosineIndex, np.ndarray]:
        """``(exact scan, image id of each of its rows (n,))`` for image queries: the item path's, built
        (and kept) on first use where the codec has one, else :meth:`exact_index`."""
        if self.make_item_index is not None:
            if self.item_index is None:
                # The text path's norms are not needed: the item scan computes its own.
                ids, codes, _, _ = self.rows(held_norms_only=True)
                built = self.make_item_index(codes)
                if built is not None:
                    self.item_index, self.item_ids = built, ids
            if self.item_index is not None and self.item_ids is not None:
                return self.item_index, self.item_ids
        index = self.exact_index()
        return index, self.ids

    def rows(
        self, held_norms_only: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """``(ids (n,), codes (n, code_size) uint8 in the codec's own order, 1/‖x̂‖ (n,) float32 or None,
        lists (n,) int16 or None)`` by row, read out of the fast scan in one pass where it holds them.

        ``held_norms_only``: None for norms a fast scan computes from the codes rather than holds (what
        the cache writes: the fast scan built from the file computes them the same way)."""
        if self.stored_arrays is not None:
            return self.ids, *self.stored_arrays, self.row_lists
        if self.index is None or (self.row_ids is None and self.exact_ids is None):
            assert self.fast is not None
            ids, codes, lists = self.fast.rows()
            lists = self.row_lists if self.row_lists is not None else lists
            if held_norms_only and self.fast.norms_from_words:
                return ids, codes, None, lists
            return ids, codes, self.fast.inverse_norms_by_row(ids, codes), lists
        return self.ids, *cosine_arrays(self.index), self.lists

    def arrays(self, held_norms_only: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """``(codes (n, code_size) uint8 in the codec's own order, 1/‖x̂‖ (n,) float32 or None)`` by row
        (see :meth:`rows`)."""
        _, codes, norms, _ = self.rows(held_norms_only)
        return codes, norms

    def drop_exact_index(self) -> None:
        """Free the exact scan where the fast scan can rebuild it (see :meth:`exact_index`)."""
        if self.fast is not None and self.make_index is not None:
            self.index = None
            self.exact_ids = None
        self.item_index = self.item_ids = None


def cosine_arrays(cosine: CosineIndex) -> tuple[np.ndarray, np.ndarray | None]:
    """``(codes (n, code_size) uint8, inverse norms (n,) float32 or None)`` of a cosine index, by row."""
    n = cosine.ntotal
    codes: np.ndarray | None = None
    norms = None if cosine.parts and cosine.parts[0].inverse_norms is None else np.ones(n, np.float32)
    for part in cosine.parts:
        inner: Any = faiss.downcast_index(part.index)
        while isinstance(inner, faiss.IndexPreTransform):
            inner = faiss.downcast_index(inner.index)
        part_codes = faiss.vector_to_array(inner.codes).reshape(inner.ntotal, inner.code_size)
        if codes is None:
            codes = np.empty((n, inner.code_size), np.uint8)
        codes[part.rows] = part_codes
        if norms is not None and part.inverse_norms is not None:
            norms[part.rows] = part.inverse_norms
    return (codes if codes is not None else np.empty((0, 0), np.uint8)), norms


def rows_of(ids: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Rows of sorted ``ids`` ``(n,)`` whose id is in ``allowed`` ``(a,)`` int64 (sorted), ascending."""
    rows = np.searchsorted(ids, allowed)
    inside = rows < len(ids)
    rows = rows[inside]
    return rows[ids[rows] == allowed[inside]]


def check_allowed(allowed: np.ndarray | None) -> np.ndarray | None:
    """``allowed`` as a sorted, duplicate-free 1-d int64 array (None stays None)."""
    if allowed is None:
        return None
    array = np.asarray(allowed)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise InvalidArgumentError(
            f"allowed must be a 1-d array of integer image ids, got {array.dtype} of shape {array.shape}"
        )
    array = array.astype(np.int64)
    if array.size > 1 and not (array[1:] > array[:-1]).all():
        array = np.unique(array)
    return array


@dataclass
class SearchIndex:
    """Everything searchable, tagged with the store state it was built from.

    ``coded``: one group per codec that made codes of indexed images (normally one); ``staged`` is
    an exact inner-product index over the unit-norm float embeddings not yet coded
    (``staged_ids``: ``(m,)`` int64 image ids, sorted).
    """

    tag: str
    coded: list[CodedGroup]
    staged: faiss.Index | None
    staged_ids: np.ndarray
    # The newest change-log seq of the snapshot it was built from (-1: unknown, it cannot catch up
    # from the log), and that of the cache file this process last read or wrote (semdb.index.build).
    changes_seq: int = -1
    cache_seq: int = -1

    @property
    def size(self) -> int:
        """Number of searchable rows."""
        return sum(group.count for group in self.coded) + len(self.staged_ids)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        allowed: np.ndarray | None = None,
        exact: bool = False,
        rerank: int | None = None,
        nprobe: int = DEFAULT_NPROBE,
        image_queries: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``queries``: ``(q, d)`` float32 → ``(scores, ids)``, both ``(q, k')`` with ``k' = min(k, size)``.

        Scores are cosines for unit-norm queries (to the reconstruction of a coded image, to the
        embedding of a staged one), best first; ids are image ids (-1 pads a row when fewer match).
        ``allowed``: sorted int64 image ids the scan is restricted to (None: all). ``exact``: the
        proven-exact cosine scan (:class:`~semdb.cosine.CosineIndex`) even where a fast scan exists;
        ``rerank`` and ``nprobe`` tune the fast scan (:mod:`semdb.index.fastscan`).
        ``image_queries``: the queries are image embeddings (search by image): a codec with an item
        path of its own (:attr:`~semdb.codecs.base.Codec.has_item_path`) scores them through it, to
        its item reconstructions.
        """
        allowed = check_allowed(allowed)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.size)
        parts_scores: list[np.ndarray] = []
        parts_ids: list[np.ndarray] = []
        for group in self.coded:
            if group.count == 0:
                continue
            fast = group.fast is not None and not exact
            wanted = min(k, group.count)
            if fast and allowed is not None and group.fast is not None:
                # A small allowed set is scanned exactly (|allowed| codes: cheap, and inverted lists
                # could miss allowed images outside the probed lists).
                held = int(group.fast.contains(allowed).sum())
                fast, wanted = held > EXACT_ALLOWED_MAX, min(k, held)
            found = None
            if fast and group.fast is not None:
                scores, found = group.fast.search(
                    queries, k, allowed, rerank=rerank, nprobe=nprobe, image_queries=image_queries
                )
                if ((found >= 0).sum(axis=1) < wanted).any():
                    found = None  # the probed lists held too few allowed images: scan exactly instead
            if found is None:
                if image_queries:
                    exact_index, ids = group.image_exact_index()
                else:
                    exact_index, ids = group.exact_index(), group.ids
                rows = rows_of(ids, allowed) if allowed is not None else None
                scores, hit = exact_index.search(queries, k, rows)
                found = np.where(hit >= 0, ids[np.maximum(hit, 0)], -1)
            parts_scores.append(scores)
            parts_ids.append(found)
        if self.staged is not None and len(self.staged_ids):
            scores, hit = self._search_staged(queries, k, allowed)
            parts_scores.append(scores)
            parts_ids.append(np.where(hit >= 0, self.staged_ids[np.maximum(hit, 0)], -1))
        if not parts_scores:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores = np.concatenate(parts_scores, axis=1)
        ids = np.concatenate(parts_ids, axis=1)
        scores = np.where(ids >= 0, scores, -np.inf)
        width = min(k, int((ids >= 0).sum(axis=1).max(initial=0)))
        order = np.argsort(-scores, axis=1, kind="stable")[:, :width]
        best_ids = np.take_along_axis(ids, order, axis=1)
        best_scores = np.take_along_axis(scores, order, axis=1)
        return np.where(best_ids >= 0, best_scores, 0).astype(np.float32), best_ids

    def _search_staged(self, queries: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The staged embeddings' best ``k`` rows, restricted inside FAISS to ``allowed`` ids."""
        assert self.staged is not None
        depth = min(k, len(self.staged_ids))
        if allowed is None:
            result: tuple[np.ndarray, np.ndarray] = self.staged.search(queries, depth)
            return result
        mask = np.zeros(len(self.staged_ids), dtype=bool)
        mask[rows_of(self.staged_ids, allowed)] = True
        bitmap = np.packbits(mask, bitorder="little")
        # Both kept in names through the search: the selector owns neither the bits nor itself.
        selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap))
        params: Any = faiss.SearchParameters()
        params.sel = selector
        result = self.staged.search(queries, depth, params=params)
        del selector, bitmap
        return result


def flat_index(embeddings: np.ndarray) -> faiss.Index | None:
    """An exact inner-product index over ``embeddings`` ``(m, d)`` float32 (None when ``m == 0``)."""
    if len(embeddings) == 0:
        return None
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return index
