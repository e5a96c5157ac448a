"""Fast approximate scan over 4-bit-word codes, then the exact cosine re-rank of its candidates.

Codecs whose codes are ``M`` words of 4 bits scored by a product quantiser (``pcapq``, ``pqvae-pca``,
``pq``/``opq`` at a 4-bit layout, and their query-weighted forms) score an item as
``<A q, r(code)>``: ``A`` a linear map of the query (the codec's rotation, principal basis or
decoder, ``W⁻¹`` for query weighting), ``r`` the concatenation of one 16-word centroid per word.
FAISS's fast-scan kernels (``IndexIVFPQFastScan``, ``by_residual=False``) score exactly those codes
with SIMD look-ups in 8-bit quantised tables, so the stored codes are loaded as they are (converted
through an ``IndexIVFPQ`` holding them, which packs them into fast-scan's blocked layout) and never
re-encoded. The scan ranks by the quantised inner product; the best ``rerank`` candidates are then
scored exactly, ``<A q, r(code)> / ‖x̂‖`` with float tables (what :class:`~semdb.cosine.CosineIndex`
computes), and the best ``k`` of those returned.

Inverted lists: when the codec was trained with coarse centroids (``(lists, d)`` float32 in the
embedding space, :mod:`semdb.index.lists`), each code sits in the list its embedding was assigned to
at ingest, and a query probes its ``nprobe`` nearest lists; otherwise everything is one list, a
full fast scan. Restrictions (``allowed`` image ids) run inside the scan as an ``IDSelectorBitmap``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from semdb.codecs import Codec

WORD_BITS = 4
WORDS = 2**WORD_BITS
# Candidates of the fast scan re-ranked exactly, and lists probed per query (docs/benchmarks.md, "Scale").
DEFAULT_RERANK = 128
DEFAULT_NPROBE = 32


@dataclass(frozen=True)
class FourBitLayout:
    """How a codec's codes are scored: ``<matrix · q, concat_m centroids[m, word_m]>``.

    ``matrix``: ``(m, d)`` float32 applied to the queries (None: identity, ``m = d``);
    ``centroids``: ``(M, 16, m / M)`` float32; ``high_first``: a byte's first word is in its high
    nibble (semdb's pqvae packing) rather than its low one (FAISS's).
    """

    matrix: np.ndarray | None
    centroids: np.ndarray
    high_first: bool

    @property
    def words(self) -> int:
        """Words per code, ``M``."""
        return int(self.centroids.shape[0])

    @property
    def scanned_dim(self) -> int:
        """Dimension of the transformed queries, ``m``."""
        return int(self.centroids.shape[0] * self.centroids.shape[2])

    def transform(self, queries: np.ndarray) -> np.ndarray:
        """``(q, d)`` → ``(q, m)`` float32: the queries in the space the centroids live in."""
        if self.matrix is None:
            return np.ascontiguousarray(queries, dtype=np.float32)
        return np.ascontiguousarray(queries @ self.matrix.T, dtype=np.float32)

    def faiss_order(self, codes: np.ndarray) -> np.ndarray:
        """``(n, M/2)`` uint8 codes with their words in FAISS's order (first word in the low nibble)."""
        if not self.high_first:
            return np.ascontiguousarray(codes, dtype=np.uint8)
        return np.ascontiguousarray(((codes & 0x0F) << 4) | (codes >> 4), dtype=np.uint8)

    def words_of(self, codes: np.ndarray) -> np.ndarray:
        """``(n, M/2)`` uint8 codes in FAISS's order → ``(n, M)`` word indices."""
        return np.stack([codes & 0x0F, codes >> 4], axis=2).reshape(len(codes), -1)

    def inverse_norms(self, codes: np.ndarray, chunk: int = 65_536) -> np.ndarray:
        """``(n, M/2)`` uint8 codes (the codec's own order) → ``(n,)`` float32 ``1/‖matrixᵀ r(code)‖``
        (0 for a zero vector): the norm of what is scored, without decoding to ``d`` dimensions.

        With orthonormal rows (or no matrix) it is ``Σ_m ‖centroid_m‖²`` read from a ``(M, 16)``
        table; otherwise ``rᵀ G r`` with the ``(m, m)`` Gram matrix ``G = matrix · matrixᵀ``.
        """
        words = self.words
        squares = None
        gram = None
        if self.matrix is None or np.allclose(self.matrix @ self.matrix.T, np.eye(len(self.matrix)), atol=1e-5):
            squares = (self.centroids.astype(np.float64) ** 2).sum(axis=2)  # (M, 16)
        else:
            gram = (self.matrix.astype(np.float64) @ self.matrix.T.astype(np.float64)).astype(np.float32)
        out = np.empty(len(codes), np.float32)
        offsets = np.arange(words) * WORDS
        for start in range(0, len(codes), chunk):
            part = self.words_of(self.faiss_order(codes[start : start + chunk])).astype(np.int64)  # (c, M)
            if squares is not None:
                total = squares.ravel()[part + offsets].sum(axis=1)
            else:
                r = self.centroids[np.arange(words), part].reshape(len(part), -1)  # (c, m)
                total = np.einsum("ij,ij->i", r @ gram, r, dtype=np.float64)
            norms = np.sqrt(np.maximum(total, 0.0))
            out[start : start + len(part)] = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        return out


