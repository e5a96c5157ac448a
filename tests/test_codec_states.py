"""Damaged and crafted codec states: each loads into a codec that works, or raises CodecStateError.

A database is a file users hand each other, and its codec state is bytes that :func:`load_codec`
turns back into a codec. A seeded fuzz loop mutates real states of every codec (truncations, bit
flips, spliced and appended bytes, every header integer of each format set to zero, negative and
huge values, broken safetensors and ``.npz`` structure); hand-crafted states claim huge sizes. The
header-integer mutations and the crafted states run in a subprocess whose address space is capped
at about 1 GiB above its baseline, so that an unbounded allocation fails there, and a crash of the
subprocess (a segfault in FAISS) fails the test.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest

from semdb.codecs import CodecStateError, load_codec, train_codec
from semdb.codecs.faiss_codecs import index_holding
from semdb.codecs.query_weighted import MAGIC

DIM = 16
BITS = 32
GIB = 2**30
# label -> (codec name, training arguments)
CODECS: dict[str, tuple[str, dict[str, object]]] = {
    "pq": ("pq", {}),
    "opq": ("opq", {}),
    "rq": ("rq", {}),
    "pcapq": ("pcapq", {}),
    "pqvae": ("pqvae", {"steps": 20}),
    "pqvae-pca": ("pqvae-pca", {}),
    "qw-rq": ("rq", {"queries": True}),
    "qw-pqvae-pca": ("pqvae-pca", {"queries": True, "steps": 5}),
}
FAISS_LABELS = ("pq", "opq", "rq", "pcapq")
SAFETENSORS_LABELS = ("pqvae", "pqvae-pca")
Case = tuple[str, str, str, bytes]  # (label, mutation, codec name, state)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def train_states() -> dict[str, tuple[str, bytes]]:
    """label -> (codec name, state) of tiny codecs trained on 300 random unit vectors."""
    rng = np.random.default_rng(0)
    x, queries = unit(rng.standard_normal((300, DIM))), unit(rng.standard_normal((20, DIM)))
    states = {}
    for label, (name, arguments) in CODECS.items():
        options = dict(arguments)
        if options.pop("queries", False):
            options["queries"] = queries
        states[label] = (name, train_codec(name, x, BITS, **options).to_bytes())  # type: ignore[arg-type]
    return states


def outcome(name: str, state: bytes) -> str:
    """``"loaded"`` if ``state`` loads into a codec that encodes, decodes and searches a few vectors,
    ``"rejected"`` if it raises CodecStateError; any other error propagates."""
    try:
        codec = load_codec(name, state)
    except CodecStateError as error:
        message = str(error)
        if "\n" in message or not message.startswith("stored codec state is damaged: "):
            raise AssertionError(f"not a one-line damaged-state message: {message!r}") from None
        return "rejected"
    x = unit(np.random.default_rng(1).standard_normal((5, codec.dim)))
    codes = codec.encode(x)
    if codes.shape != (5, codec.code_size) or codes.dtype != np.uint8:
        raise AssertionError(f"codes of shape {codes.shape}")
    if codec.decode(codes).shape != (5, codec.dim):
        raise AssertionError("decoded shape")
    _, rows = codec.search_index(codes).search(x[:2], 3)
    _, cosine_rows = codec.cosine_index(codes).search(x[:2], 3)
    if rows.shape != (2, 3) or cosine_rows.shape != (2, 3):
        raise AssertionError("search shape")
    codec.describe()
    return "loaded"


# --- format walkers (independent of semdb's parsers) ------------------------------------------------


def faiss_fields(state: bytes) -> list[tuple[int, str]]:
    """``(offset, struct format)`` of every integer field of the FAISS serialisations semdb writes
    (``IxPq``, ``IxPT`` + ``LTra``, ``IxRq``; ``faiss/impl/index_write.cpp``)."""
    fields: list[tuple[int, str]] = []

    def vector(at: int, item: int) -> int:
        fields.append((at, "<Q"))
        return at + 8 + item * struct.unpack_from("<Q", state, at)[0]

    def index(at: int) -> int:
        tag = state[at : at + 4]
        fields.extend([(at + 4, "<i"), (at + 8, "<q"), (at + 16, "<q"), (at + 24, "<q"), (at + 32, "<B")])
        fields.append((at + 33, "<i"))
        at += 37
        if tag == b"IxPq":
            fields.extend([(at, "<Q"), (at + 8, "<Q"), (at + 16, "<Q")])
            at = vector(vector(at + 24, 4), 1)
            fields.extend([(at, "<i"), (at + 4, "<B"), (at + 5, "<i")])
            return at + 9
        if tag == b"IxPT":
            fields.extend([(at, "<i"), (at + 8, "<B")])
            at = vector(vector(at + 9, 4), 4)
            fields.extend([(at, "<i"), (at + 4, "<i"), (at + 8, "<B")])
            return index(at + 9)
        if tag == b"IxRq":
            fields.extend([(at, "<Q"), (at + 8, "<Q")])
            stages = struct.unpack_from("<Q", state, at + 8)[0]
            fields.extend((at + 24 + 8 * i, "<Q") for i in range(stages))
            at = vector(at + 16, 8)
            fields.append((at, "<B"))
            at = vector(at + 1, 4)
            fields.extend([(at, "<i"), (at + 12, "<i"), (at + 16, "<i"), (at + 20, "<Q")])
            return vector(at + 28, 1)
        raise AssertionError(f"unexpected FAISS tag {tag!r}")

    if index(0) != len(state):
        raise AssertionError("the walker lost its way")
    return fields


def extreme_values(form: str, original: int) -> list[int]:
    """Zero, negative, huge and off-by-one values for a field of ``struct`` format ``form``."""
    values = {
        "<B": [0, 2, 255],
        "<i": [0, -1, -(2**31), 2**31 - 1],
        "<q": [-1, 2**62],
        "<Q": [0, 2**31, 2**63, 2**64 - 1],
    }[form]
    limit = {"<B": 255, "<i": 2**31 - 1, "<q": 2**63 - 1, "<Q": 2**64 - 1}[form]
    return [v for v in [*values, original + 1] if v != original and v <= limit]


def safetensors_parts(state: bytes) -> tuple[dict[str, object], bytes]:
    (size,) = struct.unpack_from("<Q", state)
    return json.loads(state[8 : 8 + size]), state[8 + size :]


def safetensors_state(header: dict[str, object], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def with_config(state: bytes, **changes: object) -> bytes:
    """A pqvae ``state`` whose stored config has ``changes`` (tensors untouched)."""
    header, data = safetensors_parts(state)
    metadata = dict(header["__metadata__"])  # type: ignore[call-overload]
    metadata["pqvae"] = json.dumps({**json.loads(metadata["pqvae"]), **changes})
    return safetensors_state({**header, "__metadata__": metadata}, data)


def npz_arrays(state: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(state[len(MAGIC) :]), allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def npz_state(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return MAGIC + buffer.getvalue()


# --- mutations -------------------------------------------------------------------------------------


def byte_mutations(state: bytes, rng: np.random.Generator) -> Iterator[tuple[str, bytes]]:
    """Format-blind damage: empty, truncated, bit-flipped, spliced and extended states."""
    n = len(state)
    yield "empty", b""
    for cut in sorted({1, 4, 8, 12, 37, 41, 100, n // 2, n - 9, n - 1, *rng.integers(1, n, 4).tolist()}):
        yield f"truncated to {cut}", state[:cut]
    for size in (1, 8, 100):
        yield f"{size} bytes appended", state + rng.bytes(size)
    for i in range(10):
        flipped = bytearray(state)
        # Half the flips in the first 200 bytes, where the headers are.
        for at in rng.integers(0, min(n, 200) if i % 2 else n, int(rng.integers(1, 9))):
            flipped[at] ^= 1 << int(rng.integers(0, 8))
        yield f"bit flips {i}", bytes(flipped)
    for _ in range(4):
        at, size = int(rng.integers(0, n)), int(rng.integers(1, 64))
        yield f"{size} random bytes inserted at {at}", state[:at] + rng.bytes(size) + state[at:]
        at = int(rng.integers(0, min(n, 200)))
        yield f"{size} random bytes over {at}", state[:at] + rng.bytes(size) + state[at + size :]


def faiss_header_mutations(state: bytes) -> Iterator[tuple[str, bytes]]:
    """Every integer field of a FAISS state set to each of :func:`extreme_values`."""
    for at, form in faiss_fields(state):
        (original,) = struct.unpack_from(form, state, at)
        for value in extreme_values(form, original):
            mutated = bytearray(state)
            struct.pack_into(form, mutated, at, value)
            yield f"field at {at} {original} -> {value}", bytes(mutated)


def safetensors_mutations(state: bytes) -> Iterator[tuple[str, bytes]]:
    """A pqvae state's header length, config fields and tensor table set to bad values."""
    for length in (0, 7, 2**31, 2**63, 2**64 - 1):
        yield f"header length {length}", struct.pack("<Q", length) + state[8:]
    for field in ("dim", "bits_per_image", "latent_dim", "codebook_bits", "hidden", "steps", "encoder"):
        for value in (0, -1, 3, 12, 10**9, 2**31, 2**63, 1.5, True, "mlp", None, [1]):
            yield f"config {field}={value!r}", with_config(state, **{field: value})
    yield "config learning_rate=NaN", with_config(state, learning_rate=float("nan"))
    yield "config unknown field", with_config(state, colour=1)
    header, data = safetensors_parts(state)
    name = next(key for key in header if key != "__metadata__")
    entry: dict[str, object] = header[name]  # type: ignore[assignment]
    shape: list[int] = entry["shape"]  # type: ignore[assignment]
    offsets: list[int] = entry["data_offsets"]  # type: ignore[assignment]
    begin, end = offsets
    for change in (
        {"shape": [2**40, *shape[1:]]},
        {"shape": [-1, *shape[1:]]},
        {"shape": [*shape, 1]},
        {"dtype": "F64"},
        {"dtype": "I8"},
        {"data_offsets": [begin, end + 4]},
        {"data_offsets": [begin + 4, end + 4]},
        {"data_offsets": [-4, end]},
        {"data_offsets": [begin, 2**64]},
        {"data_offsets": "x"},
    ):
        yield f"tensor {name} {change}", safetensors_state({**header, name: {**entry, **change}}, data)
    yield f"tensor {name} missing", safetensors_state({k: v for k, v in header.items() if k != name}, data)
    yield "no metadata", safetensors_state({k: v for k, v in header.items() if k != "__metadata__"}, data)
    yield "nested JSON", struct.pack("<Q", 200_000) + b"[" * 200_000 + data
    nan = bytearray(state)
    nan[len(state) - len(data) + begin : len(state) - len(data) + begin + 4] = struct.pack("<f", float("nan"))
    yield f"NaN in {name}", bytes(nan)


