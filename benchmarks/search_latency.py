"""Benchmark: search latency over 16-byte PQ codes against numpy brute force (issue 2, Benchmark).

One query at a time, text encoding excluded, on one core (``faiss.omp_set_num_threads`` and
threadpoolctl for numpy's BLAS). Data: synthetic 512-d embeddings with cluster structure
(``--clusters`` random unit centres, each point ``centre + noise``, L2-normalised, the noise with a
decaying per-dimension spectrum, ``--decay``); queries are drawn the same way with more noise. The
PQ codec is semdb's own (``train_codec("pq", sample, 128)``, trained on ``--train`` points) and its
index is built exactly as semdb builds it (``codec.cosine_index(codes)``). Compared side by side,
interleaved query by query:

* ``numpy``   — brute force over the float32 vectors: ``x @ q`` + ``argpartition`` (the baseline);
* ``pq-cos``  — semdb's index: FAISS ``IndexPQ`` 16 x 8 bits over the codes, ranked by cosine to the
  reconstructions (:class:`semdb.cosine.CosineIndex`, exact);
* ``pq``      — the same ``IndexPQ`` ranked by plain inner product (asymmetric distance);
* ``fastscan``— FAISS ``IndexPQFastScan`` 32 x 4 bits (also 16 bytes), SIMD scan with 8-bit LUTs;
* ``--also pcapq,pqvae-pca``: other semdb codecs at the same bits, trained on the same sample and
  searched through their own ``cosine_index`` (e.g. ``pcapq-cos``), interleaved with the rest.

Also: resident memory per image of each index (psutil RSS delta while building it, and serialised
bytes / n), recall@10 against the float brute force, and, on a real semdb database of
``--db-rows`` images (rows inserted directly through the store models), ``Database.search_vectors``
latency and the index cache load against a rebuild from SQLite.

    python benchmarks/search_latency.py            # 100k and 1M, ~3 min on 2 shared cores
    python benchmarks/search_latency.py --quick    # 100k only, fewer queries
    python benchmarks/search_latency.py --full     # more queries
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from _bench import PeakRss, machine, percentile_ms, print_table, rss_bytes

from semdb.codecs import Codec

DIM = 512
BITS = 128
K = 10


def synthetic(
    n: int, centres: np.ndarray, noise: float, scales: np.ndarray, rng: np.random.Generator, chunk: int = 100_000
) -> np.ndarray:
    """``n`` points ``centre + noise * scales * g / sqrt(d)`` → ``(n, d)`` float32, L2-normalised.

    ``centres``: ``(c, d)`` unit vectors; ``scales``: ``(d,)`` per-dimension noise scales with mean
    square 1 (a decaying spectrum, as real embeddings have, rather than isotropic noise).
    """
    d = centres.shape[1]
    out = np.empty((n, d), dtype=np.float32)
    factor = (scales * (noise / np.sqrt(d))).astype(np.float32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        block = rng.standard_normal((stop - start, d), dtype=np.float32)
        block *= factor
        block += centres[rng.integers(0, len(centres), stop - start)]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:stop] = block
    return out


def spectrum(d: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Per-dimension noise scales ``(j + 1) ** -decay`` in random order, mean square 1 → ``(d,)`` float32."""
    scales = (np.arange(d) + 1.0) ** -decay
    scales /= np.sqrt(np.mean(scales**2))
    return rng.permutation(scales).astype(np.float32)


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Exact top-``k`` rows of ``x`` ``(n, d)`` by inner product with ``q`` ``(d,)`` → ``(k,)`` int64, best first."""
    scores = x @ q
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top])]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """10-recall@10: mean fraction of each row of ``truth`` ``(q, k)`` present in the same row of ``found``."""
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)]))


def nn_in_k(found: np.ndarray, truth: np.ndarray) -> float:
    """1-recall@10: fraction of queries whose exact nearest neighbour ``truth[:, 0]`` is in ``found`` ``(q, k)``."""
    return float(np.mean([t[0] in f for f, t in zip(found, truth, strict=True)]))


def build_with_rss(build: object) -> tuple[faiss.Index, int, float]:
    """Call ``build()`` → (index, RSS growth in bytes, seconds)."""
    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    index = build()  # type: ignore[operator]
    seconds = time.perf_counter() - started
    gc.collect()
    return index, rss_bytes() - before, seconds


def index_bytes(index: faiss.Index) -> int:
    """Size of FAISS's serialisation of ``index`` (codes + codebooks)."""
    return int(faiss.serialize_index(index).nbytes)


