"""Benchmark (issue 13): ``semdb serve`` end to end, cold ``semdb search``, thumbnails.

* **Cold CLI**: ``semdb search TEXT --db DB -k 10 --json`` as a fresh process, this tree against a
  baseline tree (``--baseline``, e.g. the checkout before issue 13), interleaved run by run; wall
  time and the child's CPU time (user + system, ``RUSAGE_CHILDREN``).
* **Warm server**: the app of ``semdb serve`` under uvicorn in this process (a thread), queried
  over HTTP with keep-alive (httpx): round trip of ``GET /api/search?q=...&limit=30`` to parsed
  JSON, p50/p99, beside the server's own split (text encoder, store filters, FAISS + paths), and
  a filtered query (``under`` one class folder).
* **Thumbnails**: the first request of an image's thumbnail (made from the original) against the
  next (from the disk cache), over distinct images, with a fresh cache folder.
* ``--million``: the same warm queries on a database of 1,000,000 images: the demo database's own
  codec and model, codes of synthetic embeddings near the demo's decoded ones (rows written
  through the store's repository; the files do not exist, which the results say), one folder
  in ten folders, and a folder filter that keeps one of them (10%).

One FAISS thread (semdb's default), one BLAS thread for the text tower (its own default)::

    semdb demo && python benchmarks/serve_latency.py --db semdb-demo/demo.semdb --baseline ../main
    python benchmarks/serve_latency.py --db semdb-demo/demo.semdb --million
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from _bench import machine, percentile_ms, print_table

import semdb
from semdb.server.app import create_app
from semdb.server.thumbnails import ThumbnailCache

QUERIES = [
    "a photo of a sneaker",
    "a pair of trousers",
    "a handbag",
    "an ankle boot",
    "a pair of denim jeans",
    "a knitted sweater",
    "a plain white tee",
    "a leather purse",
    "a suede bootie",
    "a summer dress",
    "a warm coat",
    "beach sandals",
    "a flannel shirt",
    "running shoes",
    "a pullover",
    "a t-shirt with a print",
]


def cold_cli(tree: Path, db: Path, text: str) -> tuple[float, float]:
    """One cold ``semdb search`` from ``tree``: (wall s, child CPU s)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "semdb.cli", "search", text, "--db", str(db), "-k", "10", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tree,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"semdb search from {tree} failed: {result.stderr.strip()[-300:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


class ServerThread:
    """The app under uvicorn in a daemon thread, on a free loopback port."""

    def __init__(self, app: Any) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def warm_queries(client: httpx.Client, count: int, extra: dict[str, str] | None = None) -> dict[str, list[float]]:
    """``count`` searches round-robin over :data:`QUERIES`: round trips and the server's split (s)."""
    timings: dict[str, list[float]] = {"http": [], "encode": [], "filter": [], "search": [], "cpu": []}
    for number in range(count):
        params = {"q": QUERIES[number % len(QUERIES)], "limit": "30", **(extra or {})}
        cpu = time.process_time()
        started = time.perf_counter()
        response = client.get("/api/search", params=params)
        body = response.json()
        timings["http"].append(time.perf_counter() - started)
        timings["cpu"].append(time.process_time() - cpu)  # server and client share this process
        if response.status_code != 200 or not body["results"]:
            raise SystemExit(f"search failed: {response.status_code} {str(body)[:200]}")
        for key in ("encode", "filter", "search"):
            timings[key].append(body["timings"][f"{key}_ms"] / 1e3)
    return timings


def report_warm(title: str, rows: list[tuple[str, dict[str, list[float]]]]) -> None:
    table = []
    for name, timings in rows:
        table.append(
            [
                name,
                percentile_ms(timings["http"], 50),
                percentile_ms(timings["http"], 99),
                percentile_ms(timings["cpu"], 50),
                percentile_ms(timings["encode"], 50),
                percentile_ms(timings["filter"], 50),
                percentile_ms(timings["search"], 50),
            ]
        )
    columns = ["query", "HTTP p50 ms", "HTTP p99 ms", "CPU p50 ms", "encode p50", "filter p50", "search p50"]
    print_table(title, columns, table)


