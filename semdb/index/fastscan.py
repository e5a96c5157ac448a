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

Norm bands: the fast scan ranks by the inner product, the answer by the cosine, and where
``‖x̂‖`` is measured through a map that is not orthonormal (query-weighted codecs) the best cosines
are not among the best inner products of a short candidate list. So items are split
into :data:`BANDS` bands by ``‖x̂‖`` (quantiles), each band its own FAISS list, and a query is scanned
as one copy per band scaled by ``1 / (the band's median norm)``: each copy's scores approximate the
cosine within its band, and the best ``rerank`` over all copies go to the exact re-rank.

Inverted lists: when the codec was trained with coarse centroids (``(lists, d)`` float32 in the
embedding space, :mod:`semdb.index.lists`), each code sits in the list its embedding was assigned to
at ingest, and a query probes its ``nprobe`` nearest lists; otherwise everything is one list, a
full fast scan. Restrictions (``allowed`` image ids) run inside the scan as an ``IDSelectorBitmap``.
"""

from __future__ import annotations

import functools
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
# From this many items on the default re-rank depth doubles: at 10 M, R = 128 kept .956 of the exact
# top 10 and R = 256 .985 (at 1 M both .981).
DEEP_RERANK_ITEMS = 4_000_000


def default_rerank(items: int) -> int:
    """The re-rank depth a search of ``items`` codes uses unless told (docs/benchmarks.md, "10 M")."""
    return DEFAULT_RERANK if items < DEEP_RERANK_ITEMS else 2 * DEFAULT_RERANK


# Norm bands (module docstring), used where the 99th percentile of ‖x̂‖ is more than NORM_SPREAD times
# the 1st (docs/benchmarks.md, "Norm bands").
BANDS = 8
NORM_SPREAD = 1.1


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

    @functools.cached_property
    def orthonormal(self) -> bool:
        """Whether the query map has orthonormal rows (or is the identity): then ``‖x̂‖`` is the norm
        of what is scored, in the scanned space itself."""
        return self.matrix is None or bool(
            np.allclose(self.matrix @ self.matrix.T, np.eye(len(self.matrix)), atol=1e-5)
        )

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
        gram = None
        if not (self.matrix is None or self.orthonormal):
            gram = (self.matrix.astype(np.float64) @ self.matrix.T.astype(np.float64)).astype(np.float32)
        out = np.empty(len(codes), np.float32)
        offsets = np.arange(words) * WORDS
        for start in range(0, len(codes), chunk):
            part = self.words_of(self.faiss_order(codes[start : start + chunk])).astype(np.int64)  # (c, M)
            if gram is None:
                out[start : start + len(part)] = self.table_inverse_norms(part + offsets)
                continue
            r = self.centroids[np.arange(words), part].reshape(len(part), -1)  # (c, m)
            norms = np.sqrt(np.maximum(np.einsum("ij,ij->i", r @ gram, r, dtype=np.float64), 0.0))
            out[start : start + len(part)] = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        return out

    @functools.cached_property
    def squares(self) -> np.ndarray:
        """``(M * 16,)`` float64 squared norms of the centroids, word ``m``'s ``w`` at ``16 m + w``."""
        return (self.centroids.astype(np.float64) ** 2).sum(axis=2).ravel()

    def table_inverse_norms(self, flat: np.ndarray) -> np.ndarray:
        """``1/‖x̂‖`` float32 of codes given as ``(..., M)`` int64 indices ``16 m + word_m`` (0 for a zero
        vector), for a layout with orthonormal rows: the table sum that :meth:`inverse_norms` and the
        fast scan's re-rank both use, so that both give the same bits."""
        norms = np.sqrt(np.maximum(self.squares[flat].sum(axis=-1), 0.0))
        return np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0).astype(np.float32)


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


def _norms_of(inverse_norms: np.ndarray) -> np.ndarray:
    """``‖x̂‖`` from ``1/‖x̂‖`` ``(n,)`` (0 for a zero reconstruction, whose inverse is stored as 0)."""
    inverse = np.asarray(inverse_norms, np.float64)
    return np.divide(1.0, inverse, out=np.zeros_like(inverse), where=inverse > 0)


