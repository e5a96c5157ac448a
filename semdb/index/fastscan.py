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

Each code is held once, in FAISS's blocks: a FAISS label is the image id and the item's place (its
FAISS list and its offset there, :data:`ID_SHIFT`), so the re-rank reads a candidate's code straight
from its list's blocks (:func:`block_positions`) without a second copy by row, an id-to-row map or a
list column. Appends go to the ends of their lists; a removal moves each list's last items into
the holes (FAISS's own ``remove_ids``) and then renumbers that list's offsets. A bitmap of the ids
held answers membership, and everything by row is read back from the lists
(:meth:`FastScan.rows`) when asked (the cache, an exact scan).

Norm bands: the fast scan ranks by the inner product, the answer by the cosine, and where
``‖x̂‖`` is measured through a map that is not orthonormal (query-weighted codecs) the best cosines
are not among the best inner products of a short candidate list. So items are split
into :data:`BANDS` bands by ``‖x̂‖`` (quantiles), each band its own FAISS list, and a query is scanned
as one copy per band scaled by ``1 / (the band's median norm)``: each copy's scores approximate the
cosine within its band, and the best ``rerank`` over all copies go to the exact re-rank.

Inverted lists: when the codec was trained with coarse centroids (``(lists, d)`` float32 in the
embedding space, :mod:`semdb.index.lists`), each code sits in the list its embedding was assigned to
at ingest, and a query probes its ``nprobe`` nearest lists; otherwise everything is one list, a
full fast scan. Restrictions (``allowed`` image ids) run inside the scan: the allowed images'
labels in the probed lists, as an ``IDSelectorBatch``.
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


# Image queries scored through an item layout re-rank this many times the default depth: the norm
# bands are the text path's, so the item path's scan orders its candidates less well (docs/codecs.md §11j).
ITEM_RERANK_FACTOR = 2


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
        out = np.empty(len(codes), np.float32)
        offsets = np.arange(words) * WORDS
        for start in range(0, len(codes), chunk):
            part = self.words_of(self.faiss_order(codes[start : start + chunk])).astype(np.int64)  # (c, M)
            out[start : start + len(part)] = self.words_inverse_norms(part + offsets)
        return out

    @functools.cached_property
    def squares(self) -> np.ndarray:
        """``(M * 16,)`` float64 squared norms of the centroids, word ``m``'s ``w`` at ``16 m + w``."""
        return (self.centroids.astype(np.float64) ** 2).sum(axis=2).ravel()

    @functools.cached_property
    def gram(self) -> np.ndarray | None:
        """``(m, m)`` float32 ``matrix · matrixᵀ``, or None where the map is orthonormal (or absent)."""
        if self.matrix is None or self.orthonormal:
            return None
        return (self.matrix.astype(np.float64) @ self.matrix.T.astype(np.float64)).astype(np.float32)

    def words_inverse_norms(self, flat: np.ndarray) -> np.ndarray:
        """``1/‖matrixᵀ r‖`` float32 of codes given as ``(..., M)`` int64 indices ``16 m + word_m``, for any
        layout: the table sum of :meth:`table_inverse_norms`, or ``rᵀ G r`` with the Gram matrix."""
        gram = self.gram
        if gram is None:
            return self.table_inverse_norms(flat)
        r = self.centroids.reshape(self.words * WORDS, -1)[flat].reshape(*flat.shape[:-1], -1)  # (..., m)
        norms = np.sqrt(np.maximum(np.einsum("...i,...i->...", r @ gram, r, dtype=np.float64), 0.0))
        return np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0).astype(np.float32)

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
        return _pqvae_layout(codec, codec.model.decoder)
    if isinstance(codec, FaissCodec):
        product, inner = _linear_chain(codec.index)
        if not isinstance(inner, faiss.IndexPQ) or inner.pq.nbits != WORD_BITS or inner.pq.M % 2:
            return None
        pq = inner.pq
        centroids = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
        return FourBitLayout(product, centroids.astype(np.float32), False)
    return None


def item_layout(codec: Codec) -> FourBitLayout | None:
    """The layout image queries are scored through where ``codec`` has an item path of its own
    (:attr:`Codec.has_item_path`: ``pqvae-pca``'s second decoder ``W₂ (ẑ + β₂)``, already in the
    searched space), over the same words as :func:`four_bit_layout`'s; None otherwise.

    Its centroids differ from the scanned ones only by the shifts, so FAISS's scan of the words with
    this layout's query map scores ``<q, W₂ (ẑ + β₂)>`` up to a constant per query."""
    from semdb.codecs.query_weighted import QueryWeightedCodec

    pqvae = sys.modules.get("semdb.codecs.pqvae")
    if pqvae is None or not isinstance(codec, QueryWeightedCodec) or not isinstance(codec.base, pqvae.PQVAECodec):
        return None
    # The item decoder's output is already in the searched space: no W⁻¹ in front of it.
    return _pqvae_layout(codec.base, codec.base.model.item_decoder)


def _pqvae_layout(codec: Any, decoder: Any) -> FourBitLayout | None:
    """The layout of a ``pqvae`` codec's ``decoder`` (its first, or its item decoder): the decoder's
    ``Wᵀ`` in front of its shifted codebook; None unless the decoder is linear and words are 4 bits."""
    pqvae = sys.modules["semdb.codecs.pqvae"]
    if not isinstance(decoder, pqvae.ShiftedLinear) or codec.model.config.codebook_bits != WORD_BITS:
        return None
    weight, centroids = pqvae.linear_decoder_arrays(codec.model, decoder)  # (d, m), (M, 16, e)
    return FourBitLayout(np.ascontiguousarray(weight.T), centroids, True)


# --- fast-scan's blocked layout ---------------------------------------------------------------------
# FAISS packs 4-bit codes in blocks of 32 (pq4_pack_codes): for each pair of words, 32 bytes, the first
# 16 holding word 2p of the block's items, the next 16 word 2p + 1, two items to a byte (item r in the
# low nibble of byte SLOT[r % 16], item r + 16 in its high nibble). The re-rank reads the candidates'
# codes from there, so no second copy of the codes is held by row.
BLOCK = 32
_ITEM_AT = np.array([0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15])  # byte j holds item _ITEM_AT[j]
_SLOT = np.argsort(_ITEM_AT)  # the byte of item r (and of r + 16)

# A FAISS label is (image id << ID_SHIFT) | (FAISS list << offset bits) | offset in that list: a
# candidate's code is found from its label alone, and no id-to-place map is held. The low ID_SHIFT bits
# are shared between the list and the offset (FastScan.offset_bits), as the number of lists asks.
ID_SHIFT = 32
MAX_IMAGE_ID = 2 ** (63 - ID_SHIFT) - 1
# Labels a removal reads at a time to find those of the removed ids.
REMOVAL_BATCH = 1 << 20


def pack_blocks(codes: np.ndarray) -> np.ndarray:
    """``(n, P)`` uint8 codes in FAISS's word order → ``(ceil(n / 32) * 32 * P,)`` uint8 in fast-scan's
    blocked layout (what ``pq4_pack_codes`` writes; the last block padded with zero words)."""
    n, pairs = codes.shape
    blocks = -(-n // BLOCK)
    padded = np.zeros((blocks * BLOCK, pairs), np.uint8)
    padded[:n] = codes
    words = np.stack([padded & 0x0F, padded >> 4], axis=2).reshape(blocks, BLOCK, pairs, 2)
    packed = words[:, _ITEM_AT] | (words[:, _ITEM_AT + 16] << 4)  # (blocks, 16, P, 2)
    return np.ascontiguousarray(packed.transpose(0, 2, 3, 1)).ravel()


@functools.lru_cache(maxsize=8)
def _in_block(pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of a block's 32 items: ``(byte indices in the block (32, P, 2) int64, nibble shifts
    (32, 1, 1) uint8)`` (see :func:`block_positions`)."""
    item = np.arange(BLOCK)
    at = _SLOT[item % 16][:, None, None] + (np.arange(pairs) * BLOCK)[:, None] + np.array([0, 16])
    return at, np.where(item >= 16, 4, 0).astype(np.uint8)[:, None, None]


def block_positions(offsets: np.ndarray, pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the codes at ``offsets`` ``(r,)`` of a list lie in its blocked bytes: ``(byte indices
    (r, P, 2) int64 — word 2p at [:, p, 0], word 2p + 1 at [:, p, 1] —, nibble shifts (r, 1, 1) uint8)``."""
    offsets = np.asarray(offsets, np.int64)
    at, shift = _in_block(pairs)
    item = offsets & (BLOCK - 1)
    return at[item] + ((offsets - item) * pairs)[:, None, None], shift[item]


def words_at(raw: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """The bytes read at :func:`block_positions` ``(r, P, 2)`` with their shifts → ``(r, P)`` uint8
    codes, FAISS order."""
    words = (raw >> shift) & 0x0F
    return (words[:, :, 0] | (words[:, :, 1] << 4)).astype(np.uint8)


def unpack_list(blocked: np.ndarray, size: int, pairs: int) -> np.ndarray:
    """All ``size`` codes of a list's ``blocked`` bytes → ``(size, P)`` uint8, FAISS order (the inverse
    of :func:`pack_blocks`, whole blocks at a time)."""
    blocks = blocked.reshape(-1, pairs, 2, 16)  # (blocks, pair, word of the pair, byte)
    words = np.empty((len(blocks), BLOCK, pairs, 2), np.uint8)
    words[:, _ITEM_AT] = (blocks & 0x0F).transpose(0, 3, 1, 2)
    words[:, _ITEM_AT + 16] = (blocks >> 4).transpose(0, 3, 1, 2)
    return (words[:, :, :, 0] | (words[:, :, :, 1] << 4)).reshape(-1, pairs)[:size]


def unpack_blocks(blocked: np.ndarray, offsets: np.ndarray, pairs: int) -> np.ndarray:
    """The codes at ``offsets`` ``(r,)`` of a list's ``blocked`` bytes → ``(r, P)`` uint8, FAISS order."""
    at, shift = block_positions(offsets, pairs)
    return words_at(blocked[at], shift)


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


def _in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: which ``values`` are in ``sorted_set`` (ascending, non-empty)."""
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


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
    """An ``IndexIVFPQFastScan`` over one group's codes: all that is held of them, item by item.

    FAISS holds each code once, in its blocked layout, with its label (image id and place,
    :data:`ID_SHIFT`); beside it only a bitmap of the image ids held (one bit per id up to the
    largest), and ``1/‖x̂‖`` by image id where a layout needs it stored (``inverse_norms``: float32
    ``(largest id + 1,)``, or None: unit reconstructions, or computed from the words). The exact
    re-rank reads its candidates' codes from the blocks; :meth:`rows` gives everything by row.
    ``coarse``: ``(lists, d)`` float32 centroids the codes' lists were assigned from, or None (one
    list); ``bands``: the norm bands (:func:`norm_bands`), or None.
    """

    def __init__(
        self, layout: FourBitLayout, coarse: np.ndarray | None, bands: tuple[np.ndarray, np.ndarray] | None = None
    ) -> None:
        self.layout = layout
        self.lists = 1 if coarse is None else len(coarse)
        # Norm bands (:func:`norm_bands`; None: one band). An item's FAISS list: its inverted list × B + its band.
        self.band_edges: np.ndarray | None = bands[0] if bands is not None else None
        self.band_scales: np.ndarray | None = bands[1] if bands is not None else None
        self.bands = 1 if bands is None else len(bands[1])
        # The label's low ID_SHIFT bits: the FAISS list above, the offset in it below.
        list_bits = (self.faiss_lists - 1).bit_length()
        self.offset_bits = ID_SHIFT - list_bits
        if self.offset_bits < 16:
            raise ValueError(f"at most {2 ** (ID_SHIFT - 16)} lists × bands, not {self.faiss_lists}")
        # The centroids live in the probe only (one copy).
        self.probe: faiss.IndexFlatIP | None = None
        if coarse is not None:
            self.probe = faiss.IndexFlatIP(coarse.shape[1])
            self.probe.add(np.ascontiguousarray(coarse, dtype=np.float32))
        self.index = self._empty_fast()
        self._blocks_of: Any = None
        self._blocks_cached: Any = None
        # Numpy views of each FAISS list (labels, blocked codes), made on first use and dropped when
        # the list is written: a view costs several SWIG calls, a search reads tens of lists.
        self._views: list[tuple[np.ndarray, np.ndarray] | None] = [None] * self.faiss_lists
        self.held = np.zeros(0, np.uint8)  # bit i (little order) set: image id i is held
        self.ntotal = 0
        self.inverse_norms: np.ndarray | None = None
        # Scores are scaled by 1/‖x̂‖ but none are held: computed from the candidates' words at the
        # re-rank (orthonormal layouts, where that is a table sum): 4 bytes per item fewer.
        self.norms_from_words = False
        # The layout image queries are scored through (item_layout), or None: the same as text queries.
        # Its norms are computed from the candidates' words at the re-rank: none held.
        self.item_layout: FourBitLayout | None = None
        # (bands,) float32: what an image query's copy for each norm band is scaled by (None: 1).
        self.item_band_scales: np.ndarray | None = None

    @property
    def has_lists(self) -> bool:
        """Whether queries probe inverted lists (rather than scanning every code)."""
        return self.probe is not None

    @property
    def pairs(self) -> int:
        """Bytes per code, ``M / 2``."""
        return self.layout.words // 2

    @property
    def faiss_lists(self) -> int:
        """FAISS's lists: inverted lists × norm bands."""
        return self.lists * self.bands

    def _labels(self, ids: np.ndarray, faiss_lists: np.ndarray | int, offsets: np.ndarray) -> np.ndarray:
        """``(n,)`` int64 labels of items of image ``ids`` at ``offsets`` of ``faiss_lists``."""
        if len(offsets) and int(np.max(offsets)) >> self.offset_bits:
            raise ValueError(f"a FAISS list holds at most {2**self.offset_bits} items")
        return (ids << ID_SHIFT) | (np.asarray(faiss_lists, np.int64) << self.offset_bits) | offsets

    def _place(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(FAISS lists, offsets)`` of items under ``labels``, both shaped like it."""
        low = labels & ((1 << ID_SHIFT) - 1)
        return low >> self.offset_bits, low & ((1 << self.offset_bits) - 1)

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

    def _empty_fast(self) -> Any:
        index = _converted(self._ivfpq())
        # The coarse quantiser of FAISS lists (zeros, never asked) is not kept: lists × bands × m floats.
        quantizer: Any = faiss.downcast_index(index.quantizer)
        quantizer.reset()
        return index

    def _fast_holding(self, labels: np.ndarray, codes: np.ndarray) -> Any:
        """A fast-scan index holding ``codes`` ``(n, P)`` under ``labels`` ``(n,)``, whose offsets
        number each list's items in the order given."""
        ivf = self._ivfpq()
        lists = self._place(labels)[0]
        # uint16: NumPy's stable sort is then a radix sort (6x faster than on int64).
        order = np.argsort(lists.astype(np.uint16), kind="stable")
        bounds = np.searchsorted(lists[order], np.arange(self.faiss_lists + 1))
        for list_no in np.flatnonzero(np.diff(bounds)).tolist():
            rows = order[bounds[list_no] : bounds[list_no + 1]]
            # Kept in names until add_entries returns: swig_ptr does not hold a reference.
            list_labels = np.ascontiguousarray(labels[rows], dtype=np.int64)
            list_codes = np.ascontiguousarray(codes[rows])
            ivf.invlists.add_entries(list_no, len(rows), faiss.swig_ptr(list_labels), faiss.swig_ptr(list_codes))
        ivf.ntotal = len(labels)
        fast = _converted(ivf)
        faiss.downcast_index(fast.quantizer).reset()
        return fast

    def _check_lists(self, lists: np.ndarray | None, n: int) -> np.ndarray:
        if lists is None or self.probe is None:
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
        items: FourBitLayout | None = None,
    ) -> FastScan:
        """The fast scan of ``codes`` ``(n, M/2)`` uint8 (the codec's own order) of image ``ids``
        ``(n,)``; ``lists`` ``(n,)`` their inverted lists under ``coarse`` (both None: one list).

        ``scaled``: whether scores are divided by ``‖x̂‖`` (default: ``inverse_norms`` is given); an
        orthonormal layout then holds no norms (:attr:`norms_from_words`), another computes them
        from the codes when ``inverse_norms`` is None. ``items``: the codec's item layout
        (:func:`item_layout`; :attr:`item_layout`), whose scans are scaled per norm band too."""
        scaled = inverse_norms is not None if scaled is None else scaled
        from_words = scaled and layout.orthonormal
        if scaled and not from_words and inverse_norms is None:
            inverse_norms = layout.inverse_norms(codes)
        scan = cls(layout, coarse if lists is not None else None, norm_bands(layout, inverse_norms))
        scan.norms_from_words = from_words
        scan.item_layout = items
        if items is not None and scan.band_edges is not None and inverse_norms is not None and len(codes):
            # The bands are the text path's; an image query's copy for a band is scaled by 1 / the
            # median of the item path's norms there (fixed at the build, as the bands are).
            band = np.searchsorted(scan.band_edges, _norms_of(inverse_norms))
            item_norms = _norms_of(items.inverse_norms(codes))
            medians = np.array(
                [np.median(item_norms[band == b]) if (band == b).any() else 1.0 for b in range(scan.bands)]
            )
            scan.item_band_scales = (1.0 / np.maximum(medians, 1e-12)).astype(np.float32)
        scan.add(ids, codes, None if from_words else inverse_norms, lists)
        return scan

    def _faiss_lists(self, lists: np.ndarray, inverse_norms: np.ndarray | None) -> np.ndarray:
        """FAISS list of items in inverted ``lists`` ``(n,)`` with ``inverse_norms`` ``(n,)`` (or None)."""
        if self.band_edges is None:
            return lists
        norms = _norms_of(np.ones(len(lists), np.float32) if inverse_norms is None else inverse_norms)
        return lists * self.bands + np.searchsorted(self.band_edges, norms)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """``(n,)`` bool: which image ``ids`` ``(n,)`` int64 are held."""
        ids = np.asarray(ids, np.int64)
        inside = (ids >= 0) & (ids < 8 * len(self.held))
        found = np.zeros(len(ids), bool)
        at = ids[inside]
        found[inside] = (self.held[at >> 3] >> (at & 7).astype(np.uint8)) & 1 == 1
        return found

    def _mark(self, ids: np.ndarray, held: bool) -> None:
        """Set (``held``) or clear the bits of image ``ids`` (sorted, unique) in :attr:`held`."""
        if not len(ids):
            return
        if held and int(ids[-1]) >= 8 * len(self.held):
            # Grown by a quarter at least, so that catching up does not copy the bitmap every time.
            size = max(int(ids[-1]) // 8 + 1, len(self.held) + len(self.held) // 4) if len(self.held) else 0
            grown = np.zeros(max(size, int(ids[-1]) // 8 + 1), np.uint8)
            grown[: len(self.held)] = self.held
            self.held = grown
        # The bytes from the first id's to the last's, as a bool mask packed (ufunc.at is 6x slower).
        low, high = int(ids[0]) >> 3, (int(ids[-1]) >> 3) + 1
        mask = np.zeros(8 * (high - low), bool)
        mask[ids - 8 * low] = True
        bits = np.packbits(mask, bitorder="little")
        if held:
            self.held[low:high] |= bits
        else:
            self.held[low:high] &= ~bits

    def _store_norms(self, ids: np.ndarray, inverse_norms: np.ndarray | None) -> None:
        """Keep ``1/‖x̂‖`` of new ``ids`` (sorted) by id, where the layout needs them held."""
        if self.norms_from_words or (inverse_norms is None and self.inverse_norms is None):
            return
        held = 0 if self.inverse_norms is None else len(self.inverse_norms)
        if int(ids[-1]) >= held:
            size = int(ids[-1]) + 1 if held == 0 else max(int(ids[-1]) + 1, held + held // 4)
            grown = np.ones(size, np.float32)
            if self.inverse_norms is not None:
                grown[:held] = self.inverse_norms
            self.inverse_norms = grown
        assert self.inverse_norms is not None
        self.inverse_norms[ids] = 1.0 if inverse_norms is None else inverse_norms

    def add(
        self, ids: np.ndarray, codes: np.ndarray, inverse_norms: np.ndarray | None, lists: np.ndarray | None
    ) -> None:
        """Append items (the catch-up path): same shapes as :meth:`build`; ids not already held."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        if ids.min() < 0 or ids.max() > MAX_IMAGE_ID:
            raise ValueError(f"image ids must lie in [0, {MAX_IMAGE_ID}]")
        order = np.argsort(ids, kind="stable")
        ids, codes = ids[order], self.layout.faiss_order(codes[order])
        inverse_norms = np.asarray(inverse_norms, np.float32)[order] if inverse_norms is not None else None
        lists = self._check_lists(lists[order] if lists is not None else None, len(ids))
        faiss_lists = self._faiss_lists(lists, inverse_norms)
        if self.ntotal == 0:
            by_list = np.argsort(faiss_lists.astype(np.uint16), kind="stable")
            starts = np.searchsorted(faiss_lists[by_list], np.arange(self.faiss_lists))
            offsets = np.empty(len(ids), np.int64)
            offsets[by_list] = np.arange(len(ids)) - starts[faiss_lists[by_list]]
            labels = self._labels(ids, faiss_lists, offsets)
            self.index = self._fast_holding(labels, codes)
            self._views = [None] * self.faiss_lists
        else:
            self._append(ids, codes, faiss_lists)
        self._mark(ids, True)
        self._store_norms(ids, inverse_norms)
        self.ntotal += len(ids)

    @property
    def _blocks(self) -> Any:
        """The ``BlockInvertedLists`` of :attr:`index` (looked up once per index: SWIG calls cost µs)."""
        if self._blocks_of is not self.index:
            self._blocks_cached = _block_lists(self.index)
            self._blocks_of = self.index
        return self._blocks_cached

    def _list(self, list_no: int) -> tuple[np.ndarray, np.ndarray]:
        """Views (no copies) of FAISS list ``list_no``: ``(labels (s,) int64, blocked codes (bytes,) uint8)``;
        kept until the list is next written (:meth:`_written`)."""
        views = self._views[list_no]
        if views is not None:
            return views
        invlists = self._blocks
        size = int(invlists.list_size(list_no))
        if size == 0:
            views = np.empty(0, np.int64), np.empty(0, np.uint8)
        else:
            labels = faiss.rev_swig_ptr(invlists.get_ids(list_no), size)
            blocked = faiss.rev_swig_ptr(invlists.get_codes(list_no), -(-size // BLOCK) * BLOCK * self.pairs)
            views = labels, blocked
        self._views[list_no] = views
        return views

    def _written(self, list_no: int) -> None:
        """Forget the views of FAISS list ``list_no``: FAISS may have moved its buffers."""
        self._views[list_no] = None

    def _append(self, ids: np.ndarray, codes: np.ndarray, faiss_lists: np.ndarray) -> None:
        """Add the items of ``ids`` ``(n,)`` with ``codes`` ``(n, P)`` (FAISS order) to the ends of their
        ``faiss_lists`` ``(n,)``.

        Through FAISS's ``add_entries``, which packs each new code into the list's last block, except
        where a list holds a multiple of ``block_size`` entries: there FAISS 1.15's ``add_entries``
        copies past its buffers, so the list is grown and the new whole blocks written into it here."""
        invlists = self._blocks
        block_bytes = int(invlists.block_size)
        order = np.argsort(faiss_lists, kind="stable")
        bounds = np.flatnonzero(np.diff(faiss_lists[order])) + 1
        for rows in np.split(order, bounds):
            list_no = int(faiss_lists[rows[0]])
            held = int(invlists.list_size(list_no))
            labels = self._labels(ids[rows], list_no, held + np.arange(len(rows)))
            packed = pack_blocks(codes[rows])
            self._written(list_no)
            if held and held % block_bytes == 0:
                invlists.resize(list_no, held + len(rows))
                held_labels, blocked = self._list(list_no)
                held_labels[held:] = labels
                blocked[held * self.pairs :] = packed  # held is a whole number of blocks of 32
            else:
                invlists.add_entries(list_no, len(rows), faiss.swig_ptr(labels), faiss.swig_ptr(packed))
        self.index.ntotal += len(ids)

    def remove(self, ids: np.ndarray) -> None:
        """Forget the items of image ``ids`` (pruned or replaced images; ids not held are ignored).

        FAISS's ``remove_ids`` moves each list's last items into the holes; the offsets in the labels
        of the lists it touched are then numbered again."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        ids = ids[self.contains(ids)]
        if not len(ids):
            return
        before = self.held.copy()
        self._mark(ids, False)
        going = before ^ self.held  # the bits of the ids removed
        del before
        # The labels of the removed ids, read a few lists at a time (memory bounded whatever n).
        found, batch, held = [], [], 0
        for list_no in range(self.faiss_lists):
            batch.append(self._list(list_no)[0])
            held += len(batch[-1])
            if held >= REMOVAL_BATCH or list_no == self.faiss_lists - 1:
                labels = np.concatenate(batch)
                at = labels >> ID_SHIFT
                found.append(labels[(going[at >> 3] >> (at & 7).astype(np.uint8)) & 1 == 1])
                batch, held = [], 0
        removing = np.concatenate(found)
        del going
        removed = int(self.index.remove_ids(faiss.IDSelectorBatch(len(removing), faiss.swig_ptr(removing))))
        keep = ~np.int64((1 << self.offset_bits) - 1)
        for list_no in np.unique(self._place(removing)[0]).tolist():
            self._written(list_no)
            labels, _ = self._list(list_no)
            labels[:] = (labels & keep) | np.arange(len(labels))
        self.ntotal -= removed

    # --- by row ---------------------------------------------------------------------------------

    def ids_by_row(self) -> np.ndarray:
        """``(n,)`` int64: the image ids held, ascending (the rows of :meth:`rows`)."""
        return np.flatnonzero(np.unpackbits(self.held, bitorder="little")).astype(np.int64)

    def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Everything held, by row (ascending image id): ``(ids (n,) int64, codes (n, M/2) uint8 in the
        codec's own order, inverted lists (n,) int16 or None when there are none)``."""
        labels_parts, code_parts = [], []
        for list_no in range(self.faiss_lists):
            labels, blocked = self._list(list_no)
            if len(labels):
                labels_parts.append(labels.copy())
                code_parts.append(unpack_list(blocked, len(labels), self.pairs))
        if not labels_parts:
            return np.empty(0, np.int64), np.empty((0, self.pairs), np.uint8), None
        labels = np.concatenate(labels_parts)
        # Into id order through a dense map from id to where it was read (ids are unique, below the
        # bitmap's end): an O(n) scatter and gather where an argsort of n int64 costs ~10x more.
        where = np.empty(8 * len(self.held), np.int64)
        where[labels >> ID_SHIFT] = np.arange(len(labels))
        order = where[self.ids_by_row()]
        del where
        labels = labels[order]
        codes = self.layout.faiss_order(np.concatenate(code_parts)[order])
        lists = (self._place(labels)[0] // self.bands).astype(np.int16) if self.has_lists else None
        return labels >> ID_SHIFT, codes, lists

    def inverse_norms_by_row(self, ids: np.ndarray, codes: np.ndarray) -> np.ndarray | None:
        """``(n,)`` float32 ``1/‖x̂‖`` of held ``ids`` ``(n,)`` with ``codes`` ``(n, M/2)`` (the codec's
        order; computed when :attr:`norms_from_words`), or None (unit reconstructions)."""
        if self.norms_from_words:
            return self.layout.inverse_norms(codes)
        return self.inverse_norms[ids] if self.inverse_norms is not None else None

    def nbytes(self) -> int:
        """Resident bytes: FAISS's blocks of 32 codes and labels, the id bitmap, ``1/‖x̂‖`` by id, the
        probe's centroids, and FAISS's per-list containers (counted as three pointers each)."""
        invlists = self._blocks
        sizes = np.array([int(invlists.list_size(i)) for i in range(self.faiss_lists)], np.int64)
        blocks = int((-(-sizes // BLOCK)).sum())
        probe = 0 if self.probe is None else self.probe.ntotal * self.probe.d * 4
        norms = self.inverse_norms.nbytes if self.inverse_norms is not None else 0
        containers = self.faiss_lists * 2 * 3 * 8
        return int(blocks * BLOCK * self.pairs + int(sizes.sum()) * 8 + self.held.nbytes + norms + probe + containers)

    # --- search ---------------------------------------------------------------------------------

    def _allowed_labels(self, probed: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """The labels in FAISS lists ``probed`` of the images in ``allowed`` (sorted ids, non-empty)."""
        parts = []
        for list_no in np.unique(probed).tolist():
            if list_no < 0:
                continue
            labels, _ = self._list(list_no)
            if len(labels):
                parts.append(labels[_in_sorted(labels >> ID_SHIFT, allowed)])
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        allowed: np.ndarray | None = None,
        *,
        rerank: int | None = None,
        nprobe: int = DEFAULT_NPROBE,
        image_queries: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``queries`` ``(q, d)`` float32 → ``(scores, ids)`` ``(q, k')``, best first, ``-1`` padded.

        ``allowed``: sorted int64 image ids the scan is restricted to (None: all); ``rerank``: fast-scan
        candidates re-scored exactly (None: :func:`default_rerank`); ``nprobe``: lists probed (all when
        there is one list); ``image_queries``: the queries are image embeddings, scored through
        :attr:`item_layout` where there is one (scanned and re-ranked by it).
        """
        items = self.item_layout if image_queries else None
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        count = self.ntotal if allowed is None else int(self.contains(allowed).sum())
        k = min(k, count)
        q = len(queries)
        if k <= 0:
            return np.zeros((q, 0), np.float32), np.zeros((q, 0), np.int64)
        default_depth = default_rerank(self.ntotal) * (ITEM_RERANK_FACTOR if items is not None else 1)
        depth = min(max(default_depth if rerank is None else rerank, k), count)
        probes = min(nprobe, self.lists)
        if self.probe is None:
            assign = np.zeros((q, 1), np.int64)
            centroid_scores = np.zeros((q, 1), np.float32)
        else:
            centroid_scores, assign = self.probe.search(queries, probes)
        y = (items or self.layout).transform(queries)
        copies, lists = y, assign
        scales: np.ndarray | None = None
        if self.band_scales is not None:
            # One copy of each query per band, scaled to score ≈ the cosine there, probing that band's
            # lists. The bands are those of the text path's norms; an image query's copies are scaled
            # by the item path's norms there (its scores differ from the item path's inner products
            # by one constant per query).
            scales = self.band_scales if items is None else self.item_band_scales
            if scales is None:
                scales = np.ones_like(self.band_scales)
            copies = (y[:, None, :] * scales[None, :, None]).reshape(q * self.bands, -1)
            lists = (assign[:, None, :] * self.bands + np.arange(self.bands)[None, :, None]).reshape(q * self.bands, -1)
            centroid_scores = np.repeat(centroid_scores, self.bands, axis=0)
        lists = np.ascontiguousarray(lists, dtype=np.int64)
        params: Any = faiss.SearchParametersIVF()
        params.nprobe = probes
        selector = None
        if allowed is not None:
            # Labels carry the list, so the restriction is the allowed images' labels in the probed lists.
            allowed_labels = self._allowed_labels(lists, allowed)
            selector = faiss.IDSelectorBatch(len(allowed_labels), faiss.swig_ptr(allowed_labels))
            params.sel = selector
        scores = np.empty((len(copies), depth), np.float32)
        found = np.empty((len(copies), depth), np.int64)
        self.index.search_preassigned_c(
            len(copies),
            faiss.swig_ptr(copies),
            depth,
            faiss.swig_ptr(lists),
            faiss.swig_ptr(np.ascontiguousarray(centroid_scores, dtype=np.float32)),
            faiss.swig_ptr(scores),
            faiss.swig_ptr(found),
            False,
            params,
            None,
        )
        del params, selector  # the parameters point at the selector: both held until here
        if self.bands > 1:
            if items is not None and scales is not None:
                # FAISS scored the words with the scanned layout's centroids, which differ from the
                # item layout's by one shift per word: a constant per query, scaled differently in
                # each band's copy; taken off so that the bands' candidates compare.
                shift = y @ (self.layout.centroids[:, 0, :] - items.centroids[:, 0, :]).ravel()  # (q,)
                scores = scores - (shift[:, None] * scales[None, :]).reshape(-1, 1)
            # The best `depth` of every band's candidates, by their approximate cosines.
            scores, found = scores.reshape(q, -1), found.reshape(q, -1)
            best = np.argsort(-np.where(found >= 0, scores, -np.inf), axis=1, kind="stable")[:, :depth]
            found = np.take_along_axis(found, best, axis=1)
        return self._rerank(y, found, k, items)

    def _candidate_words(self, labels: np.ndarray) -> np.ndarray:
        """``(r, M)`` int64 indices ``16 m + word_m`` (rows of a ``(M * 16)`` table) of the codes of the
        held items under ``labels`` ``(r,)``, read from their lists' blocks at the places the labels
        give: one gather per list."""
        lists, offsets = self._place(labels)
        order = np.argsort(lists, kind="stable")
        at, shift = block_positions(offsets[order], self.pairs)
        raw = np.empty(at.shape, np.uint8)
        sorted_lists = lists[order]
        starts = np.flatnonzero(sorted_lists[1:] != sorted_lists[:-1]) + 1
        bounds = [0, *starts.tolist(), len(order)]
        views = self._views
        for list_no, start, end in zip(sorted_lists[bounds[:-1]].tolist(), bounds[:-1], bounds[1:], strict=True):
            held = views[list_no]
            raw[start:end] = (held if held is not None else self._list(list_no))[1][at[start:end]]
        flat = np.empty((len(labels), self.layout.words), np.int64)
        # raw[:, p, j] holds word 2p + j in the nibble `shift` selects: in word order once reshaped.
        flat[order] = ((raw >> shift) & 0x0F).reshape(len(labels), -1) + self._word_rows
        return flat

    @functools.cached_property
    def _word_rows(self) -> np.ndarray:
        """``(M,)`` int64 ``16 m``: where word ``m``'s 16 entries start in a flattened ``(M, 16)`` table."""
        return np.arange(self.layout.words, dtype=np.int64) * WORDS

    def _rerank(
        self, y: np.ndarray, found: np.ndarray, k: int, items: FourBitLayout | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosines of the candidates ``found`` ``(q, R)`` (labels, -1 none) → the best ``k`` per
        query; ``items``: the item layout ``y`` is in (image queries), else the scanned one."""
        q, depth = found.shape
        valid = found >= 0
        labels = np.where(valid, found, found[valid][0] if valid.any() else 0).ravel()
        layout = items or self.layout
        if valid.any():
            flat = self._candidate_words(labels).reshape(q, depth, layout.words)
        else:
            flat = np.broadcast_to(self._word_rows, (q, depth, layout.words))
        # tables[i, 16 m + w] = <y_i sub-vector m, centroid w of word m>, in float: the exact scores.
        tables = np.einsum("qmd,mwd->qmw", y.reshape(q, layout.words, -1), layout.centroids).reshape(q, -1)
        exact = tables[np.arange(q)[:, None, None], flat].sum(axis=2)
        ids = (labels >> ID_SHIFT).reshape(q, depth)
        if items is not None or self.norms_from_words:
            # From the words: the item layout's norms (none held), or an orthonormal layout's table sum.
            exact = exact * layout.words_inverse_norms(flat)
        elif self.inverse_norms is not None:
            exact = exact * self.inverse_norms[ids]
        exact = np.where(valid, exact, -np.inf).astype(np.float32)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        rows = np.arange(q)[:, None]
        best_scores, best_ids = exact[rows, order], ids[rows, order]
        return best_scores, np.where(np.isfinite(best_scores), best_ids, -1)
