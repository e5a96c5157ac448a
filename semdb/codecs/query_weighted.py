"""Query-weighted coding: spend a codec's bits on the directions that queries look along.

A codec trained to minimise ``‖x − x̂‖²`` treats every direction of the embedding space alike, but
search only ever sees the scores ``⟨q, x̂⟩``. For an error ``e = x − x̂`` and queries ``q`` with
covariance ``Σ``, the spread of the score errors across queries is ``E[⟨q − q̄, e⟩²] = eᵀ Σ e``: an
error component shared by all queries (along their mean) moves every score of an item alike and
leaves its ranking of queries (zero-shot classification) unchanged, while an error along a direction
in which queries differ reorders them.

So the codec is trained on ``x' = W x`` with ``W = (Σ / tr Σ + ρ I / d)^½`` (symmetric), which
makes its squared error ``‖W e‖² = eᵀ Σ e / tr Σ + ρ ‖e‖² / d``: the query-weighted cost, plus a
ridge ``ρ`` of plain squared error, because a sample of queries covers part of the space only.
Decoding maps back, ``x̂ = W⁻¹ x̂'``, and search maps the query instead of every item:
``⟨q, W⁻¹ x̂'⟩ = ⟨W⁻¹ q, x̂'⟩``, so the index still scans the base codec's codes.

The queries need not be the ones the database will be asked; a sample of the same kind is enough
(e.g. ``"a photo of a {class}."`` for classes other than those searched). Measured on CuPL (codecs
trained on 800 classes' sentences and weighted by those classes' prompts, tested on 198 other
classes; ``docs/codecs.md`` §0): RQ mAP@100 .494 → .566 / .681 → .709 / .824 → .843 at 32 / 64 / 128
bits, zero-shot .664 → .694 at 32 bits and within .004 at 64 and 128; OPQ gains too. It costs
item→item recall (RQ 10-recall@10 .507 → .358 at 32 bits), and it breaks PQ, whose large errors in
the directions queries ignore are amplified by ``W⁻¹``: use it with ``rq`` or ``opq``. ``ρ = 0.3``
was the best or near-best of 0.03–1 in a sweep on RQ at 32 and 64 bits.
"""

from __future__ import annotations

import io
from typing import Any, Self

import faiss
import numpy as np

from semdb.codecs.base import Codec, as_embeddings
from semdb.codecs.faiss_codecs import transformed_index
from semdb.errors import InvalidArgumentError

DEFAULT_RIDGE = 0.3
MAGIC = b"semdb-query-weighted-v1\n"  # starts the serialised state, which wraps the base codec's


