"""``pcapq``: a product quantiser with small codebooks over the leading principal components.

The embedding is rotated onto an orthonormal basis — the mean direction, then the principal
components of what varies around it — cut to its first ``m`` axes, and those are coded by a FAISS
product quantiser of ``M`` sub-vectors of 8 dimensions with 16-word (4-bit) codebooks: 0.5 bits per
kept dimension, so ``m = 2 × bits`` (capped at ``d``). Decoding rotates back; the discarded axes
decode to zero. It is FAISS throughout (``IndexPreTransform(LinearTransform, IndexPQ)``), so codes
are searched by asymmetric distance like ``pq``'s — a byte at a time, through an 8-bit PQ that
scores the packed 4-bit codes exactly (:func:`~semdb.codecs.faiss_codecs.byte_aligned_pq`).

**Why.** Codecs whose codewords are many full-width vectors (``rq``, ``opq``, ``pqvae``) learn the
clusters of their training set; on CuPL, where the test classes are not the training classes, RQ at
32 bits reconstructs training sentences at cosine .887 and held-out ones at .741, and FAISS's LSQ,
which fits the training set better still (.897), does worse on held-out ones (.725; zero-shot .664 →
.502). Principal axes and 16-word codebooks of 8-d sub-vectors have too few degrees of freedom to
memorise classes, and spreading the bits thinly over many axes keeps more of what queries compare
than spending them finely on few: on CuPL at 64 bits with query weighting, 1 bit on each of 64 axes
gave zero-shot .916 / mAP@100 .844, 0.5 bits on 128 axes .904 / .897, 1 bit per axis as 4-word
codebooks of 2-d sub-vectors .911 / .831
(``docs/codecs.md`` §00 has the sweep; 0.5 bits per axis was the best mAP at 32, 64 and 128 bits and
within .015 of the best zero-shot at 32 and 64).

Combined with query weighting (``train_codec("pcapq", x, bits, queries=Q)``), the principal axes are
those of ``W x``: the directions queries tell apart.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Self

import faiss
import numpy as np

from semdb.codecs.base import as_embeddings, check_bits
from semdb.codecs.faiss_codecs import (
    FaissCodec,
    byte_aligned_pq,
    cast_index,
    rotated_index,
    train_pq,
    transformed_index,
)
from semdb.codecs.faiss_state import StateReader, read_rotated_pq_index
from semdb.errors import InvalidArgumentError

SUBVECTOR_DIMS = 8  # dimensions per sub-quantiser
PREFERRED_NBITS = 4  # bits per sub-quantiser: 16-word codebooks, 0.5 bits per kept dimension
MAX_NBITS = 16


def pcapq_layout(dim: int, bits_per_image: int) -> tuple[int, int, int]:
    """``(kept dimensions m, sub-quantisers M, nbits)`` with ``M × nbits = bits_per_image``.

    ``nbits`` is 4 where ``d`` allows it, else the smallest multiple-of-bits value that leaves at most
    one sub-quantiser per dimension; ``m = M × min(8, d // M)``.
    """
    bits = check_bits(bits_per_image)
    for nbits in range(PREFERRED_NBITS, MAX_NBITS + 1):
        M = bits // nbits
        if bits % nbits == 0 and dim >= M:
            return M * min(SUBVECTOR_DIMS, dim // M), M, nbits
    raise InvalidArgumentError(
        f"no pcapq layout for {dim}-d embeddings at {bits} bits (at most {MAX_NBITS} bits per dimension): "
        f"choose fewer --bits"
    )


def principal_basis(x: np.ndarray, m: int) -> np.ndarray:
    """``(m, d)`` float32 orthonormal rows: the mean direction of ``x`` ``(n, d)``, then the leading
    principal components of ``x`` in the space orthogonal to it, by decreasing variance.

    The mean direction comes first because search scores ``<q, x̂>`` with no offset: a basis of
    centred components alone would drop the mean, which every embedding shares.
    """
    data = x.astype(np.float64)
    mean = data.mean(axis=0)
    d = data.shape[1]
    norm = float(np.linalg.norm(mean))
    if norm < 1e-6:  # no mean direction to keep: plain principal components
        first = np.zeros((0, d))
        complement = np.eye(d)
    else:
        first = (mean / norm)[None, :]
        # Orthonormal columns spanning the space orthogonal to the mean direction.
        q, _ = np.linalg.qr(np.column_stack([first[0], np.eye(d)]))
        complement = q[:, 1:d]
    centred = (data - mean) @ complement  # (n, d - 1) coordinates orthogonal to the mean
    values, vectors = np.linalg.eigh(centred.T @ centred)
    order = np.argsort(values, kind="stable")[::-1]
    components = (complement @ vectors[:, order]).T  # (d - 1, d), by decreasing variance
    return np.ascontiguousarray(np.vstack([first, components])[:m], dtype=np.float32)


class PCAPQCodec(FaissCodec):
    """Principal axes, then ``M`` 8-d sub-vectors of 16-word codebooks (module docstring)."""

    name = "pcapq"

    @classmethod
    def train(cls, embeddings: np.ndarray, bits_per_image: int, seed: int = 0) -> Self:
        """Train on ``embeddings`` ``(n, d)`` float32; the layout follows :func:`pcapq_layout`."""
        x = as_embeddings(embeddings)
        d = x.shape[1]
        m, M, nbits = pcapq_layout(d, bits_per_image)
        basis = principal_basis(x, m)
        pq_index: Any = faiss.IndexPQ(m, M, nbits, faiss.METRIC_INNER_PRODUCT)
        train_pq(pq_index.pq, np.ascontiguousarray(x @ basis.T), seed)
        pq_index.is_trained = True
        return cls(transformed_index(basis, pq_index, orthonormal=True))

    @cached_property
    def scanner(self) -> faiss.Index:
        """The rotation in front of an 8-bit PQ that scores the 4-bit codes exactly
        (:func:`byte_aligned_pq`): what :meth:`search_index` copies and fills. Built once."""
        trained = cast_index(self.index)
        pq = cast_index(trained.index).pq
        if 8 % pq.nbits:
            return self.index
        centroids = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
        chained: Any = faiss.downcast_VectorTransform(trained.chain.at(0))
        basis = faiss.vector_to_array(chained.A).reshape(pq.d, self.dim)
        scanner: faiss.Index = transformed_index(
            basis, byte_aligned_pq(centroids, pq.nbits, first_index_high=False), orthonormal=True
        )
        return scanner

    @classmethod
    def rebuild(cls, reader: StateReader) -> faiss.Index:
        """The principal basis ``(m, d)``, ``m <= d``, in front of an ``IndexPQ``."""
        basis, pq = read_rotated_pq_index(reader, square=False)
        index: faiss.Index = rotated_index(cls.name, basis, pq)
        return index

    def describe(self) -> str:
        """E.g. ``pcapq 64 bits (128 dims, 16x4)``: kept dimensions, M sub-quantisers x nbits."""
        pq = cast_index(cast_index(self.index).index).pq
        return f"{self.name} {self.bits_per_image} bits ({pq.d} dims, {pq.M}x{pq.nbits})"
