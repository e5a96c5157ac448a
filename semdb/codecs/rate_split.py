"""A rate split: part of the bits for a primary code, the rest for a plain PQ of what it missed.

The query-weighted default spends its bits on the directions queries look along; item→item search
needs the directions in which the items themselves differ too. A rate split codes an item twice:
the primary codec (query-weighted ``pqvae-pca``) at ``bits − residual_bits``, then the residual
``e = ⟨x, v⟩ x − v`` of its scored vector ``v`` (in the searched, unweighted space; scaled so that the
sum points along ``x``) by a small product quantiser of 16-word codebooks over the residual's own
principal axes. The item is ``v + B ê``: a sum of the two decodes, and a search scores

    <q, v + Bᵀ ĉ> = <A₁ q, r₁(code₁)> + <B q, r₂(code₂)> = <[A₁; B] q, [r₁; r₂]>

— one product quantiser over the lifted space ``[A₁; B] q`` whose sub-quantisers are the primary's
and the residual's, on disjoint coordinates of that space. So with the residual's sub-vectors as
wide as the primary's (``residual_dims``, the primary's latent width by default) the whole code is
one 4-bit-word PQ: FAISS scans it (:attr:`RateSplitCodec.scanner`) and semdb's fast scan reads its
layout (:func:`semdb.index.fastscan.four_bit_layout`). Words are packed as semdb's pqvae packs them
(first word of a byte in its high nibble), the primary's words first. The residual's words are
chosen for the angle between ``v + Bᵀ ĉ`` and ``x`` (:func:`closest_in_angle`), since search ranks
by cosine; one word of each codebook is "no correction".

``items_only``: the residual corrects the primary's *item* vectors (``pqvae-pca`` with
``item_decoder``) and serves item queries only (:meth:`RateSplitCodec.item_cosine_index`); text
queries score the primary's code alone (the residual's rows of the layout are zero).

Measured (``docs/codecs.md`` §11g): on CuPL at 64 bits it lifts item→item recall but costs
text→image mAP more than mixing the data's spectrum into the weighting does, so it is not a default;
benchmark-only, it has no stored form (:meth:`RateSplitCodec.to_bytes` refuses).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import Self

import faiss
import numpy as np

from semdb.codecs.base import Codec, as_embeddings, check_bits
from semdb.codecs.faiss_codecs import byte_aligned_pq, index_holding, transformed_index
from semdb.cosine import CosineIndex, inverse_norms
from semdb.errors import InvalidArgumentError

WORD_BITS = 4
WORDS = 2**WORD_BITS


def _primary_layout(primary: Codec) -> tuple[np.ndarray, np.ndarray]:
    """``(matrix (m₁, d), centroids (M₁, 16, e))`` of a 4-bit-word primary codec, packed high-first."""
    from semdb.index.fastscan import four_bit_layout

    layout = four_bit_layout(primary)
    if layout is None or not layout.high_first or layout.matrix is None:
        raise InvalidArgumentError(f"a rate split needs a 4-bit-word primary codec, got {primary.describe()}")
    return layout.matrix, layout.centroids


def pack_words(words: np.ndarray) -> np.ndarray:
    """``(n, M)`` 4-bit word indices, ``M`` even → ``(n, M/2)`` uint8, first word in the high nibble."""
    w = words.astype(np.uint8).reshape(len(words), -1, 2)
    return np.ascontiguousarray((w[:, :, 0] << 4) | w[:, :, 1])


def unpack_words(codes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_words` → ``(n, M)`` int64."""
    return np.stack([codes >> 4, codes & 0x0F], axis=2).reshape(len(codes), -1).astype(np.int64)


