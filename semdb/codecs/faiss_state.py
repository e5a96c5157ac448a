"""Strict parsing of the FAISS serialisations that the ``pq``, ``opq``, ``rq`` and ``pcapq`` codecs store.

A codec state comes from a database file, which users hand each other, so it is untrusted bytes.
``faiss.deserialize_index`` trusts them: it allocates whatever sizes they claim (an ``rq`` state of
32 MiB makes it precompute a codebook cross-product table of hundreds of GB) and can crash the
process on a malformed one. So FAISS never reads them: this module parses exactly the layouts
semdb writes (``faiss/impl/index_write.cpp``: ``IxPq``, ``IxPT`` with one ``LTra``, ``IxRq``),
checks every field against the bounds of :mod:`semdb.codecs.base` before touching the arrays it
describes, and returns plain arrays from which :mod:`semdb.codecs.faiss_codecs` rebuilds the index.
The arrays are views of the state (no copy), and a count is accepted only if the bytes it claims are
there, so nothing larger than the state itself is allocated. The stored format is FAISS's own, so
databases written before this parser still load, and rebuilt indexes serialise to the same bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from semdb.codecs.base import MAX_BITS, MAX_DIM, check_finite, check_state_bits, check_state_int, damaged

MAX_NBITS = 16  # bits per sub-quantiser index: FAISS's limit for PQ and semdb's for RQ
MAX_BEAM = 64  # RQ encoding beam width; FAISS's default is 5, and memory per vector grows with it
_INDEX_DUMMY = 1 << 20  # two unused int64 fields of FAISS's index header always hold this


def pq_layout_fits(dim: int, M: int, nbits: int, split_dims: bool) -> bool:
    """Whether ``M`` quantisers of ``nbits`` can code ``dim``-d vectors (``split_dims``: each takes
    ``dim / M`` dimensions, as in PQ, so ``dim % M`` must be 0)."""
    if not split_dims:
        return True
    if dim < M or dim % M:
        return False
    # FAISS's SIMD distance tables for 2-d sub-vectors need codebooks of a multiple of 8 entries.
    return dim // M != 2 or nbits >= 3


class StateReader:
    """Reads little-endian fields from ``state`` in order; every error names ``codec`` and the field."""

    def __init__(self, codec: str, state: bytes) -> None:
        self.codec = codec
        self.state = state
        self.offset = 0

    def _take(self, size: int, field: str) -> int:
        """Advance past ``size`` bytes of ``field``; return where they start."""
        start = self.offset
        if size > len(self.state) - start:
            raise damaged(self.codec, f"state ends inside {field} ({size} bytes at byte {start} of {len(self.state)})")
        self.offset += size
        return start

    def _unpack(self, form: str, field: str) -> int | float:
        """The next value of ``struct`` format ``form``."""
        value: int | float = struct.unpack_from(form, self.state, self._take(struct.calcsize(form), field))[0]
        return value

    def int32(self, field: str) -> int:
        """A C ``int``."""
        return int(self._unpack("<i", field))

    def int64(self, field: str) -> int:
        """An ``int64_t`` (FAISS's ``idx_t``)."""
        return int(self._unpack("<q", field))

    def uint64(self, field: str) -> int:
        """A ``size_t``."""
        return int(self._unpack("<Q", field))

    def uint8(self, field: str) -> int:
        """A ``bool`` or ``char``."""
        return int(self._unpack("<B", field))

    def float32(self, field: str) -> float:
        """A ``float``."""
        return float(self._unpack("<f", field))

    def fourcc(self, expected: str) -> None:
        """Check the next 4 bytes are FAISS's type tag ``expected`` (e.g. ``IxPq``)."""
        start = self._take(4, "the type tag")
        found = self.state[start : start + 4]
        if found != expected.encode():
            raise damaged(self.codec, f"state has FAISS type tag {found!r} where {expected!r} belongs")

    def expect(self, field: str, value: int, expected: int) -> None:
        """Fail unless a field just read holds ``expected``."""
        if value != expected:
            raise damaged(self.codec, f"header says {field}={value}, expected {expected}")

    def floats(self, field: str, count: int | None = None) -> np.ndarray:
        """A FAISS ``std::vector<float>``: its stored length (which must be ``count`` when given),
        then the values, as a read-only ``(length,)`` float32 view of the state, all finite."""
        stored = self.uint64(f"the length of {field}")
        if count is not None:
            self.expect(f"the length of {field}", stored, count)
        start = self._take(4 * stored, field)
        return check_finite(self.codec, field, np.frombuffer(self.state, dtype="<f4", count=stored, offset=start))

    def finish(self) -> None:
        """Fail unless every byte of the state was read."""
        if self.offset != len(self.state):
            raise damaged(self.codec, f"state has {len(self.state) - self.offset} bytes after its end")


@dataclass(frozen=True)
class PQState:
    """A stored ``IndexPQ``: ``M`` sub-quantisers of ``2**nbits`` centroids over ``dim / M``
    dimensions each; ``centroids`` ``(M, 2**nbits, dim / M)`` float32."""

    dim: int
    M: int
    nbits: int
    centroids: np.ndarray


@dataclass(frozen=True)
class RQState:
    """A stored ``IndexResidualQuantizer``: ``M`` stages of ``2**nbits`` full-dimensional codewords,
    ``codebooks`` ``(M, 2**nbits, dim)`` float32, and the fields FAISS keeps with them."""

    dim: int
    M: int
    nbits: int
    codebooks: np.ndarray
    norm_min: float  # norm range of the training set; unused by the norm-free search type semdb uses
    norm_max: float
    train_type: int
    max_beam_size: int


def read_index_header(reader: StateReader, fourcc: str) -> int:
    """FAISS's index header after tag ``fourcc``: a trained, empty inner-product index → its ``d``."""
    reader.fourcc(fourcc)
    dim = check_state_int(reader.codec, "dim", reader.int32("dim"), 1, MAX_DIM)
    reader.expect("ntotal", reader.int64("ntotal"), 0)  # a codec's index holds no items
    reader.expect("the header's padding", reader.int64("the header's padding"), _INDEX_DUMMY)
    reader.expect("the header's padding", reader.int64("the header's padding"), _INDEX_DUMMY)
    reader.expect("is_trained", reader.uint8("is_trained"), 1)
    reader.expect("metric_type", reader.int32("metric_type"), 0)  # METRIC_INNER_PRODUCT
    return dim


def read_pq_index(reader: StateReader, dim: int | None = None) -> PQState:
    """An ``IxPq`` index (of ``dim`` dimensions when given) → :class:`PQState`."""
    index_dim = read_index_header(reader, "IxPq")
    if dim is not None:
        reader.expect("the PQ's dim", index_dim, dim)
    reader.expect("pq.d", reader.uint64("pq.d"), index_dim)
    M = check_state_int(reader.codec, "pq.M", reader.uint64("pq.M"), 1, MAX_BITS)
    nbits = check_state_int(reader.codec, "pq.nbits", reader.uint64("pq.nbits"), 1, MAX_NBITS)
    check_state_bits(reader.codec, M * nbits)
    if not pq_layout_fits(index_dim, M, nbits, split_dims=True):
        raise damaged(reader.codec, f"header says M={M} sub-quantisers of {nbits} bits for dim={index_dim}: no PQ")
    centroids = reader.floats("the PQ centroids", index_dim * 2**nbits)
    reader.expect("the number of stored codes", reader.uint64("the number of stored codes"), 0)
    reader.expect("search_type", reader.int32("search_type"), 0)  # ST_PQ: asymmetric distance
    reader.expect("encode_signs", reader.uint8("encode_signs"), 0)
    reader.int32("polysemous_ht")  # used by polysemous search only, which semdb never asks for
    return PQState(index_dim, M, nbits, centroids.reshape(M, 2**nbits, index_dim // M))


def read_rotated_pq_index(reader: StateReader, square: bool) -> tuple[np.ndarray, PQState]:
    """An ``IxPT`` index of one ``LTra`` transform (no bias) in front of an ``IxPq`` →
    ``(matrix (m, d) float32, PQState of m dimensions)``; ``square``: ``m`` must be ``d``."""
    dim = read_index_header(reader, "IxPT")
    reader.expect("the number of transforms", reader.int32("the number of transforms"), 1)
    reader.fourcc("LTra")
    reader.expect("have_bias", reader.uint8("have_bias"), 0)
    matrix = reader.floats("the rotation matrix")
    reader.floats("the rotation's bias", 0)
    reader.expect("the rotation's d_in", reader.int32("the rotation's d_in"), dim)
    d_out = check_state_int(reader.codec, "the rotation's d_out", reader.int32("the rotation's d_out"), 1, dim)
    if square:
        reader.expect("the rotation's d_out", d_out, dim)
    reader.expect("the rotation matrix's length", len(matrix), d_out * dim)
    reader.expect("the rotation's is_trained", reader.uint8("the rotation's is_trained"), 1)
    return matrix.reshape(d_out, dim), read_pq_index(reader, d_out)


def read_rq_index(reader: StateReader) -> RQState:
    """An ``IxRq`` index of equal stages, searched by decompression → :class:`RQState`."""
    dim = read_index_header(reader, "IxRq")
    reader.expect("rq.d", reader.uint64("rq.d"), dim)
    M = check_state_int(reader.codec, "rq.M", reader.uint64("rq.M"), 1, MAX_BITS)
    reader.expect("the number of RQ stages", reader.uint64("the number of RQ stages"), M)
    stage_bits = {reader.uint64("a stage's nbits") for _ in range(M)}  # M ≤ MAX_BITS reads
    if len(stage_bits) != 1:
        raise damaged(reader.codec, f"header gives its stages {len(stage_bits)} different nbits; semdb writes one")
    nbits = check_state_int(reader.codec, "rq.nbits", stage_bits.pop(), 1, MAX_NBITS)
    bits = check_state_bits(reader.codec, M * nbits)
    reader.expect("rq.is_trained", reader.uint8("rq.is_trained"), 1)
    codebooks = reader.floats("the RQ codebooks", M * 2**nbits * dim)
    reader.expect("search_type", reader.int32("search_type"), 0)  # ST_decompress: no norm in the code
    norm_min, norm_max = reader.float32("norm_min"), reader.float32("norm_max")
    train_type = reader.int32("train_type")
    max_beam_size = check_state_int(reader.codec, "max_beam_size", reader.int32("max_beam_size"), 1, MAX_BEAM)
    reader.expect("code_size", reader.uint64("code_size"), bits // 8)
    reader.expect("the number of stored codes", reader.uint64("the number of stored codes"), 0)
    return RQState(dim, M, nbits, codebooks.reshape(M, 2**nbits, dim), norm_min, norm_max, train_type, max_beam_size)