def _linear_chain(index: Any) -> tuple[np.ndarray | None, Any]:
    """``index`` with its pre-transforms peeled off: ``(their product (m, d) or None, inner index)``.

    None as the product when a transform is not a bias-free linear map (then no layout)."""
    matrix: np.ndarray | None = None
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform):
        chain: Any = index.chain
        for i in range(chain.size()):
            transform = faiss.downcast_VectorTransform(chain.at(i))
            if not isinstance(transform, faiss.LinearTransform) or transform.have_bias:
                return None, None
            a = faiss.vector_to_array(transform.A).reshape(transform.d_out, transform.d_in)
            matrix = a if matrix is None else a @ matrix
        index = faiss.downcast_index(index.index)
    return matrix, index


def four_bit_layout(codec: Codec) -> FourBitLayout | None:
    """The fast-scan layout of ``codec``, or None when its words are not 4 bits (or it is not a PQ).

    Only reads the codec; 8-bit-word codecs (``pq`` at its default layout) get None: FAISS's
    fast-scan kernels take 4-bit words only.
    """
    from semdb.codecs.faiss_codecs import FaissCodec
    from semdb.codecs.query_weighted import QueryWeightedCodec

    # semdb.codecs.pqvae imports torch (seconds, cold): a PQVAECodec exists only once it is imported.
    pqvae = sys.modules.get("semdb.codecs.pqvae")
    rate_split = sys.modules.get("semdb.codecs.rate_split")
    if rate_split is not None and isinstance(codec, rate_split.RateSplitCodec):
        try:  # one PQ over the lifted space [A₁; B] q (semdb.codecs.rate_split)
            matrix, centroids = codec.layout
        except ValueError:
            return None
        return FourBitLayout(matrix, centroids, True)
    if isinstance(codec, QueryWeightedCodec):
        base = four_bit_layout(codec.base)
        if base is None:
            return None
        inverse = codec.inverse.astype(np.float32)
        matrix = inverse if base.matrix is None else base.matrix @ inverse
        return FourBitLayout(np.ascontiguousarray(matrix, dtype=np.float32), base.centroids, base.high_first)
    if pqvae is not None and isinstance(codec, pqvae.PQVAECodec):
        config, decoder = codec.model.config, codec.model.decoder
        if not isinstance(decoder, pqvae.ShiftedLinear) or config.codebook_bits != WORD_BITS:
            return None
        weight = decoder.linear.weight.detach().numpy()  # (d, m): the decoder's output is W (ẑ + β)
        shift = decoder.shift.detach().numpy().reshape(config.subvectors, 1, config.latent_dim)
        centroids = codec.model.codebook.detach().numpy()[None] + shift  # (M, 16, e)
        return FourBitLayout(
            np.ascontiguousarray(weight.T, dtype=np.float32), np.ascontiguousarray(centroids, np.float32), True
        )
    if isinstance(codec, FaissCodec):
        product, inner = _linear_chain(codec.index)
        if not isinstance(inner, faiss.IndexPQ) or inner.pq.nbits != WORD_BITS or inner.pq.M % 2:
            return None
        pq = inner.pq
        centroids = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
        return FourBitLayout(product, centroids.astype(np.float32), False)
    return None


