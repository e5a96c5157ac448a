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
import math
import struct
import zipfile
from typing import Any, Self

import faiss
import numpy as np

from semdb.codecs.base import (
    DECODE_CHUNK,
    MAX_STATE_BYTES,
    Codec,
    CodecStateError,
    as_embeddings,
    check_finite,
    check_state_size,
    damaged,
)
from semdb.codecs.faiss_codecs import transformed_index
from semdb.cosine import CosineIndex, inverse_norms
from semdb.errors import InvalidArgumentError

DEFAULT_RIDGE = 0.3
MAGIC = b"semdb-query-weighted-v1\n"  # starts the serialised state, which wraps the base codec's
# A stored W is (d, d) and its inverse is computed in float64: d = 4096 makes 64 MiB of W and
# about 400 MiB while inverting. Far above real embeddings (CLIP: at most 1280 dimensions).
MAX_WEIGHTED_DIM = 4096
# The arrays of the stored .npz: (dtype, or None for a string of at most 64 characters; dimensions).
_MEMBERS = {"weights": (np.dtype("<f4"), 2), "base_name": (None, 0), "base_state": (np.dtype("u1"), 1)}


def query_weights(
    queries: np.ndarray, ridge: float = DEFAULT_RIDGE, data: np.ndarray | None = None, data_weight: float = 0.0
) -> np.ndarray:
    """``W = (Σ / tr Σ + data_weight · Σₓ / tr Σₓ + ridge · I / d)^½`` ``(d, d)`` float32 for
    ``queries`` ``(c, d)``, ``c ≥ 2``; ``Σ``: the covariance of the queries about their mean, ``Σₓ``
    that of ``data`` ``(n, d)`` (the embeddings coded), which ``data_weight > 0`` mixes in so that
    the directions in which the items themselves differ keep some bits (item→item search)."""
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
    mixed = covariance / trace + ridge * np.eye(d) / d
    if data_weight:
        if data is None or not data_weight > 0:
            raise InvalidArgumentError("mixing in the data's spectrum needs the data and a positive weight")
        x = as_embeddings(data, d).astype(np.float64)
        spread = (x - x.mean(axis=0)).T @ (x - x.mean(axis=0))
        mixed += data_weight * spread / max(float(np.trace(spread)), 1e-12)
    values, vectors = np.linalg.eigh(mixed)
    weights: np.ndarray = ((vectors * np.sqrt(values)) @ vectors.T).astype(np.float32)
    return weights


# What zipfile raises on a malformed archive (RuntimeError: "encrypted"; ValueError: bad offsets).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, RuntimeError, ValueError, struct.error)