def nearest_words(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """``(n, M·e)`` sub-vectors, ``centroids`` ``(M, 16, e)`` → ``(n, M)`` nearest words (L2)."""
    M, _, e = centroids.shape
    sub = vectors.reshape(len(vectors), M, e)
    distances = (
        (sub**2).sum(2)[:, :, None] - 2 * np.einsum("nme,mke->nmk", sub, centroids) + (centroids**2).sum(2)[None]
    )
    return distances.argmin(2)


class RateSplitCodec(Codec):
    """A primary codec's code followed by a plain 4-bit PQ of its residual (module docstring)."""

    name = "rate-split"

    def __init__(
        self,
        primary: Codec,
        basis: np.ndarray,
        centroids: np.ndarray,
        decoder: np.ndarray | None = None,
        items_only: bool = False,
    ) -> None:
        words = centroids.shape[0]
        super().__init__(primary.dim, primary.bits_per_image + words * WORD_BITS)
        self.primary = primary
        self.basis = np.ascontiguousarray(basis, dtype=np.float32)  # B (m₂, d), orthonormal rows
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)  # (M₂, 16, e)
        # (m₁ + m₂, d): the lifted code r → its scored vector r · decoder, refitted by least squares
        # (``refit``); None: [A₁; B], the primary's own decoder plus the residual's basis.
        self.decoder = None if decoder is None else np.ascontiguousarray(decoder, dtype=np.float32)
        # True: the residual corrects the primary's item vectors (its item decoder) and serves item
        # queries only; text queries score the primary's code alone (the residual's rows are zero).
        self.items_only = items_only

    @classmethod
    def train(  # type: ignore[override]
        cls,
        embeddings: np.ndarray,
        bits_per_image: int,
        seed: int = 0,
        *,
        primary: Codec,
        residual_dims: int = 0,
        refit: bool = False,
        items_only: bool = False,
    ) -> Self:
        """Fit the residual PQ of ``primary`` (trained already, on these ``embeddings`` ``(n, d)``)
        so that the whole code has ``bits_per_image`` bits; ``residual_dims``: axes per residual
        sub-vector (0: the primary's latent width, which keeps the code one fast-scannable PQ).
        ``refit``: then replace the decoder of the whole lifted code by the least-squares map onto
        ``embeddings`` (:func:`refit_decoder`); ``residual_bits`` may then be 0."""
        from semdb.codecs.pcapq import principal_basis

        check_bits(bits_per_image)
        x = as_embeddings(embeddings, primary.dim)
        residual_bits = bits_per_image - primary.bits_per_image
        if residual_bits < 0 or residual_bits % 8 or not (residual_bits or refit):
            raise InvalidArgumentError(
                f"a rate split needs a positive multiple of 8 residual bits, got {bits_per_image} − "
                f"{primary.bits_per_image}"
            )
        _, primary_centroids = _primary_layout(primary)
        e = residual_dims or primary_centroids.shape[2]
        words = residual_bits // WORD_BITS
        if words * e > primary.dim:
            raise InvalidArgumentError(f"{words} residual words of {e} axes exceed the {primary.dim} dimensions")
        if items_only and primary.item_vectors(primary.encode(x[:1])) is None:
            raise InvalidArgumentError("a residual for item queries needs a primary codec with an item decoder")
        anchor = _item_anchor(primary) if items_only else primary.scored_vectors
        if words:
            residual = _residuals(anchor, primary, x)
            basis = principal_basis(residual, words * e)
            projected = np.ascontiguousarray(residual @ basis.T)
            centroids = np.stack([_codebook(projected[:, j * e : (j + 1) * e], seed + j) for j in range(words)])
        else:
            basis, centroids = np.zeros((0, primary.dim), np.float32), np.zeros((0, WORDS, e), np.float32)
        codec = cls(primary, basis, centroids, items_only=items_only)
        if not refit or items_only:
            return codec
        return cls(primary, basis, centroids, refit_decoder(codec, x))

    def encode(self, embeddings: np.ndarray) -> np.ndarray:
        """``(n, d)`` → ``(n, code_size)`` uint8: the primary's code, then the residual's words."""
        x = as_embeddings(embeddings, self.dim)
        first = self.primary.encode(x)
        if not len(self.centroids):
            return first
        parts = []
        for start in range(0, len(x), 16_384):
            part, codes = x[start : start + 16_384], first[start : start + 16_384]
            v = self._anchor(codes)
            words = nearest_words(_off_line(v, part) @ self.basis.T, self.centroids)
            if self.decoder is None:
                words = closest_in_angle(part, v, self.basis, self.centroids, words)
            parts.append(pack_words(words))
        return np.ascontiguousarray(np.hstack([first, np.concatenate(parts)]))

    def _anchor(self, primary_codes: np.ndarray) -> np.ndarray:
        """What the residual corrects: the primary's item vectors (``items_only``) or scored vectors."""
        return (
            _item_anchor(self.primary)(primary_codes) if self.items_only else self.primary.scored_vectors(primary_codes)
        )

    def item_vectors(self, codes: np.ndarray) -> np.ndarray | None:
        """``items_only``: the primary's item vectors plus the decoded residual, else None."""
        if not self.items_only:
            return None
        c = self.check_codes(codes)
        split = self.primary.code_size
        words = unpack_words(c[:, split:])
        residual = self.centroids[np.arange(self.centroids.shape[0]), words].reshape(len(c), -1) @ self.basis
        vectors: np.ndarray = (self._anchor(c[:, :split]) + residual).astype(np.float32)
        return vectors

    def cosine_index(self, codes: np.ndarray) -> CosineIndex:
        """``items_only``: the primary's own index over its part of the codes (text queries)."""
        if self.items_only:
            return self.primary.cosine_index(self.check_codes(codes)[:, : self.primary.code_size])
        return super().cosine_index(codes)

    @property
    def has_item_path(self) -> bool:
        """``items_only``: item queries score the residual too (:meth:`item_cosine_index`)."""
        return self.items_only

    def item_cosine_index(self, codes: np.ndarray) -> CosineIndex | None:
        """``items_only``: :meth:`item_vectors` by cosine in a flat index, else None."""
        if not self.items_only:
            return None
        c = self.check_codes(codes)

        def flat(rows: np.ndarray) -> faiss.Index:
            index = faiss.IndexFlatIP(self.dim)
            vectors = self.item_vectors(rows)
            if len(rows) and vectors is not None:
                index.add(np.ascontiguousarray(vectors, dtype=np.float32))
            return index

        vectors = self.item_vectors(c)
        assert vectors is not None
        return CosineIndex.build(c, flat, inverse_norms(vectors))

    def scored_vectors(self, codes: np.ndarray) -> np.ndarray:
        """``(n, code_size)`` → ``(n, d)``: the primary's scored vector plus the decoded residual."""
        c = self.check_codes(codes)
        if self.items_only:
            return self.primary.scored_vectors(c[:, : self.primary.code_size])
        if self.decoder is not None:
            refitted: np.ndarray = self.lifted(c) @ self.decoder
            return refitted
        split = self.primary.code_size
        words = unpack_words(c[:, split:])
        residual = self.centroids[np.arange(self.centroids.shape[0]), words].reshape(len(c), -1) @ self.basis
        vectors: np.ndarray = (self.primary.scored_vectors(c[:, :split]) + residual).astype(np.float32)
        return vectors

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """``(n, code_size)`` → ``(n, d)`` unit-norm reconstructions."""
        v = self.scored_vectors(codes)
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        out: np.ndarray = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)
        return out

    @cached_property
    def layout(self) -> tuple[np.ndarray, np.ndarray]:
        """``(matrix (m₁ + m₂, d), centroids (M₁ + M₂, 16, e))``: the whole code as one PQ, or a
        ``ValueError`` when the residual's sub-vectors are not as wide as the primary's."""
        matrix, centroids = _primary_layout(self.primary)
        if centroids.shape[2] != self.centroids.shape[2]:
            raise ValueError("residual sub-vectors differ in width from the primary's: not one PQ")
        residual_rows = np.zeros_like(self.basis) if self.items_only else self.basis
        lifted = np.vstack([matrix, residual_rows]) if self.decoder is None else self.decoder
        return lifted, np.concatenate([centroids, self.centroids])

    def lifted(self, codes: np.ndarray) -> np.ndarray:
        """``(n, code_size)`` → ``(n, m₁ + m₂)``: the concatenated centroids the words select."""
        _, centroids = self.layout
        words = unpack_words(self.check_codes(codes))
        lifted: np.ndarray = centroids[np.arange(len(centroids)), words].reshape(len(words), -1)
        return lifted

    @cached_property
    def scanner(self) -> faiss.Index | None:
        """An empty FAISS index scoring the codes as one 4-bit PQ in the lifted space, or None."""
        try:
            matrix, centroids = self.layout
        except ValueError:
            return None
        scanner: faiss.Index = transformed_index(matrix, byte_aligned_pq(centroids, WORD_BITS, first_index_high=True))
        return scanner

    def search_index(self, codes: np.ndarray) -> faiss.Index:
        """The codes scanned by :attr:`scanner`, or the decoded vectors in a flat index."""
        if self.scanner is None:
            index = faiss.IndexFlatIP(self.dim)
            if len(codes):
                index.add(self.scored_vectors(codes))
            return index
        return index_holding(self.scanner, self.check_codes(codes))

    def to_bytes(self) -> bytes:
        """Not stored yet: the rate split is measured by the benchmarks only."""
        raise NotImplementedError("the rate-split codec cannot be stored yet")

    @classmethod
    def from_bytes(cls, state: bytes) -> Self:
        """Not stored yet (:meth:`to_bytes`)."""
        raise NotImplementedError("the rate-split codec cannot be stored yet")

    def describe(self) -> str:
        """E.g. ``pqvae-pca 48 bits (...), query-weighted + residual pq 16 bits (4 x 6 axes)``."""
        M, _, e = self.centroids.shape
        return f"{self.primary.describe()} + residual pq {M * WORD_BITS} bits ({M} x {e} axes)"


