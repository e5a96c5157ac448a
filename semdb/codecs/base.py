"""The codec interface: float embeddings ⇄ fixed-size byte codes.

A codec is trained on embeddings, then turns each ``(d,)`` float32 embedding into a code of exactly
``bits_per_image / 8`` bytes, and back into an approximate ``(d,)`` float32 embedding. Its trained
state serialises to bytes without pickle so that it can live in the database.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Self

import faiss
import numpy as np

from semdb.cosine import CosineIndex, inverse_norms
from semdb.errors import DatabaseDamagedError, InvalidArgumentError

DECODE_CHUNK = 65_536  # codes decoded at a time when only a statistic of the reconstructions is kept

# Bounds on what a stored codec state may describe, checked before anything it describes is
# allocated: a database is a file users hand each other, and its codec state is untrusted bytes.
# Generous next to real embeddings (CLIP: 512-1280 dimensions; codes of 16-1024 bits).
MAX_DIM = 16_384
MAX_BITS = 16_384
MAX_STATE_BYTES = 256 * 2**20


class CodecStateError(DatabaseDamagedError, InvalidArgumentError):
    """A stored codec state is damaged or foreign: its one-line message says which field is wrong.

    Also an :class:`InvalidArgumentError`, which foreign states raised before this class existed.
    """


def damaged(codec: str, detail: str) -> CodecStateError:
    """The error for a damaged ``codec`` state, e.g. ``damaged("pq", "header says dim=0")``."""
    return CodecStateError(f"stored codec state is damaged: {codec} {detail}")


def check_state_size(codec: str, state: bytes) -> bytes:
    """Return ``state`` as bytes if it is bytes of at most :data:`MAX_STATE_BYTES`."""
    if not isinstance(state, bytes | bytearray | memoryview):
        raise damaged(codec, f"state is a {type(state).__name__}, not bytes")
    if len(state) > MAX_STATE_BYTES:
        raise damaged(codec, f"state is {len(state)} bytes, over the {MAX_STATE_BYTES} limit")
    return bytes(state)


def check_state_int(codec: str, field: str, value: object, low: int, high: int) -> int:
    """Return ``value`` if it is an integer (not a bool) in ``low..high``, else a :func:`damaged` error."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise damaged(codec, f"header says {field}={value!r}, not an integer")
    if not low <= value <= high:
        raise damaged(codec, f"header says {field}={value}, outside {low}..{high}")
    return int(value)


def check_state_bits(codec: str, bits_per_image: object) -> int:
    """Return a stored bit rate if it is a multiple of 8 in ``8..MAX_BITS``."""
    bits = check_state_int(codec, "bits_per_image", bits_per_image, 8, MAX_BITS)
    if bits % 8:
        raise damaged(codec, f"header says bits_per_image={bits}, not a multiple of 8")
    return bits


def check_finite(codec: str, field: str, values: np.ndarray) -> np.ndarray:
    """Return ``values`` if all are finite: a NaN or infinite weight would make every score NaN."""
    if not np.isfinite(values).all():
        raise damaged(codec, f"state has non-finite values in {field}")
    return values


def check_bits(bits_per_image: int) -> int:
    """Validate a bit rate: a positive multiple of 8 (codes are whole bytes)."""
    if isinstance(bits_per_image, bool) or not isinstance(bits_per_image, int | np.integer):
        raise InvalidArgumentError(f"bits per image must be an integer, got {bits_per_image!r}")
    if bits_per_image <= 0 or bits_per_image % 8:
        raise InvalidArgumentError(
            f"bits per image must be a positive multiple of 8 (e.g. 32, 64, 128), got {bits_per_image}"
        )
    return int(bits_per_image)