def serve_and_measure(db: semdb.Database, count: int, folder: str, label: str) -> None:
    _ = db.encoder, db.text_encoder
    db.index()
    with tempfile.TemporaryDirectory() as cache:
        server = ServerThread(create_app(db, ThumbnailCache(Path(cache))))
        with server as url, httpx.Client(base_url=url) as client:
            warm_queries(client, 20)  # warm-up: first requests, caches, the index check
            plain = warm_queries(client, count)
            filtered = warm_queries(client, count, {"under": folder})
    report_warm(f"warm text query through the server, {label}", [("text", plain), (f"text, under {folder}", filtered)])
    # The allowed ids of a filter are kept per store state, so only the first query under it reads them.
    print(
        f"first query under {folder}: HTTP {filtered['http'][0] * 1e3:.0f} ms, "
        f"of which reading the allowed ids {filtered['filter'][0] * 1e3:.0f} ms"
    )


def thumbnails(db: semdb.Database, count: int) -> None:
    with tempfile.TemporaryDirectory() as cache:
        server = ServerThread(create_app(db, ThumbnailCache(Path(cache))))
        with server as url, httpx.Client(base_url=url) as client:
            ids = [
                hit["id"] for hit in client.get("/api/search", params={"q": "a shoe", "limit": count}).json()["results"]
            ]
            first, cached = [], []
            for image_id in ids:
                for into in (first, cached):
                    started = time.perf_counter()
                    response = client.get(f"/api/images/{image_id}/thumbnail")
                    into.append(time.perf_counter() - started)
                    expected = "miss" if into is first else "hit"
                    if response.headers.get("x-thumbnail-cache") != expected:
                        raise SystemExit(f"thumbnail {image_id}: expected a cache {expected}")
    rows = [
        [name, percentile_ms(values, 50), percentile_ms(values, 99)]
        for name, values in (("first", first), ("cached", cached))
    ]
    print_table(f"thumbnail request over HTTP, {len(ids)} distinct images", ["request", "p50 ms", "p99 ms"], rows)


def large_thumbnails(count: int) -> None:
    """First and cached thumbnail of ``count`` 4000 x 3000 JPEGs (photo-sized; the demo's are 28 px),
    through :class:`ThumbnailCache` directly: what a request adds to it is measured above."""
    from PIL import Image

    from semdb.images import file_sha256
    from semdb.store.repository import ImageDetails

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        cache = ThumbnailCache(root / "cache")
        first, cached, cpu_first = [], [], []
        for number in range(count):
            small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)  # smooth at full size, like a photo
            path = root / f"photo_{number}.jpg"
            Image.fromarray(small).resize((4000, 3000), Image.Resampling.BILINEAR).save(path, quality=90)
            data = path.read_bytes()
            details = ImageDetails(number, os.fsencode(path), None, 4000, 3000, file_sha256(data))
            cpu, started = time.process_time(), time.perf_counter()
            cache.get(details)
            first.append(time.perf_counter() - started)
            cpu_first.append(time.process_time() - cpu)
            started = time.perf_counter()
            cache.get(details)
            cached.append(time.perf_counter() - started)
    rows = [
        ["first (read, sha256, decode at 1/8 scale, WebP)", percentile_ms(first, 50), percentile_ms(cpu_first, 50)],
        ["cached", percentile_ms(cached, 50), float("nan")],
    ]
    print_table(f"thumbnail of a 4000 x 3000 JPEG, {count} images", ["request", "wall p50 ms", "CPU p50 ms"], rows)