def train_indexes(sample: np.ndarray, seed: int) -> tuple[Codec, faiss.Index]:
    """semdb's PQ codec and an empty trained ``IndexPQFastScan``, both trained on ``sample`` ``(n, d)`` float32."""
    from semdb.codecs import train_codec

    codec = train_codec("pq", sample, BITS, seed=seed)
    fastscan = faiss.IndexPQFastScan(DIM, BITS // 4, 4, faiss.METRIC_INNER_PRODUCT)
    fastscan.pq.cp.seed = seed
    fastscan.train(sample)
    return codec, fastscan


def run_scale(
    n: int,
    n_queries: int,
    args: argparse.Namespace,
    centres: np.ndarray,
    scales: np.ndarray,
    rng: np.random.Generator,
    codec: Codec,
    fastscan_trained: faiss.Index,
    also: dict[str, Codec],
) -> tuple[list[list[object]], list[list[object]], np.ndarray, np.ndarray]:
    """Benchmark one collection size → (latency rows, memory rows, the codes, the queries)."""
    faiss.omp_set_num_threads(args.build_threads)
    started = time.perf_counter()
    x = synthetic(n, centres, args.noise, scales, rng)
    queries = synthetic(n_queries, centres, args.query_noise, scales, rng)
    codes = codec.encode(x)
    print(f"[{n:,}] data + PQ codes: {time.perf_counter() - started:.1f} s", flush=True)

    cos_index, cos_rss, cos_build = build_with_rss(lambda: codec.cosine_index(codes))
    pq_index, pq_rss, _ = build_with_rss(lambda: codec.search_index(codes))

    def build_fastscan() -> faiss.Index:
        index = faiss.clone_index(fastscan_trained)
        index.add(x)
        return index

    fs_index, fs_rss, fs_build = build_with_rss(build_fastscan)
    also_codes = {name: other.encode(x) for name, other in also.items()}
    also_built = {
        name: build_with_rss(lambda other=other, codes=also_codes[name]: other.cosine_index(codes))
        for name, other in also.items()
    }
    print(f"[{n:,}] indexes built (pq-cos {cos_build:.1f} s, fastscan incl. encoding {fs_build:.1f} s)", flush=True)

    faiss.omp_set_num_threads(args.threads)
    timings: dict[str, list[float]] = {"numpy": [], "pq-cos": [], "pq": [], "fastscan": []}
    cpu: dict[str, list[float]] = {name: [] for name in timings}
    found: dict[str, list[np.ndarray]] = {name: [] for name in timings}

    def run_numpy(q: np.ndarray) -> np.ndarray:
        return brute_force(x, q, K)

    def run_pq_cosine(q: np.ndarray) -> np.ndarray:
        ids: np.ndarray = cos_index.search(q[None, :], K)[1][0]
        return ids

    def run_pq(q: np.ndarray) -> np.ndarray:
        ids: np.ndarray = pq_index.search(q[None, :], K)[1][0]
        return ids

    def run_fastscan(q: np.ndarray) -> np.ndarray:
        ids: np.ndarray = fs_index.search(q[None, :], K)[1][0]
        return ids

    runners = {"numpy": run_numpy, "pq-cos": run_pq_cosine, "pq": run_pq, "fastscan": run_fastscan}
    for name, (other_index, _, _) in also_built.items():
        runners[f"{name}-cos"] = lambda q, index=other_index: index.search(q[None, :], K)[1][0]
        timings[f"{name}-cos"], cpu[f"{name}-cos"], found[f"{name}-cos"] = [], [], []
    for q in queries[:3]:  # warm-up: page in the arrays, initialise BLAS and FAISS
        for runner in runners.values():
            runner(q)
    names = list(runners)
    for i, q in enumerate(queries):
        shift = i % len(names)  # rotate the order so drift hits every method alike
        for name in names[shift:] + names[:shift]:
            started, started_cpu = time.perf_counter(), time.thread_time()
            ids = runners[name](q)
            timings[name].append(time.perf_counter() - started)
            cpu[name].append(time.thread_time() - started_cpu)
            found[name].append(ids)
    truth = np.array(found["numpy"])
    base_p50 = percentile_ms(timings["numpy"], 50)
    latency_rows: list[list[object]] = []
    for name, label in (
        ("numpy", "numpy brute force, float32"),
        ("pq-cos", "semdb: IndexPQ 16x8 (codes), cosine"),
        ("pq", "IndexPQ 16x8 (codes), inner product"),
        ("fastscan", "IndexPQFastScan 32x4 (codes)"),
        *((f"{name}-cos", f"semdb: {other.describe()}, cosine") for name, other in also.items()),
    ):
        p50 = percentile_ms(timings[name], 50)
        latency_rows.append(
            [
                f"{n:,}",
                label,
                p50,
                percentile_ms(timings[name], 99),
                percentile_ms(cpu[name], 50),
                base_p50 / p50,
                recall_at_k(np.array(found[name]), truth),
                nn_in_k(np.array(found[name]), truth),
            ]
        )
    # Serialised parts + row numbers (8 B) + inverse norms (4 B) per image, as the cache file holds them.
    cos_bytes = sum(index_bytes(part.index) for part in cos_index.parts) + 12 * n
    memory_rows: list[list[object]] = [
        [f"{n:,}", "numpy float32 vectors", x.nbytes / n, x.nbytes / n],
        [f"{n:,}", "semdb: IndexPQ 16x8 parts + 1/norms", cos_rss / n, cos_bytes / n],
        [f"{n:,}", "IndexPQ 16x8 alone", pq_rss / n, index_bytes(pq_index) / n],
        [f"{n:,}", "IndexPQFastScan 32x4", fs_rss / n, index_bytes(fs_index) / n],
    ]
    for name, (other_index, other_rss, _) in also_built.items():
        other_bytes = sum(index_bytes(part.index) for part in other_index.parts) + 12 * n
        memory_rows.append([f"{n:,}", f"semdb: {name} parts + 1/norms", other_rss / n, other_bytes / n])
    return latency_rows, memory_rows, codes, queries


def build_database(path: Path, codes: np.ndarray, codec: Codec, n_train: int) -> None:
    """A semdb database at ``path`` holding ``codes`` ``(n, 16)`` uint8, written through the store's repository."""
    from semdb.store import STATUS_INDEXED, Store

    n = len(codes)
    store = Store.open(path, write=True, create=True)
    with store.writing() as repository:
        repository.set_settings(
            {"model": "synthetic-512d", "codec": "pq", "bits_per_image": str(BITS), "dim": str(DIM)}
        )
        codec_id = repository.add_active_codec("pq", BITS, DIM, codec.to_bytes(), trained_on=n_train)
        hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]
        content_ids = repository.add_contents([(sha, 640, 480) for sha in hashes])
        ids = [content_ids[sha] for sha in hashes]
        repository.add_codes(ids, codec_id, codes)
        repository.add_images(
            [
                {
                    "path": f"/photos/{i // 1000:03d}/img_{i:07d}.jpg",
                    "content_id": ids[i],
                    "size": 100_000,
                    "mtime_ns": 0,
                    "status": STATUS_INDEXED,
                    "error": None,
                }
                for i in range(n)
            ]
        )
        repository.record_change()
    store.close()