def norm_bands(layout: FourBitLayout, inverse_norms: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """:data:`BANDS` equal-count bands of the items' ``‖x̂‖`` (from ``1/‖x̂‖`` ``(n,)``): ``(edges
    (BANDS - 1,) ascending, query scales (BANDS,) float32 = 1 / each band's median norm)``, or None
    (one band).

    Only where the layout's query map is not orthonormal (query-weighted codecs, pqvae's decoder):
    there ``‖x̂‖`` is measured through the map, along directions the scanned inner product weighs
    little, so it reorders the best inner products; with an orthonormal map the norm spreads as much
    (docs/benchmarks.md, "Norm bands") but the inner product's best already hold the best cosines."""
    if inverse_norms is None or layout.orthonormal or len(inverse_norms) < BANDS * 32:
        return None
    norms = _norms_of(inverse_norms)
    low, high = np.quantile(norms, [0.01, 0.99])
    if low <= 0 or high / low < NORM_SPREAD:
        return None
    medians = np.quantile(norms, (np.arange(BANDS) + 0.5) / BANDS)
    return np.quantile(norms, np.arange(1, BANDS) / BANDS), (1.0 / medians).astype(np.float32)


class FastScan:
    """An ``IndexIVFPQFastScan`` over one group's codes, plus what the exact re-rank needs.

    ``ids``: ``(n,)`` int64 sorted image ids; ``codes``: ``(n, M/2)`` uint8 (FAISS word order);
    ``inverse_norms``: ``(n,)`` float32 ``1/‖x̂‖`` or None (unit-norm reconstructions); ``coarse``:
    ``(lists, d)`` float32 centroids the codes' lists were assigned from, or None (one list);
    ``bands``: the norm bands (:func:`norm_bands`), or None.
    """

    def __init__(
        self, layout: FourBitLayout, coarse: np.ndarray | None, bands: tuple[np.ndarray, np.ndarray] | None = None
    ) -> None:
        self.layout = layout
        self.coarse = coarse
        self.lists = 1 if coarse is None else len(coarse)
        # Norm bands (:func:`norm_bands`; None: one band). An item's FAISS list: its inverted list × B + its band.
        self.band_edges: np.ndarray | None = bands[0] if bands is not None else None
        self.band_scales: np.ndarray | None = bands[1] if bands is not None else None
        self.bands = 1 if bands is None else len(bands[1])
        self.probe: faiss.IndexFlatIP | None = None
        if coarse is not None:
            self.probe = faiss.IndexFlatIP(coarse.shape[1])
            self.probe.add(np.ascontiguousarray(coarse, dtype=np.float32))
        self.index = self._empty_fast()
        self.ids = np.empty(0, np.int64)
        self.codes = np.empty((0, layout.words // 2), np.uint8)
        self.inverse_norms: np.ndarray | None = None
        # Scores are scaled by 1/‖x̂‖ but none are held: computed from the candidates' words at the
        # re-rank (orthonormal layouts, where that is a table sum): 4 bytes per item fewer.
        self.norms_from_words = False

    # --- building -------------------------------------------------------------------------------

    def _ivfpq(self) -> Any:
        """An empty trained ``IndexIVFPQ`` (4-bit words, no residual) with this layout's centroids."""
        m = self.layout.scanned_dim
        # The coarse quantiser is never asked: lists are assigned at ingest and probed by self.probe.
        quantizer: Any = faiss.IndexFlatIP(m)
        quantizer.add(np.zeros((self.faiss_lists, m), np.float32))
        ivf: Any = faiss.IndexIVFPQ(
            quantizer, m, self.faiss_lists, self.layout.words, WORD_BITS, faiss.METRIC_INNER_PRODUCT
        )
        ivf.by_residual = False
        faiss.copy_array_to_vector(np.ascontiguousarray(self.layout.centroids).ravel(), ivf.pq.centroids)
        ivf.is_trained = True
        ivf.own_fields = True
        quantizer.this.disown()
        return ivf

    @property
    def faiss_lists(self) -> int:
        """FAISS's lists: inverted lists × norm bands."""
        return self.lists * self.bands

    def _empty_fast(self) -> Any:
        return _converted(self._ivfpq())

    def _fast_holding(self, ids: np.ndarray, codes: np.ndarray, lists: np.ndarray) -> Any:
        """A fast-scan index holding ``codes`` of ``ids`` in ``lists`` (all ``(n,)``/``(n, M/2)``)."""
        ivf = self._ivfpq()
        # uint16 where it fits: NumPy's stable sort is then a radix sort (6x faster than on int64).
        keys = lists.astype(np.uint16) if self.faiss_lists <= 2**16 else lists
        order = np.argsort(keys, kind="stable")
        bounds = np.searchsorted(keys[order], np.arange(self.faiss_lists + 1))
        for list_no in np.flatnonzero(np.diff(bounds)).tolist():
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
        *,
        scaled: bool | None = None,
    ) -> FastScan:
        """The fast scan of ``codes`` ``(n, M/2)`` uint8 (the codec's own order) of image ``ids``
        ``(n,)``; ``lists`` ``(n,)`` their inverted lists under ``coarse`` (both None: one list).

        ``scaled``: whether scores are divided by ``‖x̂‖`` (default: ``inverse_norms`` is given); an
        orthonormal layout then holds no norms (:attr:`norms_from_words`), another computes them
        from the codes when ``inverse_norms`` is None."""
        scaled = inverse_norms is not None if scaled is None else scaled
        from_words = scaled and layout.orthonormal
        if scaled and not from_words and inverse_norms is None:
            inverse_norms = layout.inverse_norms(codes)
        scan = cls(layout, coarse if lists is not None else None, norm_bands(layout, inverse_norms))
        scan.norms_from_words = from_words
        scan.add(ids, codes, inverse_norms, lists)
        return scan

    def inverse_norms_by_row(self) -> np.ndarray | None:
        """``(n,)`` float32 ``1/‖x̂‖`` by row (computed when :attr:`norms_from_words`), or None (unit)."""
        if self.norms_from_words:
            return self.layout.inverse_norms(self.layout.faiss_order(self.codes))
        return self.inverse_norms

    def _faiss_lists(self, lists: np.ndarray, inverse_norms: np.ndarray | None) -> np.ndarray:
        """FAISS list of items in inverted ``lists`` ``(n,)`` with ``inverse_norms`` ``(n,)`` (or None)."""
        if self.band_edges is None:
            return lists
        norms = _norms_of(np.ones(len(lists), np.float32) if inverse_norms is None else inverse_norms)
        return lists * self.bands + np.searchsorted(self.band_edges, norms)

    def add(
        self, ids: np.ndarray, codes: np.ndarray, inverse_norms: np.ndarray | None, lists: np.ndarray | None
    ) -> None:
        """Append items (the catch-up path): same shapes as :meth:`build`; ids not already held."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        codes = self.layout.faiss_order(codes)
        lists_checked = self._faiss_lists(self._check_lists(lists, len(ids)), inverse_norms)
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
        if not self.norms_from_words and (inverse_norms is not None or self.inverse_norms is not None):
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
        sizes = [int(invlists.list_size(i)) for i in range(self.faiss_lists)]
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
        rerank: int | None = None,
        nprobe: int = DEFAULT_NPROBE,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``queries`` ``(q, d)`` float32 → ``(scores, ids)`` ``(q, k')``, best first, ``-1`` padded.

        ``allowed``: sorted int64 image ids the scan is restricted to (None: all); ``rerank``: fast-scan
        candidates re-scored exactly (None: :func:`default_rerank`); ``nprobe``: lists probed (all when
        there is one list).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        count = self.ntotal if allowed is None else int(np.isin(allowed, self.ids).sum())
        k = min(k, count)
        q = len(queries)
        if k <= 0:
            return np.zeros((q, 0), np.float32), np.zeros((q, 0), np.int64)
        depth = min(max(default_rerank(self.ntotal) if rerank is None else rerank, k), count)
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
        copies, lists = y, assign
        if self.band_scales is not None:
            # One copy of each query per band, scaled to score ≈ the cosine there, probing that band's lists.
            copies = (y[:, None, :] * self.band_scales[None, :, None]).reshape(q * self.bands, -1)
            lists = (assign[:, None, :] * self.bands + np.arange(self.bands)[None, :, None]).reshape(q * self.bands, -1)
            centroid_scores = np.repeat(centroid_scores, self.bands, axis=0)
        scores = np.empty((len(copies), depth), np.float32)
        found = np.empty((len(copies), depth), np.int64)
        self.index.search_preassigned_c(
            len(copies),
            faiss.swig_ptr(copies),
            depth,
            faiss.swig_ptr(np.ascontiguousarray(lists, dtype=np.int64)),
            faiss.swig_ptr(np.ascontiguousarray(centroid_scores, dtype=np.float32)),
            faiss.swig_ptr(scores),
            faiss.swig_ptr(found),
            False,
            params,
            None,
        )
        del params, bitmap  # the selector reads the bitmap through the scan: both held until here
        if self.bands > 1:
            # The best `depth` of every band's candidates, by their approximate cosines.
            scores, found = scores.reshape(q, -1), found.reshape(q, -1)
            best = np.argsort(-np.where(found >= 0, scores, -np.inf), axis=1, kind="stable")[:, :depth]
            found = np.take_along_axis(found, best, axis=1)
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
        if self.norms_from_words:
            exact = exact * layout.table_inverse_norms(flat)
        elif self.inverse_norms is not None:
            exact = exact * self.inverse_norms[rows]
        exact = np.where(valid, exact, -np.inf).astype(np.float32)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(exact, order, axis=1)
        best_ids = np.take_along_axis(found, order, axis=1)
        return best_scores, np.where(np.isfinite(best_scores), best_ids, -1)