def million(demo: semdb.Database, folder: Path, rows: int) -> Path:
    """A database of ``rows`` synthetic images coded by the demo's codec (see the module docstring)."""
    from semdb.store import STATUS_INDEXED, Store

    if demo.store is None:
        raise SystemExit("the demo database is empty")
    with demo.store.reading() as repository:
        codec_row = repository.active_codec()
        settings = repository.settings()
    if codec_row is None:
        raise SystemExit("the demo database has no trained codec")
    codec = demo._load_codec(codec_row)
    base = demo.index()
    rng = np.random.default_rng(0)
    seeds = np.concatenate([demo.stored_vector(int(i))[None] for i in base.coded[0].ids[:500]])
    path = folder / "million.semdb"
    store = Store.open(path, write=True, create=True)
    chunk = 100_000
    with store.writing() as repository:
        keys = ("model", "dim", "codec", "bits_per_image")
        repository.set_settings({key: settings[key] for key in keys})
        codec_id = repository.add_active_codec(
            codec_row.name, codec_row.bits_per_image, codec_row.dim, codec_row.state, codec_row.trained_on
        )
        for start in range(0, rows, chunk):
            count = min(chunk, rows - start)
            vectors = seeds[rng.integers(0, len(seeds), count)] + 0.05 * rng.standard_normal((count, seeds.shape[1]))
            vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
            codes = codec.encode(vectors)
            hashes = [hashlib.sha256(str(start + i).encode()).hexdigest() for i in range(count)]
            content_ids = repository.add_contents([(sha, 640, 480) for sha in hashes])
            ids = [content_ids[sha] for sha in hashes]
            repository.add_codes(ids, codec_id, codes)
            repository.add_images(
                [
                    {
                        "path": f"/photos/{(start + i) % 10}/img_{start + i:07d}.jpg",
                        "content_id": ids[i],
                        "size": 100_000,
                        "mtime_ns": 0,
                        "status": STATUS_INDEXED,
                        "error": None,
                    }
                    for i in range(count)
                ]
            )
        repository.record_change()
    store.close()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, default=Path("semdb-demo/demo.semdb"), help="the demo database")
    parser.add_argument("--baseline", type=Path, default=None, help="a semdb checkout to compare cold CLI with")
    parser.add_argument("--runs", type=int, default=3, help="cold CLI runs per tree")
    parser.add_argument("--queries", type=int, default=200, help="warm queries per variant")
    parser.add_argument("--thumbnails", type=int, default=40, help="distinct thumbnails")
    parser.add_argument("--million", action="store_true", help="also at 1,000,000 images (~3 min to build)")
    parser.add_argument("--skip-cold", action="store_true")
    args = parser.parse_args()
    if not args.db.is_file():
        raise SystemExit(f"{args.db} does not exist: run `semdb demo` first")
    print(machine())
    this_tree = Path(__file__).resolve().parent.parent

    if not args.skip_cold:
        trees = [("this tree", this_tree)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
        walls: dict[str, list[float]] = {name: [] for name, _ in trees}
        cpus: dict[str, list[float]] = {name: [] for name, _ in trees}
        for run in range(args.runs):
            for name, tree in trees if run % 2 == 0 else trees[::-1]:
                wall, cpu = cold_cli(tree, args.db.resolve(), QUERIES[run % len(QUERIES)])
                walls[name].append(wall)
                cpus[name].append(cpu)
        rows = [
            [name, float(np.median(walls[name])), max(walls[name]), float(np.median(cpus[name]))] for name, _ in trees
        ]
        print_table(
            f"cold `semdb search` ({args.runs} runs each, interleaved)",
            ["tree", "wall s (median)", "wall s (max)", "CPU s (median)"],
            rows,
        )

    demo = semdb.connect(args.db, create=False)
    images = Path(demo.query("a handbag").limit(1).results()[0].path).parent
    serve_and_measure(demo, args.queries, str(images), f"demo database ({demo.stats().images} images)")
    encoder = demo.text_encoder
    alone = []
    for number in range(args.queries):
        started = time.perf_counter()
        encoder.encode_texts([QUERIES[number % len(QUERIES)]])
        alone.append(time.perf_counter() - started)
    print(f"text tower alone, in process: p50 {percentile_ms(alone, 50):.2f} ms, p99 {percentile_ms(alone, 99):.2f} ms")
    thumbnails(demo, args.thumbnails)
    large_thumbnails(10)

    if args.million:
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            path = million(demo, Path(folder), 1_000_000)
            built = time.perf_counter() - started
            big = semdb.connect(path, create=False)
            started = time.perf_counter()
            big.index()
            print(f"1M database written in {built:.0f} s; index built from it in {time.perf_counter() - started:.1f} s")
            # Ten folders /photos/0 ... /photos/9 of 100,000 images each: the filter keeps one.
            serve_and_measure(big, args.queries, "/photos/3", "1,000,000 images (filter: 10% of them)")
            big.close()
    demo.close()


if __name__ == "__main__":
    main()
