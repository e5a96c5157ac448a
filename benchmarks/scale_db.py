"""Benchmark: a real semdb database of a million embeddings (issue 10) — import, build, catch-up, search.

The embeddings are ``scale.py``'s synthetic 512-d clustered data, imported in chunks through the
public API (``db.add_embeddings``; the codec, ``--codec`` at ``--bits``, and its inverted lists train
on the first ``--train`` of them), then, one thread:

* the full build of the index from the store (no cache: codes streamed into numpy, ``1/‖x̂‖``
  decoded, exact and fast indexes built) and the load of the cache it wrote;
* the first search after adding 1,000 embeddings, and after pruning 1,000 images (the open index
  catches up), and the first search of a fresh process-level connection whose cache is one
  change behind (caught up from the earlier cache);
* ``Database.search_vectors`` latency, default (fast scan + exact re-rank) and ``exact=True``,
  with 10-recall@10 of the default against the exact answer, and the default again alone, through
  the Database and on the index itself (what the Database adds per query);
* the open index's resident bytes per item, by component.

    python benchmarks/scale_db.py              # 1M; ~10 min on 2 shared cores
    python benchmarks/scale_db.py --n 200000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from functools import partialmethod
from pathlib import Path
from unittest import mock

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import machine, percentile_ms, print_table
from scale import chunks
from search_latency import spectrum, synthetic

import semdb
from semdb.evaluation import recall_at_k
from semdb.index import SearchIndex, cache_path
from semdb.store.repository import Repository

DIM = 512
K = 10
BUILD_REPEATS = 3


def index_bytes(index: SearchIndex) -> dict[str, int]:
    """Resident bytes of the open index by component (arrays and FAISS-held codes)."""
    parts: dict[str, int] = {"exact scan codes": 0, "exact scan rows + 1/norm": 0, "ids + lists": 0, "fast scan": 0}
    for group in index.coded:
        for part in group.index.parts if group.index is not None else []:  # None: built on the first exact search
            parts["exact scan codes"] += part.index.ntotal * part.index.sa_code_size()
            parts["exact scan rows + 1/norm"] += part.rows.nbytes + (
                part.inverse_norms.nbytes if part.inverse_norms is not None else 0
            )
        # None where the fast scan holds them (counted there).
        parts["ids + lists"] += (group.row_ids.nbytes if group.row_ids is not None else 0) + (
            group.row_lists.nbytes if group.row_lists is not None else 0
        )
        if group.fast is not None:
            parts["fast scan"] += group.fast.nbytes()
    return parts


def timed_cpu(action) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    wall, cpu = time.perf_counter(), time.process_time()
    action()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--codec", default="pcapq")
    parser.add_argument("--bits", type=int, default=128)
    parser.add_argument("--train", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folder", default=None, help="where the database goes (default: a temporary folder)")
    parser.add_argument(
        "--reuse", action="store_true", help="use the database already in --folder (made by an earlier run) as it is"
    )
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(1)
    print(machine())
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((1000, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    scales = spectrum(DIM, 0.5, rng)
    queries = synthetic(args.queries, centres, 1.5, scales, rng)
    folder = Path(args.folder or tempfile.mkdtemp(prefix="semdb-scale-"))
    path = folder / "scale.semdb"
    rows: list[list[object]] = []
    with threadpool_limits(limits=1):
        if not (args.reuse and path.exists()):
            with semdb.connect(path, codec=args.codec, bits=args.bits, model="synthetic-512") as db:
                started = time.perf_counter()
                for start, block in chunks(args.n, centres, scales, 1.0, args.seed):
                    db.add_embeddings(
                        [f"/synthetic/{start + i}.jpg" for i in range(len(block))], block, train_size=args.train
                    )
                rows.append(["import (add_embeddings)", time.perf_counter() - started, None])
                print(f"imported {args.n:,} in {rows[-1][1]:.0f} s", flush=True)
        # The full build, against the baseline in the same process: codes read as the driver's tuple
        # per row (PostgreSQL's path). A build first warms the page cache and the one-time set-up;
        # then the two alternate, BUILD_REPEATS each, and the median of each is shown.
        builds: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for by_row in (False, *(False, True) * BUILD_REPEATS):
            cache_path(path).unlink(missing_ok=True)
            row_reader = partialmethod(Repository.coded_chunks, by_row=True)
            reader = mock.patch.object(Repository, "coded_chunks", row_reader) if by_row else nullcontext()
            with reader, semdb.connect(path) as db:
                builds[by_row].append(timed_cpu(db.index))
        builds[False].pop(0)  # the warm-up
        labels = {False: "full build from the store", True: "  the same, codes read row by row (baseline)"}
        for by_row, label in labels.items():
            walls, cpus = zip(*builds[by_row], strict=True)
            rows.append([label, float(np.median(walls)), float(np.median(cpus))])
        with semdb.connect(path) as db:
            rows.append(["load of the cache (same state)", *timed_cpu(db.index)])
            index = db.index()
            sizes = index_bytes(index)
            rows.append(
                [
                    "first exact search (builds the exact scan)",
                    *timed_cpu(lambda: db.search_vectors(queries[:1], k=K, exact=True)),
                ]
            )
            with_exact = sum(index_bytes(index).values())
            fast_walls, fast_cpus, exact_walls, exact_cpus, fast_ids, exact_ids = [], [], [], [], [], []
            for query in queries:
                wall, cpu = time.perf_counter(), time.thread_time()
                hits = db.search_vectors(query[None, :], k=K)[0]
                fast_cpus.append(time.thread_time() - cpu)
                fast_walls.append(time.perf_counter() - wall)
                wall, cpu = time.perf_counter(), time.thread_time()
                truth = db.search_vectors(query[None, :], k=K, exact=True)[0]
                exact_cpus.append(time.thread_time() - cpu)
                exact_walls.append(time.perf_counter() - wall)
                fast_ids.append([hit.id for hit in hits])
                exact_ids.append([hit.id for hit in truth])
            # The same fast searches again, not interleaved with exact ones (whose scan evicts the
            # caches), through the Database and on the index alone: what the Database adds.
            alone: dict[str, list[float]] = {"Database.search_vectors": [], "SearchIndex.search": []}
            for query in queries:
                cpu = time.thread_time()
                db.search_vectors(query[None, :], k=K)
                alone["Database.search_vectors"].append(time.thread_time() - cpu)
                cpu = time.thread_time()
                index.search(query[None, :], K)
                alone["SearchIndex.search"].append(time.thread_time() - cpu)
            run = time.time_ns()  # new paths and vectors each run, so that a --reuse run adds new images
            extra = synthetic(1000, centres, 1.0, scales, np.random.default_rng(run % 2**32))
            extra_paths = [f"/synthetic/extra-{run}-{i}.jpg" for i in range(1000)]
            add_wall, _ = timed_cpu(lambda: db.add_embeddings(extra_paths, extra))
            rows.append(["add 1,000 (the import itself)", add_wall, None])
            rows.append(["first search after adding 1,000", *timed_cpu(lambda: db.search_vectors(queries[:1], k=K))])
            assert db.store is not None
            with db.store.writing() as repository:
                gone = [image_id for image_id, _ in repository.images_under_page("/synthetic", 0, 1000)]
                repository.delete_images(gone)
                repository.delete_orphans()
                repository.record_change()
            rows.append(["first search after pruning 1,000", *timed_cpu(lambda: db.search_vectors(queries[:1], k=K))])
            db.add_embeddings([f"/synthetic/late-{run}-{i}.jpg" for i in range(10)], extra[:10] + 0.01)
        with semdb.connect(path) as db:  # the cache is one change behind: caught up from it
            rows.append(["reopen, cache one change behind", *timed_cpu(lambda: db.search_vectors(queries[:1], k=K))])
    print_table(
        f"{args.n:,} embeddings in a semdb database ({args.codec} {args.bits} bits), one thread",
        ["step", "wall s", "CPU s"],
        rows,
    )
    print_table(
        "Database.search_vectors, one query at a time (ms)",
        ["search", "p50 wall", "p99 wall", "p50 CPU", "p99 CPU", "10-recall@10 vs exact"],
        [
            [
                "default (fast)",
                percentile_ms(fast_walls, 50),
                percentile_ms(fast_walls, 99),
                percentile_ms(fast_cpus, 50),
                percentile_ms(fast_cpus, 99),
                recall_at_k(np.array(exact_ids), np.array(fast_ids)),
            ],
            [
                "exact=True",
                percentile_ms(exact_walls, 50),
                percentile_ms(exact_walls, 99),
                percentile_ms(exact_cpus, 50),
                percentile_ms(exact_cpus, 99),
                1.0,
            ],
        ],
    )
    print_table(
        "Default search not interleaved with exact ones, one query at a time (ms CPU)",
        ["search", "p50 CPU", "p99 CPU"],
        [[name, percentile_ms(times, 50), percentile_ms(times, 99)] for name, times in alone.items()],
    )
    n = index.size
    print_table(
        "Open index, resident bytes per item",
        ["component", "bytes/item"],
        [[name, value / n] for name, value in sizes.items()]
        + [["total", sum(sizes.values()) / n], ["total once an exact search has built the exact scan", with_exact / n]],
    )
    print(f"database file {path.stat().st_size / n:.0f} bytes/item; folder {folder}")


if __name__ == "__main__":
    main()