def npz_mutations(state: bytes, rng: np.random.Generator) -> Iterator[tuple[str, bytes]]:
    """A query-weighted state's arrays, base state and zip structure damaged."""
    arrays = npz_arrays(state)
    weights, base_name, base_state = arrays["weights"], arrays["base_name"], arrays["base_state"]
    for label, value in (
        ("zero", np.zeros_like(weights)),
        ("NaN", np.full_like(weights, np.nan)),
        ("wrong shape", weights[:-1]),
        ("float64", weights.astype(np.float64)),
        ("1-d", weights.ravel()),
        ("object", np.array([None, 1], dtype=object)),
    ):
        yield f"weights {label}", npz_state(weights=value, base_name=base_name, base_state=base_state)
    for other in ("query-weighted", "nonexistent", "pq", "rq" * 100):
        yield f"base_name {other[:20]}", npz_state(weights=weights, base_name=np.array(other), base_state=base_state)
    yield "nested", npz_state(weights=weights, base_name=base_name, base_state=np.frombuffer(state, np.uint8))
    yield "base_state int32", npz_state(weights=weights, base_name=base_name, base_state=base_state.astype(np.int32))
    yield "missing base_state", npz_state(weights=weights, base_name=base_name)
    yield "extra member", npz_state(weights=weights, base_name=base_name, base_state=base_state, more=weights)
    base = base_state.tobytes()
    broken = [next(byte_mutations(base, rng))[1], base[: len(base) // 2], base[:200] + rng.bytes(50) + base[250:]]
    for i, damaged_base in enumerate(broken):
        as_array = np.frombuffer(damaged_base, np.uint8)
        yield f"damaged base state {i}", npz_state(weights=weights, base_name=base_name, base_state=as_array)
    members = {f"{key}.npy": _npy(value) for key, value in arrays.items()}
    yield "deflated members", zip_state(members, zipfile.ZIP_DEFLATED)
    for shape in ((4_000_000_000, DIM), (-1, DIM), (DIM, DIM, DIM), (2**62, 2**62)):
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
        lying = {**members, "weights.npy": header.getvalue() + weights.tobytes()}
        yield f"weights header says shape {shape}", zip_state(lying, zipfile.ZIP_STORED)
    body = state[len(MAGIC) :]
    for at in _zip_size_fields(body):
        for size in (0, 2**31, 2**32 - 1):
            mutated = bytearray(body)
            struct.pack_into("<I", mutated, at, size)
            yield f"zip size field at {at} -> {size}", MAGIC + bytes(mutated)


def zip_state(members: dict[str, bytes], compression: int) -> bytes:
    """A query-weighted state whose archive holds ``members`` (name → bytes) as they are."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return MAGIC + buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _zip_size_fields(body: bytes) -> list[int]:
    """Offsets of the compressed and uncompressed size fields of each local and central zip header."""
    offsets = []
    for signature, size_at in ((b"PK\x03\x04", 18), (b"PK\x01\x02", 20)):
        start = body.find(signature)
        while start >= 0:
            offsets += [start + size_at, start + size_at + 4]
            start = body.find(signature, start + 4)
    return offsets


def crafted_states(states: dict[str, tuple[str, bytes]]) -> Iterator[Case]:
    """Hand-made states that claim huge sizes or inconsistent layouts."""
    pqvae = states["pqvae"][1]
    for latent_dim in (10**6, 16_000):  # 16 x 16 000 latent values: within bounds, but no such tensors
        yield "pqvae", f"latent_dim={latent_dim}", "pqvae", with_config(pqvae, latent_dim=latent_dim)
    yield "pqvae", "hidden=16384", "pqvae", with_config(pqvae, hidden=16_384)  # 2 GiB of MLP weights
    pq = states["pq"][1]
    fields = dict(enumerate(faiss_fields(pq)))

    def pq_with(**values: int) -> bytes:
        names = {"d": 0, "pq_d": 6, "M": 7, "nbits": 8, "centroids": 9}
        mutated = bytearray(pq)
        for key, value in values.items():
            struct.pack_into(fields[names[key]][1], mutated, fields[names[key]][0], value)
        return bytes(mutated)

    yield "pq", "pq.d=2^31", "pq", pq_with(pq_d=2**31)
    yield "pq", "d=pq.d=2^31-1", "pq", pq_with(d=2**31 - 1, pq_d=2**31 - 1)
    yield "pq", "M=0", "pq", pq_with(M=0)  # FAISS's reader divides d by M
    yield "pq", "nbits=0", "pq", pq_with(nbits=0)
    yield "pq", "nbits=64", "pq", pq_with(nbits=64)
    yield "pq", "M=2^40", "pq", pq_with(M=2**40)
    yield "pq", "M*nbits=24 (M=3)", "pq", pq_with(M=3)
    yield "pq", "M*nbits=28 (nbits=7)", "pq", pq_with(nbits=7)
    yield "pq", "M*nbits=64 (M=8)", "pq", pq_with(M=8)
    yield "pq", "centroid count -1", "pq", pq_with(centroids=2**64 - 1)
    yield "pq", "centroid count 2^62", "pq", pq_with(centroids=2**62)
    # A well-formed RQ of 512 stages: 8 MiB of codebooks, from which FAISS's own reader would
    # precompute (512 x 256)^2 / 2 floats (32 GiB) of cross products; semdb's needs none.
    rq: object = faiss.IndexResidualQuantizer(DIM, 512, 8, faiss.METRIC_INNER_PRODUCT)
    codebooks = unit(np.random.default_rng(2).standard_normal((512 * 256, DIM))) * 0.1
    faiss.copy_array_to_vector(codebooks.ravel(), rq.rq.codebooks)  # type: ignore[attr-defined]
    rq.rq.is_trained = rq.is_trained = True  # type: ignore[attr-defined]
    yield "rq", "512 stages", "rq", bytes(faiss.serialize_index(rq).tobytes())  # type: ignore[arg-type]
    yield "pq", "as another codec's state", "rq", pq
    yield "pq", "unknown codec name", "nonexistent", pq


def byte_cases(states: dict[str, tuple[str, bytes]]) -> Iterator[Case]:
    """The in-process part of the fuzz loop: format-blind and structural damage."""
    rng = np.random.default_rng(12345)
    for label, (name, state) in states.items():
        for mutation, mutated in byte_mutations(state, rng):
            yield label, mutation, name, mutated
        if label in SAFETENSORS_LABELS:
            for mutation, mutated in safetensors_mutations(state):
                yield label, mutation, name, mutated
        if label.startswith("qw-"):
            for mutation, mutated in npz_mutations(state, rng):
                yield label, mutation, name, mutated


def bounded_cases(states: dict[str, tuple[str, bytes]]) -> Iterator[Case]:
    """The part run under the memory cap: header integers set to huge values, and crafted states."""
    for label in FAISS_LABELS:
        name, state = states[label]
        for mutation, mutated in faiss_header_mutations(state):
            yield label, mutation, name, mutated
    yield from crafted_states(states)


def tally(cases: Iterator[Case]) -> tuple[dict[str, Counter[str]], dict[str, str]]:
    """Run every case → (label → Counter of outcomes, "label: mutation" → outcome)."""
    counts: dict[str, Counter[str]] = {}
    seen: dict[str, str] = {}
    for label, mutation, name, state in cases:
        try:
            result = outcome(name, state)
        except Exception as error:  # reported with the case that caused it
            result = f"other: {type(error).__name__}: {str(error)[:200]}"
        counts.setdefault(label, Counter())[result.split(":")[0]] += 1
        seen[f"{label}: {mutation}"] = result
    return counts, seen


def bounded_main(directory: str) -> None:
    """Subprocess entry point: cap the address space 1 GiB above the warmed-up baseline, run
    :func:`bounded_cases` on the states in ``directory``, print the tallies and peak memory as JSON."""
    import resource

    faiss.omp_set_num_threads(1)
    decoded: dict[str, tuple[str, bytes]] = {}
    for path in Path(directory).iterdir():
        name, state = path.read_bytes().split(b"\0", 1)
        decoded[path.stem] = (name.decode(), state)
    for codec_name, codec_state in decoded.values():  # warm up: threads, allocators, lazy imports
        outcome(codec_name, codec_state)
    baseline, baseline_rss = _status_kib("VmSize") * 1024, _status_kib("VmHWM") / 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = baseline + GIB if hard == resource.RLIM_INFINITY else min(baseline + GIB, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    counts, seen = tally(bounded_cases(decoded))
    report = {
        "counts": {label: dict(c) for label, c in counts.items()},
        "seen": seen,
        "baseline_vm_mib": baseline / 2**20,
        "baseline_rss_mib": baseline_rss,
        "peak_vm_mib": _status_kib("VmPeak") / 1024,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(report))


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` figure in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


# --- tests -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def states() -> Iterator[dict[str, tuple[str, bytes]]]:
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # FAISS's OpenMP threads spin-wait on a busy machine
    yield train_states()
    faiss.omp_set_num_threads(threads)


def test_genuine_states_round_trip_exactly(states: dict[str, tuple[str, bytes]]) -> None:
    x = unit(np.random.default_rng(3).standard_normal((50, DIM)))
    for label, (name, state) in states.items():
        codec = load_codec(name, state)
        assert codec.to_bytes() == state, label
        if label in FAISS_LABELS:  # rebuilt from the parsed arrays, it codes as FAISS's reader's index
            index = faiss.deserialize_index(np.frombuffer(state, dtype=np.uint8))
            codes = index.sa_encode(x)
            assert np.array_equal(codec.encode(x), codes), label
            assert np.array_equal(codec.decode(codes), index.sa_decode(codes)), label
            ours, _ = codec.search_index(codes).search(x[:5], 5)
            theirs, _ = index_holding(index, codes).search(x[:5], 5)
            assert np.allclose(ours, theirs, atol=1e-5), label


def test_damaged_states_load_and_work_or_raise_codec_state_error(states: dict[str, tuple[str, bytes]]) -> None:
    counts, seen = tally(byte_cases(states))
    others = {case: result for case, result in seen.items() if result.startswith("other")}
    assert not others, others
    assert set(counts) == set(CODECS)
    assert sum(sum(c.values()) for c in counts.values()) >= 200
    assert seen["pq: empty"] == "rejected"


def test_huge_claims_stay_under_a_1_gib_cap(states: dict[str, tuple[str, bytes]], tmp_path: Path) -> None:
    for label, (name, state) in states.items():
        (tmp_path / label).write_bytes(name.encode() + b"\0" + state)
    command = f"import test_codec_states as t; t.bounded_main({str(tmp_path)!r})"
    tests = str(Path(__file__).parent)
    result = subprocess.run(
        [sys.executable, "-c", command], cwd=tests, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-3000:]}"
    report = json.loads(result.stdout.splitlines()[-1])
    others = {case: outcome for case, outcome in report["seen"].items() if outcome.startswith("other")}
    assert not others, others
    assert sum(sum(c.values()) for c in report["counts"].values()) >= 200
    seen = report["seen"]
    for case in (
        "pqvae: latent_dim=1000000",
        "pqvae: latent_dim=16000",
        "pqvae: hidden=16384",
        "pq: pq.d=2^31",
        "pq: M=0",
        "pq: M*nbits=24 (M=3)",
        "pq: M*nbits=28 (nbits=7)",
        "pq: centroid count -1",
        "pq: unknown codec name",
    ):
        assert seen[case] == "rejected", case
    assert seen["rq: 512 stages"] == "loaded"
    assert report["peak_vm_mib"] < report["baseline_vm_mib"] + 1024