def query_weights(queries: np.ndarray, ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """``W = (Σ / tr Σ + ridge · I / d)^½`` ``(d, d)`` float32 for ``queries`` ``(c, d)``, ``c ≥ 2``;
    ``Σ``: the covariance of the queries about their mean."""
    q = as_embeddings(queries).astype(np.float64)
    if len(q) < 2:
        raise InvalidArgumentError(f"query weighting needs at least 2 sample queries, got {len(q)}")
    if not ridge > 0:
        raise InvalidArgumentError(f"the query-weighting ridge must be positive, got {ridge}")
    centred = q - q.mean(axis=0)
    covariance = centred.T @ centred
    trace = float(np.trace(covariance))
    if trace <= 0:
        raise InvalidArgumentError("the sample queries are all the same vector: give queries that differ")
    d = q.shape[1]
    values, vectors = np.linalg.eigh(covariance / trace + ridge * np.eye(d) / d)
    weights: np.ndarray = ((vectors * np.sqrt(values)) @ vectors.T).astype(np.float32)
    return weights


class QueryWeightedCodec(Codec):
    """A base codec trained and applied in the query-weighted space ``x' = W x`` (module docstring).

    Codes are the base codec's, exactly ``bits_per_image / 8`` bytes: the weighting costs no bits.
    """

    name = "query-weighted"

    def __init__(self, base: Codec, base_name: str, weights: np.ndarray) -> None:
        super().__init__(base.dim, base.bits_per_image)
        self.base = base
        self.base_name = base_name
        self.weights = np.ascontiguousarray(weights, dtype=np.float32)  # W (d, d), symmetric
        self.inverse = np.linalg.inv(self.weights.astype(np.float64)).astype(np.float32)  # W⁻¹

    @classmethod
    def train(
        cls,
        embeddings: np.ndarray,
        bits_per_image: int,
        seed: int = 0,
        *,
        base_name: str = "pq",
        queries: np.ndarray | None = None,
        ridge: float = DEFAULT_RIDGE,
        **hyper_parameters: Any,
    ) -> Self:
        """Train codec ``base_name`` on ``embeddings`` ``(n, d)`` weighted by sample ``queries`` ``(c, d)``."""
        from semdb.codecs import codec_class

        x = as_embeddings(embeddings)
        if queries is None:
            raise InvalidArgumentError("query weighting needs sample queries")
        weights = query_weights(as_embeddings(queries, x.shape[1]), ridge)
        base_class = codec_class(base_name)
        settings = {**base_class.query_weighted_defaults, **hyper_parameters}
        base = base_class.train(x @ weights, bits_per_image, seed=seed, **settings)
        return cls(base, base_name, weights)

    def encode(self, embeddings: np.ndarray) -> np.ndarray:
        """``(n, d)`` float32 → ``(n, code_size)`` uint8: the base codec's codes of ``x W``."""
        return self.base.encode(as_embeddings(embeddings, self.dim) @ self.weights)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """``(n, code_size)`` uint8 → ``(n, d)`` float32 reconstructions ``x̂' W⁻¹``."""
        decoded: np.ndarray = self.base.decode(codes) @ self.inverse
        return decoded

    def scored_vectors(self, codes: np.ndarray) -> np.ndarray:
        """``(n, code_size)`` uint8 → ``(n, d)``: the base codec's scored vectors mapped by ``W⁻¹``,
        which :meth:`search_index` scores (``<W⁻¹ q, v> = <q, W⁻¹ v>``, ``W`` symmetric)."""
        vectors: np.ndarray = self.base.scored_vectors(codes) @ self.inverse
        return vectors

    def search_index(self, codes: np.ndarray) -> faiss.Index:
        """The base codec's index over ``codes``, behind a ``W⁻¹`` transform of the queries."""
        index: faiss.Index = transformed_index(self.inverse, self.base.search_index(codes))
        return index

    def to_bytes(self) -> bytes:
        """:data:`MAGIC` + an ``.npz`` (no pickle) of ``W``, the base codec's name and its state."""
        buffer = io.BytesIO()
        np.savez(
            buffer,
            weights=self.weights,
            base_name=np.array(self.base_name),
            base_state=np.frombuffer(self.base.to_bytes(), dtype=np.uint8),
        )
        return MAGIC + buffer.getvalue()

    @classmethod
    def from_bytes(cls, state: bytes) -> Self:
        """Inverse of :meth:`to_bytes`; raises :class:`InvalidArgumentError` on foreign bytes."""
        from semdb.codecs import load_codec

        if not state.startswith(MAGIC):
            raise InvalidArgumentError("not a serialised query-weighted codec")
        try:
            with np.load(io.BytesIO(state[len(MAGIC) :]), allow_pickle=False) as archive:
                weights = archive["weights"]
                base_name = str(archive["base_name"])
                base_state = archive["base_state"].tobytes()
        except (OSError, ValueError, KeyError) as error:
            raise InvalidArgumentError(f"not a serialised query-weighted codec: {error}") from None
        return cls(load_codec(base_name, base_state), base_name, weights)

    def describe(self) -> str:
        """E.g. ``rq 32 bits (4x8), query-weighted``."""
        return f"{self.base.describe()}, query-weighted"
