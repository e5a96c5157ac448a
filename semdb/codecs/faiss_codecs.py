"""The FAISS baselines: product (``pq``), optimised product (``opq``) and residual (``rq``) quantisers.

Each codec wraps one trained FAISS index whose standalone codec (``sa_encode``/``sa_decode``) makes
codes of exactly ``bits_per_image / 8`` bytes; the state is FAISS's own serialisation of that index
(``faiss.serialize_index``), not pickle, read back by a strict parser (:mod:`semdb.codecs.faiss_state`)
rather than by FAISS, which trusts the sizes it reads. All three use the inner-product metric, so
:meth:`search_index` scores ``<query, decoded item>`` straight from the codes (asymmetric distance).

**Layout.** ``bits_per_image = M × nbits``: ``M`` sub-quantisers (PQ/OPQ: sub-vectors, ``d % M == 0``;
RQ: residual stages) of ``2**nbits`` centroids each. ``nbits = 8`` is preferred (FAISS's fast path);
other ``nbits`` are used when 8 gives no valid layout (e.g. ``d = 16`` at 256 bits).

**Small training sets.** k-means needs at least as many training vectors ``n`` as centroids. When
``n < 256`` the layout uses the largest ``nbits <= floor(log2(n))`` that is valid, so ordinary
k-means still runs. When even that is impossible (``n = 1``, or no valid layout is small enough),
the smallest valid ``nbits`` is taken. Whenever ``n <= 2**nbits``, each codebook is filled with the
training (sub-)vectors themselves, repeated: with no more training vectors than centroids this
reproduces every training vector exactly, the optimum k-means would seek; RQ puts the training
vectors in its first stage and zeros in the others. OPQ keeps the identity rotation then, and
whenever ``n < 2 d`` (too few vectors to learn a d × d rotation from; FAISS aborts on some such sets).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Self

import faiss
import numpy as np

from semdb.codecs.base import Codec, as_embeddings, check_bits, check_state_size, damaged
from semdb.codecs.faiss_state import (
    PQState,
    RQState,
    StateReader,
    pq_layout_fits,
    read_pq_index,
    read_rotated_pq_index,
    read_rq_index,
)
from semdb.errors import InvalidArgumentError

# nbits in order of preference: 8 (FAISS's byte-aligned fast path), then smaller codebooks, which
# train on fewer vectors, then larger ones, which are only needed when d is too small for 8.
_NBITS_PREFERENCE = (8, 7, 6, 5, 4, 3, 2, 1, 9, 10, 11, 12, 13, 14, 15, 16)


def choose_layout(dim: int, bits_per_image: int, n_train: int, split_dims: bool) -> tuple[int, int]:
    """Pick ``(M, nbits)`` with ``M * nbits == bits_per_image`` for ``n_train`` training vectors.

    ``split_dims``: the ``M`` quantisers each take ``dim / M`` dimensions (PQ, OPQ), so ``dim % M``
    must be 0. Returns the first ``nbits`` of :data:`_NBITS_PREFERENCE` that is valid and has no more
    centroids than training vectors, else the smallest valid ``nbits`` (see the module docstring).
    """
    bits = check_bits(bits_per_image)
    valid = [
        nbits
        for nbits in _NBITS_PREFERENCE
        if bits % nbits == 0 and pq_layout_fits(dim, bits // nbits, nbits, split_dims)
    ]
    if not valid:
        raise InvalidArgumentError(
            f"no product-quantiser layout for {dim}-d embeddings at {bits} bits: need M sub-vectors of "
            f"nbits <= 16 bits each with M * nbits = {bits} and {dim} divisible by M; try another --bits "
            f"or the rq codec"
        )
    trainable = [nbits for nbits in valid if 2**nbits <= n_train]
    nbits = trainable[0] if trainable else min(valid)
    return bits // nbits, nbits


def byte_aligned_pq(centroids: np.ndarray, bits: int, first_index_high: bool) -> Any:
    """An empty 8-bit inner-product ``IndexPQ`` that scores codes of ``M`` sub-quantisers of
    ``bits`` ∈ {1, 2, 4, 8} bits, packed ``8 // bits`` to a byte, exactly as their own PQ would.

    ``centroids``: ``(M, 2**bits, e)`` float32. Each byte becomes one sub-quantiser over the
    ``8 // bits`` sub-vectors it packs, whose 256 centroids are the concatenations of the centroids
    its indices select (the Cartesian product), so the codes need no conversion; FAISS scans 8-bit
    codes several times faster than packed smaller ones (4.8x for 32 x 4-bit codes, ad hoc).
    ``first_index_high``: the byte's first index sits in its most significant bits (semdb's pqvae
    packing) rather than its least (FAISS's own).
    """
    per_byte = 8 // bits
    M, K, e = centroids.shape
    if 8 % bits or M % per_byte or 2**bits != K:
        raise ValueError(f"cannot pack {M} sub-quantisers of {bits} bits into whole bytes")
    values = np.arange(256)
    positions = range(per_byte - 1, -1, -1) if first_index_high else range(per_byte)
    # indices[k, v]: the index of the byte's k-th sub-quantiser in byte value v.
    indices = np.stack([(values >> (position * bits)) & (K - 1) for position in positions])
    grouped = centroids.reshape(M // per_byte, per_byte, K, e)
    merged = np.concatenate([grouped[:, k][:, indices[k]] for k in range(per_byte)], axis=-1)
    index: Any = faiss.IndexPQ(M * e, M // per_byte, 8, faiss.METRIC_INNER_PRODUCT)
    faiss.copy_array_to_vector(np.ascontiguousarray(merged, dtype=np.float32).ravel(), index.pq.centroids)
    index.is_trained = True
    return index


def index_holding(scanner: faiss.Index, codes: np.ndarray) -> faiss.Index:
    """A copy of the empty trained ``scanner`` holding ``codes`` ``(n, code_size)`` uint8 (row ``i``
    = ``codes[i]``), behind its pre-transform if it has one."""
    index = faiss.clone_index(scanner)
    if len(codes):
        if isinstance(index, faiss.IndexPreTransform):
            # The pre-transform does not forward add_sa_codes: the codes go to the inner index.
            inner = faiss.downcast_index(index.index)
            inner.add_sa_codes(codes)
            index.ntotal = inner.ntotal
        else:
            index.add_sa_codes(codes)
    return index


def transformed_index(matrix: np.ndarray, index: faiss.Index, orthonormal: bool = False) -> Any:
    """``IndexPreTransform`` of ``y = matrix · x`` (``matrix`` ``(m, d)`` float32) in front of
    ``index`` (``m``-d), owning both, so that it may be used, cloned or freed like any FAISS index.

    ``orthonormal``: the rows of ``matrix`` are orthonormal, which lets FAISS decode through the
    transpose (``sa_decode``).
    """
    m, d = matrix.shape
    transform: Any = faiss.LinearTransform(d, m, False)
    faiss.copy_array_to_vector(np.ascontiguousarray(matrix, dtype=np.float32).ravel(), transform.A)
    transform.is_orthonormal = orthonormal
    transform.is_trained = True
    inner: Any = index
    owned: Any = faiss.IndexPreTransform(transform, inner)
    owned.ntotal = inner.ntotal
    owned.own_fields = True
    transform.this.disown()
    inner.this.disown()
    return owned


def cast_index(index: faiss.Index) -> Any:
    """A non-owning view of ``index`` as its concrete FAISS class (whose attributes FAISS's type
    stubs do not declare); ``index`` must outlive it."""
    return faiss.downcast_index(index)


def _cyclic_codebook(vectors: np.ndarray, size: int) -> np.ndarray:
    """``size`` rows taken cyclically from ``vectors`` ``(n, k)`` → ``(size, k)`` float32."""
    return np.ascontiguousarray(vectors[np.arange(size) % len(vectors)], dtype=np.float32)


def pq_index(pq: PQState) -> Any:
    """A trained, empty inner-product ``IndexPQ`` with the centroids of ``pq``."""
    index: Any = faiss.IndexPQ(pq.dim, pq.M, pq.nbits, faiss.METRIC_INNER_PRODUCT)
    _set_vector(index.pq.centroids, pq.centroids)
    index.is_trained = True
    return index


def rotated_index(codec: str, matrix: np.ndarray, pq: PQState) -> Any:
    """``IndexPreTransform`` of the orthonormal ``matrix`` ``(m, d)`` in front of an ``IndexPQ`` of
    ``pq`` (``m``-d); a matrix whose rows are not orthonormal is a damaged ``codec`` state, since
    decoding goes through its transpose."""
    index = transformed_index(matrix, pq_index(pq))
    transform: Any = faiss.downcast_VectorTransform(index.chain.at(0))
    transform.set_is_orthonormal()  # FAISS's own test, as when it reads a transform
    if not transform.is_orthonormal:
        raise damaged(codec, "rotation matrix has rows that are not orthonormal")
    return index


def _set_vector(vector: faiss.Float32Vector, values: np.ndarray) -> None:
    """Overwrite a FAISS float vector with ``values`` (any shape, flattened)."""
    vector.resize(0)
    faiss.copy_array_to_vector(np.ascontiguousarray(values, dtype=np.float32).ravel(), vector)


def _quiet(clustering: faiss.ClusteringParameters, seed: int) -> None:
    """Seed a k-means and let it run on any number of points ≥ centroids without a warning.

    FAISS warns below 39 points per centroid; small collections are a supported case here.
    """
    clustering.seed = seed
    clustering.min_points_per_centroid = 1


class FaissCodec(Codec):
    """A codec backed by one trained FAISS index used through its standalone codec interface."""

    def __init__(self, index: faiss.Index) -> None:
        super().__init__(index.d, index.sa_code_size() * 8)
        self.index = index

    def encode(self, embeddings: np.ndarray) -> np.ndarray:
        """``(n, d)`` float32 → ``(n, code_size)`` uint8."""
        x = as_embeddings(embeddings, self.dim)
        if not len(x):
            return np.empty((0, self.code_size), dtype=np.uint8)
        codes: np.ndarray = self.index.sa_encode(x)
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """``(n, code_size)`` uint8 → ``(n, d)`` float32."""
        c = self.check_codes(codes)
        if not len(c):
            return np.empty((0, self.dim), dtype=np.float32)
        decoded: np.ndarray = self.index.sa_decode(c)
        return decoded

    @property
    def scanner(self) -> faiss.Index:
        """The empty trained index that :meth:`search_index` copies and fills: the codec's own."""
        return self.index

    def search_index(self, codes: np.ndarray) -> faiss.Index:
        """A copy of :attr:`scanner` holding ``codes`` ``(n, code_size)`` uint8: row ``i`` = ``codes[i]``.

        Search is asymmetric: queries stay float, the items stay codes, scores are
        ``<query, decode(code)>``.
        """
        return index_holding(self.scanner, self.check_codes(codes))

    def to_bytes(self) -> bytes:
        """FAISS's serialisation of the trained (empty) index."""
        return bytes(faiss.serialize_index(self.index).tobytes())

    @classmethod
    def from_bytes(cls, state: bytes) -> Self:
        """Inverse of :meth:`to_bytes`: the state is parsed and checked field by field and the index
        rebuilt from its arrays; raises :class:`~semdb.codecs.base.CodecStateError` on damaged or
        foreign bytes (a one-line message naming the field)."""
        reader = StateReader(cls.name, check_state_size(cls.name, state))
        index = cls.rebuild(reader)
        reader.finish()
        return cls(index)

    @classmethod
    @abstractmethod
    def rebuild(cls, reader: StateReader) -> faiss.Index:
        """The trained index serialised in ``reader``'s state, read to its end."""


class PQCodec(FaissCodec):
    """Product quantiser: ``M`` sub-vectors of ``d / M`` dimensions, ``2**nbits`` centroids each."""

    name = "pq"

    @classmethod
    def train(cls, embeddings: np.ndarray, bits_per_image: int, seed: int = 0) -> Self:
        """Train on ``embeddings`` ``(n, d)`` float32; the layout follows :func:`choose_layout`."""
        x = as_embeddings(embeddings)
        M, nbits = choose_layout(x.shape[1], bits_per_image, len(x), split_dims=True)
        index = faiss.IndexPQ(x.shape[1], M, nbits, faiss.METRIC_INNER_PRODUCT)
        train_pq(index.pq, x, seed)
        index.is_trained = True
        return cls(index)

    @classmethod
    def rebuild(cls, reader: StateReader) -> faiss.Index:
        """An ``IndexPQ`` (:func:`~semdb.codecs.faiss_state.read_pq_index`)."""
        index: faiss.Index = pq_index(read_pq_index(reader))
        return index

    def describe(self) -> str:
        """E.g. ``pq 64 bits (8x8)``: M sub-quantisers x nbits."""
        pq = cast_index(self.index).pq
        return f"{self.name} {self.bits_per_image} bits ({pq.M}x{pq.nbits})"


def train_pq(pq: faiss.ProductQuantizer, x: np.ndarray, seed: int) -> None:
    """Train ``pq`` on ``x`` ``(n, d)``: k-means, or the cyclic codebooks when ``n <= 2**nbits``."""
    _quiet(pq.cp, seed)
    if len(x) > pq.ksub:
        pq.train(x)
        return
    sub = x.reshape(len(x), pq.M, pq.dsub).transpose(1, 0, 2)  # (M, n, dsub)
    _set_vector(pq.centroids, np.stack([_cyclic_codebook(s, pq.ksub) for s in sub]))


class OPQCodec(FaissCodec):
    """OPQ rotation followed by a product quantiser (FAISS ``OPQM,PQMxnbits``)."""

    name = "opq"

    @classmethod
    def train(cls, embeddings: np.ndarray, bits_per_image: int, seed: int = 0) -> Self:
        """Train on ``embeddings`` ``(n, d)`` float32; the layout follows :func:`choose_layout`."""
        x = as_embeddings(embeddings)
        d = x.shape[1]
        M, nbits = choose_layout(d, bits_per_image, len(x), split_dims=True)
        # Built by the factory so that the C++ index owns its parts; they are trained one by one.
        index: Any = faiss.index_factory(d, f"OPQ{M},PQ{M}x{nbits}", faiss.METRIC_INNER_PRODUCT)
        opq: Any = faiss.downcast_VectorTransform(index.chain.at(0))
        pq_index = cast_index(index.index)
        if len(x) > 2**nbits and len(x) >= 2 * d:
            # OPQ alternates rotation and PQ training; by default with an 8-bit PQ, which would need
            # 256 training vectors, so it gets one of the chosen layout.
            inner_pq = faiss.ProductQuantizer(d, M, nbits)
            _quiet(inner_pq.cp, seed)
            opq.pq = inner_pq
            opq.train(x)
            opq.pq = None
        else:
            _set_vector(opq.A, np.eye(d, dtype=np.float32))
            opq.is_trained = True
            opq.is_orthonormal = True
        train_pq(pq_index.pq, opq.apply(x), seed)
        pq_index.is_trained = True
        index.is_trained = True
        return cls(index)

    @classmethod
    def rebuild(cls, reader: StateReader) -> faiss.Index:
        """A d x d rotation in front of an ``IndexPQ``."""
        matrix, pq = read_rotated_pq_index(reader, square=True)
        index: faiss.Index = rotated_index(cls.name, matrix, pq)
        return index

    def describe(self) -> str:
        """E.g. ``opq 64 bits (8x8)``: M sub-quantisers x nbits."""
        pq = cast_index(cast_index(self.index).index).pq
        return f"{self.name} {self.bits_per_image} bits ({pq.M}x{pq.nbits})"


class RQCodec(FaissCodec):
    """Residual quantiser: ``M`` stages of ``2**nbits`` full-dimensional centroids, beam-search encoded."""

    name = "rq"

    @classmethod
    def train(cls, embeddings: np.ndarray, bits_per_image: int, seed: int = 0) -> Self:
        """Train on ``embeddings`` ``(n, d)`` float32; the layout follows :func:`choose_layout`."""
        x = as_embeddings(embeddings)
        d = x.shape[1]
        M, nbits = choose_layout(d, bits_per_image, len(x), split_dims=False)
        # The default search type, ST_decompress, stores no norm with the code (the inner-product
        # metric needs none), so the code is exactly M * nbits bits.
        index: Any = faiss.IndexResidualQuantizer(d, M, nbits, faiss.METRIC_INNER_PRODUCT)
        _quiet(index.rq.cp, seed)
        if len(x) < 2 * d:
            # The default progressive-dimension k-means starts from a PCA, which needs n > d points.
            index.rq.train_type = faiss.ResidualQuantizer.Train_default
        if len(x) > 2**nbits:
            index.train(x)
        else:
            codebooks = np.zeros((M, 2**nbits, d), dtype=np.float32)
            codebooks[0] = _cyclic_codebook(x, 2**nbits)
            _set_vector(index.rq.codebooks, codebooks)
            index.rq.is_trained = True
            index.is_trained = True
        return cls(index)

    @classmethod
    def rebuild(cls, reader: StateReader) -> faiss.Index:
        """An ``IndexResidualQuantizer`` (:func:`~semdb.codecs.faiss_state.read_rq_index`)."""
        rq: RQState = read_rq_index(reader)
        index: Any = faiss.IndexResidualQuantizer(rq.dim, rq.M, rq.nbits, faiss.METRIC_INNER_PRODUCT)
        _set_vector(index.rq.codebooks, rq.codebooks)
        # What FAISS's reader would set too. It would also precompute the codebook cross-product
        # tables, (M·2**nbits)² / 2 floats, which only beam-search LUTs use and semdb never enables.
        index.rq.norm_min, index.rq.norm_max = rq.norm_min, rq.norm_max
        index.rq.train_type, index.rq.max_beam_size = rq.train_type, rq.max_beam_size
        index.rq.is_trained = True
        index.is_trained = True
        rebuilt: faiss.Index = index
        return rebuilt

    def describe(self) -> str:
        """E.g. ``rq 64 bits (8x8)``: M stages x nbits."""
        rq = cast_index(self.index).rq
        return f"{self.name} {self.bits_per_image} bits ({rq.M}x{rq.nbits.at(0)})"
