"""Benchmark: Ray ingest and a PostgreSQL store against single-process ingest and SQLite (issue 12).

Two parts, each side by side in one process on one machine (a throw-away PostgreSQL server is
started as the tests start it, and a local Ray cluster with the machine's CPUs):

* ``ingest`` — the same ``--images`` generated files (benchmarks/ingest_throughput.py's images) and
  model, ingested into a fresh database each time by: a single process into SQLite, a single process
  into PostgreSQL, Ray with 1 encoder actor into PostgreSQL, Ray with 2 actors into PostgreSQL.
  Wall time, images/s, the ratio to the single-process SQLite ingest, the driver's CPU time, and
  where the time goes: model time and batch time inside the workers (each worker appends what it
  spent to a log file), read + decode time in the Ray tasks, and actor start-up (model load).
  Default model: a seeded random-weight ViT-S-32 (CLIP-sized, so that the model dominates as it does
  in real use); ``--model tiny-fashion`` for the bundled one.
* ``crash`` — a ``semdb ingest --ray`` killed (SIGKILL to its whole process group, local cluster
  included) once ``--kill-at`` images are committed, then run again: the database must end complete,
  with one codec, nothing staged and nothing twice.
* ``search`` — ``Database.search_vectors`` latency at ``--rows`` items, one query at a time on one
  thread, through a PostgreSQL-backed database and an SQLite one holding the same codes (inserted
  through the Repository, benchmarks/search_latency.py's ``build_database``), interleaved; plus the
  index build from the store and the load from the cache.

    PYTHONPATH=. python3 benchmarks/distributed.py                       # ~6 min on 2 shared cores
    PYTHONPATH=. python3 benchmarks/distributed.py --parts search --rows 100000
    PYTHONPATH=. python3 benchmarks/distributed.py --parts ingest --images 300 --model tiny-fashion
    PYTHONPATH=. python3 benchmarks/distributed.py --parts crash --images 300   # kill a Ray ingest, resume
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _bench import machine, percentile_ms, print_table
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # servers.py: the PostgreSQL server the tests start

import semdb  # noqa: E402
import semdb.ingest.distributed as distributed  # noqa: E402
from semdb.encoder import BUNDLED_MODEL, load_encoder  # noqa: E402

K = 10


class LoggedEncoder:
    """An encoder loaded from ``spec`` where it is used (driver or Ray actor), appending to ``log`` the
    wall and thread-CPU seconds of every ``encode_images`` call. Pickled without its model."""

    def __init__(self, spec: str, dim: int, image_size: int | None, log: str, batch_size: int) -> None:
        self.spec, self.dim, self.image_size, self.log, self.batch_size = spec, dim, image_size, log, batch_size
        self._inner: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_inner": None}

    def _model(self) -> Any:
        if self._inner is None:
            started = time.perf_counter()
            self._inner = load_encoder(self.spec, device="cpu", batch_size=self.batch_size)
            _append(self.log, {"kind": "load", "wall": time.perf_counter() - started, "pid": os.getpid()})
        return self._inner

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        model = self._model()
        started, cpu = time.perf_counter(), time.thread_time()
        vectors = model.encode_images(images)
        _append(self.log, {"kind": "encode", "wall": time.perf_counter() - started, "cpu": time.thread_time() - cpu})
        return vectors

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self._model().encode_texts(texts))


def _append(log: str, entry: dict[str, Any]) -> None:
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({**entry, "pid": os.getpid()}) + "\n")


_original_prepare = distributed._prepare_rows
_original_actor = distributed._EncodeAndWrite
# The current run's log; read tasks get its value when Ray pickles _logged_prepare (by value: __main__).
CURRENT = {"log": ""}


def _logged_prepare(batch: dict[str, np.ndarray], max_pixels: int, min_side: int | None) -> dict[str, Any]:
    started, cpu = time.perf_counter(), time.thread_time()
    rows = _original_prepare(batch, max_pixels, min_side)
    _append(CURRENT["log"], {"kind": "prepare", "wall": time.perf_counter() - started, "cpu": time.thread_time() - cpu})
    return rows


class _LoggedActor(_original_actor):  # type: ignore[misc,valid-type]
    """The Ray actor, timing its start-up and each batch (embed + commit) into the log."""

    def __init__(self, **options: Any) -> None:
        started = time.perf_counter()
        super().__init__(**options)
        options["encoder"]._model()
        _append(options["encoder"].log, {"kind": "actor-start", "wall": time.perf_counter() - started})

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        started, cpu = time.perf_counter(), time.thread_time()
        result = super().__call__(batch)
        log = self.ingestor.encoder.log
        _append(log, {"kind": "batch", "wall": time.perf_counter() - started, "cpu": time.thread_time() - cpu})
        return result


def read_log(log: str) -> dict[str, dict[str, float]]:
    """kind → summed wall and cpu seconds and call count."""
    totals: dict[str, dict[str, float]] = {}
    if not os.path.exists(log):
        return totals
    with open(log, encoding="utf-8") as handle:
        for line in handle:
            entry = json.loads(line)
            total = totals.setdefault(entry["kind"], {"wall": 0.0, "cpu": 0.0, "calls": 0})
            total["wall"] += entry["wall"]
            total["cpu"] += entry.get("cpu", 0.0)
            total["calls"] += 1
    return totals


def part_ingest(args: argparse.Namespace, server: Any, work: Path) -> None:
    import ray
    from ingest_throughput import generate_images, random_vit_s32

    paths = generate_images(work / "images", args.images, args.seed)
    spec = args.model or random_vit_s32(work, args.seed)
    probe = load_encoder(spec, device="cpu")
    print(f"{len(paths)} images; model {spec.split(':')[0]} ({probe.dim}-d, input {probe.image_size} px)")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    distributed._prepare_rows = _logged_prepare  # type: ignore[assignment]
    distributed._EncodeAndWrite = _LoggedActor  # type: ignore[misc]
    runs = [("single process → SQLite", "sqlite", None), ("single process → PostgreSQL", "postgresql", None)]
    runs += [(f"Ray, {n} actor{'s' * (n > 1)} → PostgreSQL", "postgresql", n) for n in (1, 2)]
    rows, breakdown = [], []
    baseline = None
    for number, (name, backend, actors) in enumerate(runs):
        log = str(work / f"log{number}.jsonl")
        CURRENT["log"] = log
        encoder = LoggedEncoder(spec, probe.dim, probe.image_size, log, args.batch_size)
        location = str(work / f"run{number}.semdb") if backend == "sqlite" else server.create_database()
        db = semdb.connect(location, encoder=encoder, bits=args.bits)
        started, cpu = time.perf_counter(), time.process_time()
        report = db.ingest([work / "images"], batch_size=args.batch_size, ray=actors is not None, actors=actors)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        db.close()
        if report.added != len(paths):
            print(f"warning: {name} added {report.added} of {len(paths)}")
        baseline = baseline or wall
        spent = read_log(log)
        rows.append([name, wall, len(paths) / wall, baseline / wall, cpu])
        encode = spent.get("encode", {"wall": 0.0, "cpu": 0.0})
        batch = spent.get("batch", {"wall": 0.0})
        breakdown.append(
            [
                name,
                encode["wall"],
                encode["cpu"],
                batch["wall"] - encode["wall"] if actors else "",
                spent.get("prepare", {"cpu": ""})["cpu"],
                spent.get("actor-start", {"wall": ""})["wall"],
                wall - (batch["wall"] / (actors or 1) if actors else encode["wall"]),
            ]
        )
        print(f"{name}: {wall:.1f} s, {len(paths) / wall:.1f} images/s", flush=True)
    ray.shutdown()
    print_table(
        f"Ingest of {len(paths)} images, batch {args.batch_size}, one run each (same process, same files)",
        ["run", "wall s", "images/s", "× single→SQLite", "driver CPU s"],
        rows,
    )
    print_table(
        "Where the time goes (seconds, summed over workers; last column: wall minus the per-actor batch time)",
        ["run", "model wall", "model CPU", "DB writes in actors", "read+decode CPU", "actor start-ups", "rest"],
        breakdown,
    )


def part_search(args: argparse.Namespace, server: Any, work: Path) -> None:
    import faiss
    from search_latency import DIM, build_database, spectrum, synthetic

    from semdb.codecs import train_codec

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((100, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    scales = spectrum(DIM, 0.5, rng)
    vectors = synthetic(args.rows, centres, 1.0, scales, rng)
    queries = synthetic(args.queries, centres, 1.5, scales, rng)
    codec = train_codec("pq", vectors[:5000], 128)
    codes = codec.encode(vectors)
    locations = {"SQLite": str(work / "search.semdb"), "PostgreSQL": server.create_database()}
    os.environ["XDG_CACHE_HOME"] = str(work / "cache")
    dbs, load_rows = {}, []
    for name, location in locations.items():
        started = time.perf_counter()
        build_database(location, codes, codec, 5000)  # type: ignore[arg-type]
        inserted = time.perf_counter() - started
        db = semdb.connect(location, create=False)
        started = time.perf_counter()
        db.index()  # built from the store (and its cache written)
        built = time.perf_counter() - started
        again = semdb.connect(location, create=False)
        started = time.perf_counter()
        again.index()  # loaded from the cache
        loaded = time.perf_counter() - started
        again.close()
        dbs[name] = db
        load_rows.append([name, inserted, built * 1e3, loaded * 1e3])
        print(f"{name}: {args.rows:,} rows inserted in {inserted:.1f} s", flush=True)
    timings: dict[str, list[float]] = {name: [] for name in dbs}
    cpu: dict[str, float] = dict.fromkeys(dbs, 0.0)
    for q in queries[:5]:
        for db in dbs.values():
            db.search_vectors(q[None, :], K)
    for number, q in enumerate(queries):
        for name in list(dbs)[:: 1 if number % 2 == 0 else -1]:
            started, thread = time.perf_counter(), time.thread_time()
            dbs[name].search_vectors(q[None, :], K)
            timings[name].append(time.perf_counter() - started)
            cpu[name] += time.thread_time() - thread
    base = percentile_ms(timings["SQLite"], 50)
    print_table(
        f"Database.search_vectors at {args.rows:,} items, k={K}, {args.queries} queries, one thread, interleaved",
        ["store", "p50 ms", "p99 ms", "CPU ms / query", "× SQLite (p50)"],
        [
            [
                name,
                percentile_ms(times, 50),
                percentile_ms(times, 99),
                cpu[name] / len(times) * 1e3,
                percentile_ms(times, 50) / base,
            ]
            for name, times in timings.items()
        ],
    )
    print_table(
        "Building the index", ["store", "insert s (Repository)", "index from store ms", "from cache ms"], load_rows
    )
    for db in dbs.values():
        db.close()


def part_writes(args: argparse.Namespace, server: Any, work: Path) -> None:
    """The time one batch holds the write lock: ``BatchWriter.commit`` of ready embeddings (a trained
    codec codes them), per image, on both stores and two batch sizes — what bounds one database's ingest."""
    from semdb.codecs import load_codec, train_codec
    from semdb.ingest import BatchWriter, CodecChoice, IngestReport
    from semdb.ingest.writer import Prepared
    from semdb.store import Store

    dim, rng = 512, np.random.default_rng(args.seed)
    codec = train_codec("pq", rng.standard_normal((5000, dim)).astype(np.float32), 128)
    rows = []
    for name in ("SQLite", "PostgreSQL"):
        for batch_size in (32, 256):
            location = str(work / f"writes-{batch_size}.semdb") if name == "SQLite" else server.create_database()
            store = Store.open(location, write=True, create=True)
            with store.writing() as repository:
                repository.set_settings({"model": "synthetic", "dim": str(dim), "codec": "pq", "bits_per_image": "128"})
                repository.add_active_codec("pq", 128, dim, codec.to_bytes(), trained_on=5000)
            writer = BatchWriter(
                store,
                CodecChoice("pq", 128),
                train_size=10_000,
                dim=dim,
                train_codec=lambda *_: codec,
                load_codec=lambda row: load_codec(row.name, row.state, bits_per_image=row.bits_per_image),
                report=IngestReport(),
            )
            seconds, cpu, images = 0.0, 0.0, 0
            for number in range(max(2, 4096 // batch_size)):
                batch = [
                    Prepared(f"/photos/{number:05d}/{i:04d}.jpg", 100_000, 1, sha256=f"{number:08x}{i:056x}")
                    for i in range(batch_size)
                ]
                for item in batch:
                    item.original_size = (640, 480)
                vectors = rng.standard_normal((batch_size, dim)).astype(np.float32)
                embeddings = {item.sha256: vector for item, vector in zip(batch, vectors, strict=True) if item.sha256}
                started, thread = time.perf_counter(), time.thread_time()
                writer.commit(batch, embeddings)
                seconds += time.perf_counter() - started
                cpu += time.thread_time() - thread
                images += batch_size
            store.close()
            rows.append([name, batch_size, seconds / images * 1e3, cpu / images * 1e3, images / seconds])
    print_table(
        "BatchWriter.commit of coded batches (the time the write lock is held), per image",
        ["store", "batch", "ms / image", "CPU ms / image", "images/s ceiling of one database"],
        rows,
    )


def part_crash(args: argparse.Namespace, server: Any, work: Path) -> None:
    """Kill a Ray ingest from the command line — the driver and the local cluster it started, the
    whole process group, SIGKILL — once ``--kill-at`` images are committed; run it again; check."""
    import signal
    import subprocess

    from conftest import write_colour_images
    from sqlalchemy import create_engine, text

    from semdb.store.postgres import parse_url

    folder = work / "crash"
    expected = len(write_colour_images(folder, per_colour=args.images // 5, size=48))
    (folder / "bad.png").write_text("not an image\n")
    url = server.create_database()
    engine = create_engine(parse_url(url))

    def count(sql: str) -> int:
        with engine.connect() as connection:
            return int(connection.execute(text(sql)).scalar() or 0)

    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(work / "cache")}
    command = [sys.executable, "-m", "semdb.cli", "ingest", str(folder), "--db", url, "--ray", "--actors", "2"]
    command += ["--model", args.model or BUNDLED_MODEL, "--batch-size", "8", "--bits", "64", "--quiet"]
    started = time.perf_counter()
    driver = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    committed = 0
    while driver.poll() is None and committed < args.kill_at:
        time.sleep(0.3)
        with contextlib.suppress(Exception):  # the schema may not exist yet
            committed = count("SELECT count(*) FROM images")
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    killed_after = time.perf_counter() - started
    before = [count(f"SELECT count(*) FROM {table}") for table in ("images", "codecs", "staged")]
    rerun = subprocess.run(command, env=env, capture_output=True, text=True)
    summary = rerun.stdout.splitlines()[0] if rerun.stdout else rerun.stderr.strip()[-300:]
    after = {
        "indexed": count("SELECT count(*) FROM images WHERE status = 'indexed'"),
        "skipped": count("SELECT count(*) FROM images WHERE status = 'skipped'"),
        "contents": count("SELECT count(*) FROM contents"),
        "codes": count("SELECT count(*) FROM codes"),
        "codecs": count("SELECT count(*) FROM codecs"),
        "staged": count("SELECT count(*) FROM staged"),
        "duplicate paths": count("SELECT count(*) - count(DISTINCT path) FROM images"),
    }
    engine.dispose()
    print(
        f"killed after {killed_after:.1f} s: {before[0]} image records, {before[1]} codecs, {before[2]} staged; "
        f"re-run exit {rerun.returncode}: {summary}"
    )
    ok = after == {**after, "indexed": expected, "skipped": 1, "contents": expected, "codes": expected}
    ok = ok and (after["codecs"], after["staged"], after["duplicate paths"]) == (1, 0, 0)
    print(f"after the re-run: {after} (expected {expected} indexed): {'OK' if ok else 'FAILED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="ingest,writes,search")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--model", default=None, help=f"model spec (default: random ViT-S-32; or {BUNDLED_MODEL})")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bits", type=int, default=128)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-at", type=int, default=100, help="crash part: image records committed before the kill")
    args = parser.parse_args()
    from servers import own_postgres

    print(machine())
    with tempfile.TemporaryDirectory(prefix="semdb-distributed-") as folder, own_postgres() as server:
        for part in args.parts.split(","):
            parts = {"ingest": part_ingest, "search": part_search, "writes": part_writes, "crash": part_crash}
            parts[part](args, server, Path(folder))


if __name__ == "__main__":
    main()