def as_embeddings(x: np.ndarray, dim: int | None = None) -> np.ndarray:
    """Return ``x`` as a C-contiguous ``(n, d)`` float32 array, checking its shape."""
    array = np.ascontiguousarray(x, dtype=np.float32)
    if array.ndim != 2:
        raise InvalidArgumentError(f"embeddings must be a 2-D (n, d) array, got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise InvalidArgumentError(f"embeddings have dimension {array.shape[1]}, the codec expects {dim}")
    return array


class Codec(ABC):
    """Compresses ``(n, d)`` float32 embeddings into ``(n, code_size)`` uint8 codes.

    Subclasses set ``name`` (the registry key) and implement training, coding and serialisation.
    """

    name: ClassVar[str]
    # Hyper-parameters this codec trains with when query-weighted, unless others are given
    # (:class:`~semdb.codecs.query_weighted.QueryWeightedCodec`); each one measured.
    query_weighted_defaults: ClassVar[dict[str, Any]] = {}
    # True for codecs whose train() takes ``unweight=W⁻¹`` when trained query-weighted (the pqvae
    # family: a loss term measured back in the searched space).
    trains_in_weighted_space: ClassVar[bool] = False

    def __init__(self, dim: int, bits_per_image: int) -> None:
        self.dim = dim
        self.bits_per_image = check_bits(bits_per_image)

    @property
    def code_size(self) -> int:
        """Bytes per code: ``bits_per_image / 8``."""
        return self.bits_per_image // 8

    @classmethod
    @abstractmethod
    def train(cls, embeddings: np.ndarray, bits_per_image: int, seed: int = 0) -> Self:
        """Train a codec on ``embeddings``: ``(n, d)`` float32, ideally L2-normalised."""

    @abstractmethod
    def encode(self, embeddings: np.ndarray) -> np.ndarray:
        """``(n, d)`` float32 → ``(n, code_size)`` uint8."""

    @abstractmethod
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """``(n, code_size)`` uint8 → ``(n, d)`` float32 reconstructions."""

    @abstractmethod
    def to_bytes(self) -> bytes:
        """Serialise the trained state (no pickle)."""

    @classmethod
    @abstractmethod
    def from_bytes(cls, state: bytes) -> Self:
        """Inverse of :meth:`to_bytes`."""

    def search_index(self, codes: np.ndarray) -> faiss.Index:
        """A FAISS inner-product index whose row ``i`` is the item coded by ``codes[i]``.

        The default decodes the codes into a flat index; PQ-family codecs override it to search the
        codes themselves (asymmetric distance), never materialising the decoded floats.
        """
        index = faiss.IndexFlatIP(self.dim)
        if len(codes):
            index.add(self.decode(self.check_codes(codes)))
        return index

    def scored_vectors(self, codes: np.ndarray) -> np.ndarray:
        """``(n, code_size)`` uint8 → ``(n, d)`` float32: the vectors :meth:`search_index` scores by
        inner product. :meth:`decode` by default; a codec whose index scores an unnormalised form of
        its reconstructions (same direction) returns that, so that cosine ranking divides by its norm."""
        return self.decode(codes)

    @property
    def scores_unit_vectors(self) -> bool:
        """Whether :meth:`search_index` scores unit vectors (then inner product already is cosine)."""
        return False

    def cosine_index(self, codes: np.ndarray) -> CosineIndex:
        """:meth:`search_index` over ``codes`` ``(n, code_size)``, ranked by cosine to the
        reconstructions (see :mod:`semdb.cosine`); how the database and the evaluation search."""
        c = self.check_codes(codes)
        if self.scores_unit_vectors:
            return CosineIndex.build(c, self.search_index, None)
        inverse = [inverse_norms(self.scored_vectors(c[i : i + DECODE_CHUNK])) for i in range(0, len(c), DECODE_CHUNK)]
        return CosineIndex.build(c, self.search_index, np.concatenate(inverse) if inverse else np.empty(0, np.float32))

    def item_cosine_index(self, codes: np.ndarray) -> CosineIndex | None:
        """An index for item queries (search by an image) when the codec scores them through another
        decoder than text queries, else None (then :meth:`cosine_index` serves both)."""
        return None

    def item_vectors(self, codes: np.ndarray) -> np.ndarray | None:
        """``(n, code_size)`` → ``(n, d)`` float32: what item queries score, where the codec decodes
        items for them through a decoder of their own (``pqvae`` with ``item_decoder``), else None."""
        return None

    def item_search_index(self, codes: np.ndarray) -> faiss.Index | None:
        """An inner-product index over ``codes`` scoring :meth:`item_vectors`, or None without them."""
        return None

    @property
    def has_item_path(self) -> bool:
        """Whether item queries are scored through a decoder of their own (:meth:`item_cosine_index`)."""
        return False

    def image_cosine_index(self, codes: np.ndarray, text_index: CosineIndex | None = None) -> CosineIndex:
        """The index image queries search ``codes`` ``(n, code_size)`` with: :meth:`item_cosine_index`
        where the codec has one, else what text queries search (``text_index`` when the caller holds
        it already, else :meth:`cosine_index`)."""
        items = self.item_cosine_index(codes)
        if items is not None:
            return items
        return text_index if text_index is not None else self.cosine_index(codes)

    def check_codes(self, codes: np.ndarray) -> np.ndarray:
        """Return ``codes`` as a C-contiguous ``(n, code_size)`` uint8 array, checking its shape."""
        array = np.ascontiguousarray(codes, dtype=np.uint8)
        if array.ndim != 2 or array.shape[1] != self.code_size:
            raise InvalidArgumentError(
                f"codes must have shape (n, {self.code_size}) for {self.name} at {self.bits_per_image} bits, "
                f"got {array.shape}"
            )
        return array

    def describe(self) -> str:
        """A short human-readable description, e.g. ``pq 64 bits (8x8)``."""
        return f"{self.name} {self.bits_per_image} bits"