def _read_npz(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` that :meth:`QueryWeightedCodec.to_bytes` writes, parsed strictly:
    exactly the members of :data:`_MEMBERS`, stored uncompressed (as ``np.savez`` writes them), each
    of its dtype, and as many bytes as its header's shape says, checked before any array exists.

    ``np.load`` is not used: it allocates the shape an array's header claims before reading its
    data, and would inflate a compressed member of any size."""
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
            if sorted(member.filename for member in members) != sorted(f"{name}.npy" for name in _MEMBERS):
                raise damaged("query-weighted", "archive holds other members than weights, base_name, base_state")
            for member in members:
                if member.compress_type != zipfile.ZIP_STORED or member.file_size > len(data):
                    raise damaged("query-weighted", f"archive member {member.filename} is compressed or oversized")
                name = member.filename.removesuffix(".npy")
                arrays[name] = _read_npy(name, archive.read(member))
    except CodecStateError:
        raise
    except _ZIP_ERRORS as error:
        raise damaged("query-weighted", f"archive is unreadable: {error}") from None
    return arrays


def _read_npy(name: str, raw: bytes) -> np.ndarray:
    """One ``.npy`` member ``raw`` of the archive → a read-only array viewing its bytes."""
    expected, ndim = _MEMBERS[name]
    stream = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        shape, fortran_order, dtype = read_header[version](stream)
    except (ValueError, KeyError, SyntaxError, TypeError, RecursionError):  # numpy's on a malformed header
        raise damaged("query-weighted", f"array {name} has a malformed header") from None
    string = expected is None and dtype.kind == "U" and dtype.itemsize <= 4 * 64
    if not (dtype == expected or string) or len(shape) != ndim:
        raise damaged("query-weighted", f"array {name} is {dtype} of shape {shape}")
    if fortran_order or (name == "weights" and not 1 <= shape[0] <= MAX_WEIGHTED_DIM):
        raise damaged("query-weighted", f"array {name} has shape {shape}, over the {MAX_WEIGHTED_DIM} limit")
    size, start = math.prod(shape) * dtype.itemsize, stream.tell()
    if size > MAX_STATE_BYTES or size != len(raw) - start:
        raise damaged("query-weighted", f"array {name} has {len(raw) - start} bytes; shape {shape} needs {size}")
    return np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=start).reshape(shape)


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
        data_weight: float | None = None,
        **hyper_parameters: Any,
    ) -> Self:
        """Train codec ``base_name`` on ``embeddings`` ``(n, d)`` weighted by sample ``queries`` ``(c, d)``;
        ``data_weight`` (:func:`query_weights`) None: the base codec's ``query_weighted_defaults``, else 0."""
        from semdb.codecs import codec_class

        x = as_embeddings(embeddings)
        if queries is None:
            raise InvalidArgumentError("query weighting needs sample queries")
        base_class = codec_class(base_name)
        settings = {**base_class.query_weighted_defaults, **hyper_parameters}
        default_data_weight = float(settings.pop("data_weight", 0.0))
        data_weight = default_data_weight if data_weight is None else data_weight
        weights = query_weights(as_embeddings(queries, x.shape[1]), ridge, data=x, data_weight=data_weight)
        if base_class.trains_in_weighted_space:
            settings["unweight"] = np.linalg.inv(weights.astype(np.float64)).astype(np.float32)
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

    def item_vectors(self, codes: np.ndarray) -> np.ndarray | None:
        """The base codec's vectors for item queries (already in the searched space), or None."""
        return self.base.item_vectors(self.check_codes(codes))

    @property
    def has_item_path(self) -> bool:
        """True where the base codec has a second decoder for item queries (``item_decoder``)."""
        return getattr(self.base, "item_scanner", None) is not None

    def item_search_index(self, codes: np.ndarray) -> faiss.Index | None:
        """The base codec's index of its item path over ``codes`` (already in the searched space: no
        ``W⁻¹``), or None without one."""
        return self.base.item_search_index(self.check_codes(codes))

    def item_cosine_index(self, codes: np.ndarray) -> CosineIndex | None:
        """With a base codec that decodes items for item queries itself (``item_decoder``, already
        in the searched space: no ``W⁻¹``), those vectors by cosine, scored from the codes
        themselves (:meth:`item_search_index`); else None."""
        if not self.has_item_path:
            return None
        c = self.check_codes(codes)

        def decoded(rows: np.ndarray) -> np.ndarray:
            vectors = self.item_vectors(rows)
            assert vectors is not None
            return vectors

        norms = [inverse_norms(decoded(c[i : i + DECODE_CHUNK])) for i in range(0, len(c), DECODE_CHUNK)]

        def scanned(rows: np.ndarray) -> faiss.Index:
            index = self.item_search_index(rows)
            assert index is not None
            return index

        return CosineIndex.build(c, scanned, np.concatenate(norms) if norms else np.empty(0, np.float32))

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
        """Inverse of :meth:`to_bytes`; raises :class:`~semdb.codecs.base.CodecStateError` on damaged
        or foreign bytes, including the base codec's."""
        from semdb.codecs import list_codecs, load_codec

        state = check_state_size(cls.name, state)
        if not state.startswith(MAGIC):
            raise damaged(cls.name, "state does not start with the query-weighted header")
        arrays = _read_npz(state[len(MAGIC) :])
        base_name, base_state = str(arrays["base_name"][()]), arrays["base_state"].tobytes()
        if base_name not in list_codecs():
            raise damaged(cls.name, f"state wraps an unknown codec {base_name[:40]!r}")
        if base_state.startswith(MAGIC):
            raise damaged(cls.name, "state wraps another query-weighted state")
        base = load_codec(base_name, base_state)
        weights = check_finite(cls.name, "weight matrix", arrays["weights"])
        if weights.shape != (base.dim, base.dim):
            raise damaged(cls.name, f"weight matrix is {weights.shape}, its base codec codes {base.dim}-d vectors")
        try:
            codec = cls(base, base_name, weights)
        except np.linalg.LinAlgError:
            raise damaged(cls.name, "weight matrix is singular") from None
        check_finite(cls.name, "inverse weight matrix", codec.inverse)
        return codec

    def describe(self) -> str:
        """E.g. ``rq 32 bits (4x8), query-weighted``."""
        return f"{self.base.describe()}, query-weighted"