def _off_line(v: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``⟨x, v⟩ x − v``: the part of ``v`` off the line of the unit rows ``x``, sign changed."""
    out: np.ndarray = (v * x).sum(axis=1, keepdims=True) * x - v
    return out


def closest_in_angle(
    x: np.ndarray, v: np.ndarray, basis: np.ndarray, centroids: np.ndarray, words: np.ndarray, sweeps: int = 3
) -> np.ndarray:
    """The residual words ``(n, M₂)`` that make ``v + Bᵀ ĉ`` point closest to ``x`` (largest cosine),
    by coordinate ascent from ``words``: search ranks by cosine, so the angle, not the distance to a
    target, is what the residual should shrink. ``x``, ``v``: ``(n, d)``; ``basis`` ``(M₂·e, d)``
    orthonormal rows; ``centroids`` ``(M₂, 16, e)``. With the subspaces disjoint and orthonormal,
    ``⟨x, r⟩ = ⟨x, v⟩ + Σⱼ ⟨xⱼ, cⱼ⟩`` and ``‖r‖² = ‖v‖² + Σⱼ (‖cⱼ‖² + 2 ⟨vⱼ, cⱼ⟩)``, so each word's
    16 choices are scored from ``(n, 16)`` tables."""
    M, _, e = centroids.shape
    xs = (x @ basis.T).reshape(len(x), M, e)
    vs = (v @ basis.T).reshape(len(x), M, e)
    along = np.einsum("nme,mke->nmk", xs, centroids)  # (n, M, 16): ⟨xⱼ, c⟩
    square = (centroids**2).sum(2)[None] + 2 * np.einsum("nme,mke->nmk", vs, centroids)  # ‖c‖² + 2⟨vⱼ, c⟩
    chosen = words.copy()
    rows = np.arange(len(x))[:, None]
    picked_along = np.take_along_axis(along, chosen[:, :, None], 2)[:, :, 0]
    picked_square = np.take_along_axis(square, chosen[:, :, None], 2)[:, :, 0]
    base_along, base_square = (x * v).sum(1), (v * v).sum(1)
    for _ in range(sweeps):
        for j in range(M):
            a = base_along + picked_along.sum(1) - picked_along[:, j]
            b = base_square + picked_square.sum(1) - picked_square[:, j]
            cosine = (a[:, None] + along[:, j]) / np.sqrt(np.maximum(b[:, None] + square[:, j], 1e-12))
            best = cosine.argmax(1)
            chosen[:, j] = best
            picked_along[:, j] = along[rows[:, 0], j, best]
            picked_square[:, j] = square[rows[:, 0], j, best]
    return chosen


def _item_anchor(primary: Codec) -> Callable[[np.ndarray], np.ndarray]:
    """The primary's item vectors as a function of its codes (checked to exist by the caller)."""

    def vectors(codes: np.ndarray) -> np.ndarray:
        out = primary.item_vectors(codes)
        assert out is not None
        return np.asarray(out, dtype=np.float32)

    return vectors


def _residuals(
    anchor: Callable[[np.ndarray], np.ndarray], primary: Codec, x: np.ndarray, codes: np.ndarray | None = None
) -> np.ndarray:
    """``⟨x, v⟩ x − v`` ``(n, d)`` float32 for the primary's scored vectors ``v`` of ``x`` (unit rows): the
    part of ``v`` off the line of ``x``, sign changed — the sum then points along ``x`` without the
    residual having to rescale what ``v`` already got right."""
    out = np.empty_like(x)
    for start in range(0, len(x), 65_536):
        part = x[start : start + 65_536]
        c = primary.encode(part) if codes is None else codes[start : start + 65_536]
        v = anchor(c)
        out[start : start + len(part)] = _off_line(v, part)
    return out


def _codebook(points: np.ndarray, seed: int) -> np.ndarray:
    """16 k-means centroids ``(16, e)`` of ``points`` ``(n, e)`` (FAISS, seeded, 25 iterations)."""
    points = np.ascontiguousarray(points, dtype=np.float32)
    if len(points) <= WORDS:
        return points[np.arange(WORDS) % len(points)] if len(points) else np.zeros((WORDS, points.shape[1]), np.float32)
    kmeans = faiss.Kmeans(points.shape[1], WORDS, niter=25, seed=seed, max_points_per_centroid=100_000)
    kmeans.train(points)
    centroids = np.array(kmeans.centroids, dtype=np.float32)
    # One word is "no correction", so that the angle search (closest_in_angle) can always do no harm.
    centroids[np.argmin((centroids**2).sum(1))] = 0
    return centroids


def refit_decoder(codec: RateSplitCodec, x: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """``(m, d)``: the linear map of the lifted codes ``R`` of ``x`` ``(n, d)`` onto ``x`` with the
    least squared error, ``(RᵀR + ε)⁻¹ RᵀX``.

    The original decoder is one such linear map, so on ``x`` the refit's error covariance
    ``E[(x − x̂)(x − x̂)ᵀ]`` is no larger in any direction: every query's score error
    ``E⟨q, x − x̂⟩²`` (text or item) is at most what it was.
    """
    gram, cross = None, None
    for start in range(0, len(x), 65_536):
        part = x[start : start + 65_536]
        r = codec.lifted(codec.encode(part)).astype(np.float64)
        gram = r.T @ r if gram is None else gram + r.T @ r
        cross = r.T @ part if cross is None else cross + r.T @ part
    assert gram is not None and cross is not None
    scale = max(float(np.trace(gram)) / len(gram), 1e-12)
    decoder: np.ndarray = np.linalg.solve(gram + ridge * scale * np.eye(len(gram)), cross).astype(np.float32)
    return decoder