def _block_lists(index: Any) -> Any:
    """The ``BlockInvertedLists`` of a fast-scan IVF index."""
    invlists: Any = faiss.extract_index_ivf(index).invlists
    return faiss.downcast_InvertedLists(invlists)


def _converted(ivf: Any) -> Any:
    """``ivf`` (an ``IndexIVFPQ``) as an ``IndexIVFPQFastScan``, its codes packed into fast-scan's
    blocked layout. The conversion shares ``ivf``'s coarse quantiser: ownership moves with it, or
    freeing ``ivf`` would leave the new index pointing at freed memory."""
    fast: Any = faiss.IndexIVFPQFastScan(ivf)
    ivf.own_fields = False
    fast.own_fields = True
    return fast


class FastScan:
    """An ``IndexIVFPQFastScan`` over one group's codes, plus what the exact re-rank needs.

    ``ids``: ``(n,)`` int64 sorted image ids; ``codes``: ``(n, M/2)`` uint8 (FAISS word order);
    ``inverse_norms``: ``(n,)`` float32 ``1/‖x̂‖`` or None (unit-norm reconstructions); ``coarse``:
    ``(lists, d)`` float32 centroids the codes' lists were assigned from, or None (one list).
    """

    def __init__(self, layout: FourBitLayout, coarse: np.ndarray | None) -> None:
        self.layout = layout
        self.coarse = coarse
        self.lists = 1 if coarse is None else len(coarse)
        self.probe: faiss.IndexFlatIP | None = None
        if coarse is not None:
            self.probe = faiss.IndexFlatIP(coarse.shape[1])
            self.probe.add(np.ascontiguousarray(coarse, dtype=np.float32))
        self.index = self._empty_fast()
        self.ids = np.empty(0, np.int64)
        self.codes = np.empty((0, layout.words // 2), np.uint8)
        self.inverse_norms: np.ndarray | None = None

    # --- building -------------------------------------------------------------------------------

    def _ivfpq(self) -> Any:
        """An empty trained ``IndexIVFPQ`` (4-bit words, no residual) with this layout's centroids."""
        m = self.layout.scanned_dim
        # The coarse quantiser is never asked: lists are assigned at ingest and probed by self.probe.
        quantizer: Any = faiss.IndexFlatIP(m)
        quantizer.add(np.zeros((self.lists, m), np.float32))
        ivf: Any = faiss.IndexIVFPQ(quantizer, m, self.lists, self.layout.words, WORD_BITS, faiss.METRIC_INNER_PRODUCT)
        ivf.by_residual = False
        faiss.copy_array_to_vector(np.ascontiguousarray(self.layout.centroids).ravel(), ivf.pq.centroids)
        ivf.is_trained = True
        ivf.own_fields = True
        quantizer.this.disown()
        return ivf

    def _empty_fast(self) -> Any:
        return _converted(self._ivfpq())

    def _fast_holding(self, ids: np.ndarray, codes: np.ndarray, lists: np.ndarray) -> Any:
        """A fast-scan index holding ``codes`` of ``ids`` in ``lists`` (all ``(n,)``/``(n, M/2)``)."""
        ivf = self._ivfpq()
        order = np.argsort(lists, kind="stable")
        bounds = np.searchsorted(lists[order], np.arange(self.lists + 1))
        for list_no in range(self.lists):
            rows = order[bounds[list_no] : bounds[list_no + 1]]
            if len(rows):
                # Kept in names until add_entries returns: swig_ptr does not hold a reference.
                list_ids = np.ascontiguousarray(ids[rows], dtype=np.int64)
                list_codes = np.ascontiguousarray(codes[rows])
                ivf.invlists.add_entries(list_no, len(rows), faiss.swig_ptr(list_ids), faiss.swig_ptr(list_codes))
        ivf.ntotal = len(ids)
        return _converted(ivf)

    def _check_lists(self, lists: np.ndarray | None, n: int) -> np.ndarray:
        if lists is None or self.coarse is None:
            return np.zeros(n, np.int64)
        lists = np.asarray(lists, dtype=np.int64)
        if lists.shape != (n,) or (n and (lists.min() < 0 or lists.max() >= self.lists)):
            raise ValueError("inverted list numbers out of range")
        return lists

    @classmethod
    def build(
        cls,
        layout: FourBitLayout,
        ids: np.ndarray,
        codes: np.ndarray,
        inverse_norms: np.ndarray | None,
        lists: np.ndarray | None = None,
        coarse: np.ndarray | None = None,
    ) -> FastScan:
        """The fast scan of ``codes`` ``(n, M/2)`` uint8 (the codec's own order) of image ``ids``
        ``(n,)``; ``lists`` ``(n,)`` their inverted lists under ``coarse`` (both None: one list)."""
        scan = cls(layout, coarse if lists is not None else None)
        scan.add(ids, codes, inverse_norms, lists)
        return scan

    def add(
        self, ids: np.ndarray, codes: np.ndarray, inverse_norms: np.ndarray | None, lists: np.ndarray | None
    ) -> None:
        """Append items (the catch-up path): same shapes as :meth:`build`; ids not already held."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        codes = self.layout.faiss_order(codes)
        lists_checked = self._check_lists(lists, len(ids))
        added = self._fast_holding(ids, codes, lists_checked)
        if self.index.ntotal:
            self._append(added, ids, codes, lists_checked)
        else:
            self.index = added
        # Inserted at their places by id (no sort of everything held): the new ids sorted first.
        order = np.argsort(ids, kind="stable")
        at = np.searchsorted(self.ids, ids[order])
        held = len(self.ids)
        self.ids = np.insert(self.ids, at, ids[order])
        self.codes = np.insert(self.codes, at, codes[order], axis=0)
        if inverse_norms is not None or self.inverse_norms is not None:
            old = self.inverse_norms if self.inverse_norms is not None else np.ones(held, np.float32)
            new = np.asarray(inverse_norms, np.float32) if inverse_norms is not None else np.ones(len(ids), np.float32)
            self.inverse_norms = np.insert(old, at, new[order])

    def _append(self, added: Any, ids: np.ndarray, codes: np.ndarray, lists: np.ndarray) -> None:
        """Move the lists of ``added`` (a fast-scan index of the new items) onto the end of ours.

        Not ``merge_from``: FAISS 1.15's ``BlockInvertedLists::add_entries`` copies past its buffers
        when a non-empty list holds a multiple of ``block_size`` entries. Such a list is repacked
        whole (from :attr:`codes`) into an emptied list instead; every other list is appended to.
        """
        ours: Any = _block_lists(self.index)
        theirs: Any = _block_lists(added)
        for list_no in np.unique(lists).tolist():
            held = int(ours.list_size(list_no))
            source, count = theirs, int(theirs.list_size(list_no))
            if held and held % int(ours.block_size) == 0:
                old_ids = faiss.rev_swig_ptr(ours.get_ids(list_no), held).copy()
                new = lists == list_no
                rows = np.searchsorted(self.ids, old_ids)
                whole = self._fast_holding(
                    np.concatenate([old_ids, ids[new]]),
                    np.concatenate([self.codes[rows], codes[new]]),
                    np.full(held + int(new.sum()), list_no, np.int64),
                )
                source = _block_lists(whole)
                count = int(source.list_size(list_no))
                ours.resize(list_no, 0)
            ours.add_entries(list_no, count, source.get_ids(list_no), source.get_codes(list_no))
        self.index.ntotal += len(ids)

    def remove(self, ids: np.ndarray) -> None:
        """Forget the items of image ``ids`` (pruned or replaced images), from the scan and the arrays."""
        ids = np.asarray(ids, dtype=np.int64)
        rows = np.searchsorted(self.ids, ids)
        inside = rows < len(self.ids)
        rows = rows[inside][self.ids[rows[inside]] == ids[inside]]
        if not len(rows):
            return
        keep = np.ones(len(self.ids), bool)
        keep[rows] = False
        self.index.remove_ids(faiss.IDSelectorBatch(ids))
        self.ids, self.codes = self.ids[keep], self.codes[keep]
        if self.inverse_norms is not None:
            self.inverse_norms = self.inverse_norms[keep]

    @property
    def ntotal(self) -> int:
        """Items held."""
        return len(self.ids)

    def nbytes(self) -> int:
        """Resident bytes of the arrays and the fast-scan lists (blocks of 32 codes, ids)."""
        invlists: Any = faiss.extract_index_ivf(self.index).invlists
        sizes = [int(invlists.list_size(i)) for i in range(self.lists)]
        block_bytes = 32 * self.layout.words // 2
        packed, blocks = sum(sizes), sum(-(-size // 32) for size in sizes)
        arrays = (
            self.ids.nbytes + self.codes.nbytes + (self.inverse_norms.nbytes if self.inverse_norms is not None else 0)
        )
        return int(arrays + blocks * block_bytes + packed * 8)

    # --- search ---------------------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        k: int,
        allowed: np.ndarray | None = None,
        *,
        rerank: int = DEFAULT_RERANK,
        nprobe: int = DEFAULT_NPROBE,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``queries`` ``(q, d)`` float32 → ``(scores, ids)`` ``(q, k')``, best first, ``-1`` padded.

        ``allowed``: sorted int64 image ids the scan is restricted to (None: all); ``rerank``: fast-scan
        candidates re-scored exactly; ``nprobe``: lists probed (all when there is one list).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        count = self.ntotal if allowed is None else int(np.isin(allowed, self.ids).sum())
        k = min(k, count)
        q = len(queries)
        if k <= 0:
            return np.zeros((q, 0), np.float32), np.zeros((q, 0), np.int64)
        depth = min(max(rerank, k), count)
        probes = min(nprobe, self.lists)
        if self.probe is None:
            assign = np.zeros((q, 1), np.int64)
            centroid_scores = np.zeros((q, 1), np.float32)
        else:
            centroid_scores, assign = self.probe.search(queries, probes)
        params: Any = faiss.SearchParametersIVF()
        params.nprobe = probes
        bitmap = None
        if allowed is not None:
            # One bit per image id up to the largest held: O(1) membership inside the scan.
            top = int(self.ids[-1]) + 1
            mask = np.zeros(top, bool)
            inside = allowed[(allowed >= 0) & (allowed < top)]
            mask[inside] = True
            bitmap = np.packbits(mask, bitorder="little")
            selector = faiss.IDSelectorBitmap(top, faiss.swig_ptr(bitmap))
            params.sel = selector
        y = self.layout.transform(queries)
        scores = np.empty((q, depth), np.float32)
        found = np.empty((q, depth), np.int64)
        self.index.search_preassigned_c(
            q,
            faiss.swig_ptr(y),
            depth,
            faiss.swig_ptr(np.ascontiguousarray(assign, dtype=np.int64)),
            faiss.swig_ptr(np.ascontiguousarray(centroid_scores, dtype=np.float32)),
            faiss.swig_ptr(scores),
            faiss.swig_ptr(found),
            False,
            params,
            None,
        )
        del params, bitmap  # the selector reads the bitmap through the scan: both held until here
        return self._rerank(y, found, k)

    def _rerank(self, y: np.ndarray, found: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosines of the candidates ``found`` ``(q, R)`` (ids, -1 none) → the best ``k`` per query."""
        q, depth = found.shape
        valid = found >= 0
        rows = np.clip(np.searchsorted(self.ids, np.where(valid, found, 0)), 0, len(self.ids) - 1)
        layout = self.layout
        words = layout.words_of(self.codes[rows.ravel()]).reshape(q, depth, layout.words)
        # tables[i, m, w] = <y_i sub-vector m, centroid w of word m>, in float: the exact scores.
        tables = np.einsum("qmd,mwd->qmw", y.reshape(q, layout.words, -1), layout.centroids).reshape(q, -1)
        flat = words.astype(np.int64) + np.arange(layout.words) * WORDS  # (q, R, M) into tables' rows
        exact = tables[np.arange(q)[:, None, None], flat].sum(axis=2)
        if self.inverse_norms is not None:
            exact = exact * self.inverse_norms[rows]
        exact = np.where(valid, exact, -np.inf).astype(np.float32)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(exact, order, axis=1)
        best_ids = np.take_along_axis(found, order, axis=1)
        return best_scores, np.where(np.isfinite(best_scores), best_ids, -1)