_CHILD_RSS = """
import gc, sys
import psutil
from semdb import connect
from semdb.index import cache_path
db = connect(sys.argv[1])
if sys.argv[2] == "rebuild":
    cache_path(db.path).unlink(missing_ok=True)
db.setting("model")  # warm SQLAlchemy up before the baseline
gc.collect()
before = psutil.Process().memory_info().rss
db.index()
gc.collect()
print(psutil.Process().memory_info().rss - before)
"""


def child_rss(path: Path, how: str) -> int:
    """RSS growth of a fresh process from ``connect(path)`` to after ``db.index()`` (``how``: cache or rebuild)."""
    result = subprocess.run(
        [sys.executable, "-c", _CHILD_RSS, str(path), how], capture_output=True, text=True, check=True
    )
    return int(result.stdout.strip().splitlines()[-1])


def run_database(
    n_rows: int, codes: np.ndarray, codec: Codec, queries: np.ndarray, args: argparse.Namespace
) -> tuple[list[list[object]], list[list[object]]]:
    """``Database.search_vectors`` latency and cache load vs rebuild on a real database of ``n_rows``."""
    from semdb import connect
    from semdb.index import cache_path

    codes = codes[:n_rows]
    with tempfile.TemporaryDirectory(prefix="semdb-bench-") as folder:
        path = Path(folder) / "bench.semdb"
        started = time.perf_counter()
        build_database(path, codes, codec, args.train)
        print(f"[db] {n_rows:,} rows inserted in {time.perf_counter() - started:.1f} s", flush=True)
        faiss.omp_set_num_threads(args.threads)

        gc.collect()
        rss_before = rss_bytes()
        cache_path(path).unlink(missing_ok=True)
        with connect(path) as db, PeakRss() as peak:
            db.index()  # an untimed rebuild, sampled for its transient memory peak
        load_times: dict[str, list[float]] = {"rebuild": [], "cache": []}
        for _ in range(args.cache_rounds):
            cache_path(path).unlink(missing_ok=True)
            with connect(path) as db:
                started = time.perf_counter()
                db.index()  # rebuilt from SQLite, then written to the cache
                load_times["rebuild"].append(time.perf_counter() - started)
            with connect(path) as db:
                started = time.perf_counter()
                db.index()  # read back from the cache file
                load_times["cache"].append(time.perf_counter() - started)

        db = connect(path)
        index = db.index()
        raw = index.coded[0].exact_index()  # the one codec's CosineIndex
        timings: dict[str, list[float]] = {"raw": [], "api": []}
        for q in queries[:3]:
            db.search_vectors(q[None, :], K)
        for i, q in enumerate(queries):
            order = ("raw", "api") if i % 2 == 0 else ("api", "raw")
            for name in order:
                started = time.perf_counter()
                if name == "raw":
                    raw.search(q[None, :], K)
                else:
                    db.search_vectors(q[None, :], K)
                timings[name].append(time.perf_counter() - started)
        db.close()
        cache_bytes = cache_path(path).stat().st_size
        rss_rebuilt = child_rss(path, "rebuild")
        rss_cached = child_rss(path, "cache")

    raw_p50 = percentile_ms(timings["raw"], 50)
    latency_rows: list[list[object]] = [
        [f"{n_rows:,}", "CosineIndex.search (no database)", raw_p50, percentile_ms(timings["raw"], 99), 1.0],
        [
            f"{n_rows:,}",
            "Database.search_vectors",
            percentile_ms(timings["api"], 50),
            percentile_ms(timings["api"], 99),
            percentile_ms(timings["api"], 50) / raw_p50,
        ],
    ]
    rebuild = float(np.median(load_times["rebuild"]))
    cache = float(np.median(load_times["cache"]))
    load_rows: list[list[object]] = [
        [f"{n_rows:,}", "rebuild from SQLite (+ write cache)", rebuild * 1e3, rebuild / cache],
        [f"{n_rows:,}", "load from cache file", cache * 1e3, 1.0],
        [f"{n_rows:,}", "cache file bytes / image", cache_bytes / n_rows, ""],
        [f"{n_rows:,}", "RSS growth of a fresh process, index() from cache / image", rss_cached / n_rows, ""],
        [f"{n_rows:,}", "RSS growth of a fresh process, index() rebuilt / image", rss_rebuilt / n_rows, ""],
        [
            f"{n_rows:,}",
            "peak RSS growth while rebuilding (this process) / image",
            (peak.peak - rss_before) / n_rows,
            "",
        ],
    ]
    return latency_rows, load_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="100k only, 100 queries")
    size.add_argument("--full", action="store_true", help="100k and 1M, 1000 / 300 queries")
    parser.add_argument("--sizes", default=None, help="comma-separated collection sizes (default 100000,1000000)")
    parser.add_argument("--queries", type=int, default=None, help="queries per size (default 300 at 100k, 60 at 1M)")
    parser.add_argument("--clusters", type=int, default=1000, help="cluster centres of the synthetic data")
    parser.add_argument("--noise", type=float, default=1.0, help="noise around a centre (1.0: cosine ~0.7)")
    parser.add_argument("--query-noise", type=float, default=1.5, help="noise of the queries around a centre")
    parser.add_argument("--decay", type=float, default=0.5, help="noise spectrum decay (0: isotropic noise)")
    parser.add_argument("--train", type=int, default=10_000, help="codec training points (same distribution)")
    parser.add_argument("--threads", type=int, default=1, help="threads while searching (FAISS and BLAS)")
    parser.add_argument("--build-threads", type=int, default=0, help="FAISS threads while training (0: all)")
    parser.add_argument("--db-rows", type=int, default=100_000, help="rows of the real database (0: skip)")
    parser.add_argument("--cache-rounds", type=int, default=3, help="rebuild/load rounds (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--also", default="", help="other semdb codecs to time beside pq, e.g. pcapq,pqvae-pca")
    args = parser.parse_args()
    if args.build_threads <= 0:
        args.build_threads = faiss.omp_get_max_threads()
    default_sizes = "100000" if args.quick else "100000,1000000"
    sizes = [int(size) for size in (args.sizes or default_sizes).split(",")]

    def queries_for(n: int) -> int:
        if args.queries:
            return int(args.queries)
        if args.quick:
            return 100
        if args.full:
            return 1000 if n <= 100_000 else 300
        return 300 if n <= 100_000 else 60

    from threadpoolctl import threadpool_info, threadpool_limits

    print(machine())
    print(
        f"faiss {faiss.__version__}, numpy {np.__version__}, BLAS: "
        + ", ".join(f"{p['internal_api']} {p.get('version')}" for p in threadpool_info())
    )
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    latency: list[list[object]] = []
    memory: list[list[object]] = []
    db_latency: list[list[object]] = []
    db_load: list[list[object]] = []
    started = time.perf_counter()
    scales = spectrum(DIM, args.decay, rng)
    sample = synthetic(args.train, centres, args.noise, scales, rng)
    codec, fastscan_trained = train_indexes(sample, args.seed)
    from semdb.codecs import train_codec

    also = {name: train_codec(name, sample, BITS, seed=args.seed) for name in filter(None, args.also.split(","))}
    print(f"codecs trained on {args.train:,} points: {time.perf_counter() - started:.1f} s", flush=True)
    with threadpool_limits(limits=args.threads):
        for n in sizes:
            rows, mem, codes, queries = run_scale(
                n, queries_for(n), args, centres, scales, rng, codec, fastscan_trained, also
            )
            latency += rows
            memory += mem
            if args.db_rows and n >= args.db_rows and not db_latency:
                db_latency, db_load = run_database(args.db_rows, codes, codec, queries, args)
            del codes, queries
            gc.collect()

    threads = f"{args.threads} thread{'s' if args.threads > 1 else ''}"
    print_table(
        f"Search latency, one query at a time, k={K}, {threads}",
        ["images", "method", "p50 ms", "p99 ms", "CPU p50 ms", "speed-up", "10-R@10", "1-R@10"],
        latency,
    )
    print(
        "p50/p99: wall clock; CPU p50: the searching thread's CPU time (time lost to other processes on a "
        "shared machine excluded); speed-up = numpy p50 / p50; 10-R@10 = overlap with the exact (numpy) top 10; "
        "1-R@10 = exact nearest neighbour in the top 10"
    )
    print_table("Resident memory per image", ["images", "index", "RSS bytes/image", "index bytes/image"], memory)
    print("RSS = growth of this process's RSS while building the index; index = FAISS serialisation / n")
    if db_latency:
        print_table(
            f"Full API path on a real semdb database, {threads}",
            ["images", "path", "p50 ms", "p99 ms", "ratio"],
            db_latency,
        )
        print("ratio = p50 / IndexPQ.search p50 (same index, same queries, interleaved)")
        print_table("Index cache: load vs rebuild", ["images", "what", "ms or bytes", "ratio"], db_load)
        print(f"median of {args.cache_rounds} rounds; ratio = rebuild / load")


if __name__ == "__main__":
    main()
