"""Benchmark: the full build's read of the codes from the store, a page per row against a row per code.

A full build of the index (no cache) streams every code from the store
(``Repository.coded_chunks``). The default reads one result row per page of 65,536 images, its
ids, codes and list numbers joined by the database itself: no Python object per code. The
baseline is the driver's tuple per code (``by_row=True``). The two alternate in one process,
``--repeats`` times each after a warm-up read; the table gives the median of each, with CPU time
(``time.thread_time``) beside wall time. On PostgreSQL the server's work is in wall time only.

The database is made here: ``--n`` of ``scale.py``'s synthetic 512-d embeddings through
``db.add_embeddings`` (``pcapq``, 128 bits). It goes into a temporary SQLite file, or into
PostgreSQL with ``--postgres``. That is ``--postgres URL`` (a server whose user may create
databases), or ``--postgres own`` for a throw-away cluster started as the tests start theirs
(Debian's ``initdb``/``pg_ctl``)::

    python benchmarks/store_read.py --n 200000                  # SQLite
    python benchmarks/store_read.py --n 200000 --postgres own   # PostgreSQL
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import machine, print_table
from scale import chunks
from search_latency import spectrum

import semdb
from semdb.store import Store

DIM = 512


@contextlib.contextmanager
def location(postgres: str | None) -> Iterator[str]:
    """Where the database goes: a temporary file, or a new database on a PostgreSQL server."""
    if postgres is None:
        with tempfile.TemporaryDirectory(prefix="semdb-read-") as folder:
            yield str(Path(folder) / "read.semdb")
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from servers import PostgresServer, own_postgres

    if postgres != "own":
        yield PostgresServer(postgres).create_database()
        return
    with own_postgres() as server:
        yield server.create_database()


def main() -> None:
    """Make the database, then time both reads side by side."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--postgres", default=None, help="a server URL, or 'own' to start one (default: SQLite)")
    args = parser.parse_args()
    print(machine())
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    scales = spectrum(DIM, 0.5, rng)
    with location(args.postgres) as where, threadpool_limits(limits=1):
        started = time.perf_counter()
        with semdb.connect(where, codec="pcapq", bits=128, model="synthetic-512") as db:
            for start, block in chunks(args.n, centres, scales, 1.0, 0):
                paths = [f"/synthetic/{start + i}.jpg" for i in range(len(block))]
                db.add_embeddings(paths, block, train_size=min(50_000, args.n))
        print(f"imported {args.n:,} in {time.perf_counter() - started:.0f} s", flush=True)
        store = Store.open(where)
        timings: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        with store.reading() as repository:
            codec_id = int(repository.connection.exec_driver_sql("SELECT id FROM codecs").scalar_one())
            read = [np.concatenate(part) for part in zip(*repository.coded_chunks(codec_id, 16), strict=True)]
            for _ in range(args.repeats):
                for by_row in (False, True):
                    wall, cpu = time.perf_counter(), time.thread_time()
                    chunks_read = list(repository.coded_chunks(codec_id, 16, by_row=by_row))
                    timings[by_row].append((time.perf_counter() - wall, time.thread_time() - cpu))
            rows_read = [np.concatenate(part) for part in zip(*chunks_read, strict=True)]
        store.close()
    same = all(np.array_equal(a, b) for a, b in zip(read, rows_read, strict=True))
    medians = {by_row: np.median(np.array(values), axis=0) for by_row, values in timings.items()}
    table = [
        [label, medians[by_row][0], medians[by_row][1], medians[by_row][1] / medians[True][1]]
        for by_row, label in ((False, "a page per row (default)"), (True, "a row per code (baseline)"))
    ]
    backend = "PostgreSQL" if args.postgres else "SQLite"
    title = f"{backend}: reading {len(read[0]):,} codes, median of {args.repeats}; same result: {same}"
    print_table(title, ["read", "wall s", "CPU s", "CPU vs baseline"], table)


if __name__ == "__main__":
    main()
