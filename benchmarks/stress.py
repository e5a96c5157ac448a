"""Stress and fault-injection harness for semdb: kills, concurrency and bad input.

Three parts, each bounded by a count and by ``--seconds`` (whichever comes first; the report says which):

1. **kill** — a worker subprocess ingests generated folders (duplicates and bad files included, small
   batches, a ``train_size`` crossed mid-run, sometimes ``--prune`` and a VACUUM) and is SIGKILLed at a
   random moment; then the database is checked with sqlite3 (integrity, duplicates, no committed row
   lost, codec consistency) and searched (every sampled image must find itself at rank 1). Every few
   kills a run is let finish and must leave a complete database; then a fresh one is started.
2. **concurrent** — 4 writers ingest 4 different folders into one new database while 4 searchers
   search it; then every image must be searchable at rank 1 with exactly one codec. A ``same-folder``
   variant runs two writers on one folder. With ``--postgres URL`` (or ``--postgres start``: a
   throw-away server started as the tests start it) each round runs on new PostgreSQL databases instead.
4. **cache** — the index cache file is mutated at random (bit flips, truncation, spliced or appended
   bytes) or swapped with another database's, a backup's or a later state's; every search must give
   exactly the answers of a database with no cache, with no exception.
3. **fuzz** — a corpus of adversarial files (truncated, bit-flipped, bombs, FIFOs, symlink loops,
   non-UTF-8 names...) is ingested in a subprocess with a timeout and its peak RSS measured; every file
   must end up indexed or skipped with a reason.

    PYTHONPATH=. python3 benchmarks/stress.py --kills 50 --rounds 3 --fuzz 200 [--json]
    PYTHONPATH=. python3 benchmarks/stress.py --parts concurrent --rounds 5 --postgres start

Exit code 1 if any check failed. The encoder is a deterministic projection of a 4×4 thumbnail, so no
model weights are needed and distinct images get distinct embeddings.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
# This checkout's semdb, in this process as in the workers (semdb itself is imported where it is used).
sys.path.insert(0, str(REPO))
BITS = 128
KINDS = {
    "kill": ["worker-exit", "integrity", "duplicates", "lost-rows", "consistency", "search", "finish"],
    "concurrent": ["writers", "searchers", "integrity", "duplicates", "codec-count", "complete", "search"],
    "same-folder": ["writers", "integrity", "duplicates", "codec-count", "complete", "search"],
    "fuzz": ["completes", "recorded", "expected", "peak-rss"],
    "cache": ["mutation", "swap"],
}


class StressEncoder:
    """A fast deterministic encoder: a fixed random projection of an image's 4×4 RGB thumbnail.

    The generated images are random 4×4 colour grids, so their thumbnails (and embeddings) differ.
    ``delay``: seconds of sleep per batch, standing in for a real model's time (it widens the windows
    in which concurrent writers race, as a CLIP forward pass would).
    """

    spec = "stress-encoder"

    def __init__(self, dim: int = 32, delay: float = 0.0) -> None:
        self.dim = dim
        self.delay = delay
        self.projection = np.random.default_rng(1234).standard_normal((48, dim)).astype(np.float32)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``n`` images → ``(n, dim)`` float32, L2-normalised."""
        time.sleep(self.delay)
        features = np.array(
            [np.asarray(im.convert("RGB").resize((4, 4), Image.Resampling.BOX), np.float32).ravel() for im in images]
        ).reshape(len(images), 48)
        vectors = (features / 255.0 - 0.5) @ self.projection
        return (vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts are not used by the harness; a grey image stands in for any text."""
        return self.encode_images([Image.new("RGB", (4, 4), (128, 128, 128))] * len(texts))


# --- results --------------------------------------------------------------------------------------


@dataclass
class Check:
    """Trials and failures of one check kind, with the first failure's detail."""

    trials: int = 0
    failures: int = 0
    first: str = ""


@dataclass
class Report:
    """Every check kind's tally, each part's stop reason and free-form notes."""

    checks: dict[str, Check] = field(
        default_factory=lambda: {f"{part}/{kind}": Check() for part, kinds in KINDS.items() for kind in kinds}
    )
    parts: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def record(self, kind: str, ok: bool, detail: str = "") -> bool:
        """Count one trial of ``kind``; keep the first failure's detail. Returns ``ok``."""
        check = self.checks[kind]
        check.trials += 1
        if not ok:
            check.failures += 1
            first_line = detail.strip().splitlines()[0][:300] if detail.strip() else "(no detail)"
            check.first = check.first or first_line
        return ok

    @property
    def failed(self) -> bool:
        """Whether any check failed."""
        return any(check.failures for check in self.checks.values())


# --- generated collections ----------------------------------------------------------------------


def sha256_of(path: str | bytes) -> str:
    """Hex sha256 of a file's bytes (semdb's content key)."""
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


@dataclass
class Collection:
    """Generated folders: good image path → sha256, and the bad files' paths."""

    folders: list[str]
    good: dict[str, str]
    bad: list[str]


def random_image(rng: np.random.Generator) -> Image.Image:
    """A random 4×4 colour grid blown up to 16×16 (nearest), so its thumbnail is the grid itself."""
    grid = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((16, 16), Image.Resampling.NEAREST)


def write_collection(root: Path, rng: np.random.Generator, folders: int, per_folder: int, extras: bool) -> Collection:
    """``folders`` folders of ``per_folder`` PNGs; with ``extras``, byte copies under other paths and bad files."""
    good: dict[str, str] = {}
    bad: list[str] = []
    names = []
    for f in range(folders):
        folder = root / f"folder{f}"
        folder.mkdir(parents=True)
        names.append(str(folder.resolve()))
        for i in range(per_folder):
            path = folder / f"img{i:04d}.png"
            random_image(rng).save(path)
            good[str(path.resolve())] = sha256_of(path)
    if extras:
        originals = list(good)
        for n, source in enumerate(rng.choice(originals, size=max(2, len(originals) // 20), replace=False)):
            copy = Path(names[n % folders]) / f"dup{n:03d}.png"  # same bytes, another path (and folder)
            shutil.copyfile(source, copy)
            good[str(copy)] = good[str(source)]
        for n, folder in enumerate(names):
            data = Path(originals[n]).read_bytes()
            (Path(folder) / "truncated.png").write_bytes(data[: len(data) // 2])
            (Path(folder) / "notes.png").write_text("not an image\n")
            bad += [str(Path(folder) / "truncated.png"), str(Path(folder) / "notes.png")]
    return Collection(names, good, bad)


# --- database checks with sqlite3 ---------------------------------------------------------------


@dataclass
class Snapshot:
    """What sqlite3 sees in a database file (no semdb code involved)."""

    integrity: str = "ok"
    paths: dict[str, str] = field(default_factory=dict)  # path → status
    errors: dict[str, str] = field(default_factory=dict)  # path → skip reason ('' when none)
    sha_of_path: dict[str, str] = field(default_factory=dict)  # indexed path → content sha256
    duplicate_paths: int = 0
    duplicate_shas: int = 0
    codecs: int = 0
    orphan_codes: int = 0
    missing_embeddings: int = 0
    staged: int = 0


def text_path(path: str | bytes | memoryview) -> str:
    """A stored path as readable text (undecodable bytes as ``\\xNN``)."""
    if isinstance(path, memoryview):
        path = bytes(path)
    return path.decode("utf-8", "backslashreplace") if isinstance(path, bytes) else path


def snapshot(db: Path | str) -> Snapshot:
    """Read ``db`` with sqlite3 (a file) or SQLAlchemy (a PostgreSQL URL, ``--postgres``): integrity,
    duplicates, codec and embedding consistency, the paths."""
    if isinstance(db, str):
        from sqlalchemy import create_engine, inspect

        from semdb.store.postgres import parse_url

        engine = create_engine(parse_url(db))
        try:
            with engine.connect() as conn:
                # No integrity check on a server: PostgreSQL keeps its own files consistent.
                return read_snapshot(Snapshot(), set(inspect(conn).get_table_names()), conn.exec_driver_sql)
        finally:
            engine.dispose()
    if not db.exists():
        return Snapshot()
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        snap = Snapshot(integrity="; ".join(row[0] for row in conn.execute("PRAGMA integrity_check")))
        return read_snapshot(snap, tables, conn.execute)


def read_snapshot(snap: Snapshot, tables: set[str], execute: Any) -> Snapshot:
    """Fill ``snap`` with the rows ``execute(sql)`` returns (the same SQL on SQLite and PostgreSQL)."""
    one = lambda sql: execute(sql).fetchone()[0]  # noqa: E731
    if "images" not in tables:  # killed before the schema was created
        return snap
    # Paths are stored as bytes (text before schema 0003); the harness compares readable text.
    snap.paths = {text_path(p): s for p, s in execute("SELECT path, status FROM images")}
    snap.errors = {text_path(p): e for p, e in execute("SELECT path, coalesce(error, '') FROM images")}
    snap.sha_of_path = {
        text_path(p): sha
        for p, sha in execute("SELECT i.path, c.sha256 FROM images i JOIN contents c ON c.id = i.content_id")
    }
    snap.duplicate_paths = one("SELECT count(*) - count(DISTINCT path) FROM images")
    snap.duplicate_shas = one("SELECT count(*) - count(DISTINCT sha256) FROM contents")
    snap.codecs = one("SELECT count(*) FROM codecs")
    snap.orphan_codes = one("SELECT count(*) FROM codes WHERE codec_id NOT IN (SELECT id FROM codecs)")
    snap.staged = one("SELECT count(*) FROM staged")
    # An indexed image whose content has neither a code nor a staged embedding cannot be found.
    snap.missing_embeddings = one(
        "SELECT count(*) FROM images WHERE status = 'indexed' AND (content_id IS NULL OR ("
        "content_id NOT IN (SELECT content_id FROM codes) AND content_id NOT IN (SELECT content_id FROM staged)))"
    )
    return snap


def consistency_problems(snap: Snapshot, on_disk: dict[str, str], exact_one_codec: bool) -> list[str]:
    """Codec and content problems of a snapshot (``on_disk``: path → sha of files as they are now)."""
    problems = []
    if snap.codecs > 1 or (exact_one_codec and snap.codecs != 1):
        problems.append(f"{snap.codecs} codec records")
    if snap.orphan_codes:
        problems.append(f"{snap.orphan_codes} codes refer to a missing codec")
    if snap.missing_embeddings:
        problems.append(f"{snap.missing_embeddings} indexed images have neither code nor staged embedding")
    if snap.codecs and snap.staged:
        problems.append(f"codec trained but {snap.staged} embeddings still staged")
    wrong = [p for p, sha in snap.sha_of_path.items() if p in on_disk and on_disk[p] != sha]
    if wrong:
        problems.append(f"{len(wrong)} images linked to another file's content, e.g. {wrong[0]}")
    return problems


def self_search_problems(db: Path, paths: Sequence[str], sha_of: dict[str, str], k: int = 5) -> list[str]:
    """Search each image with its own embedding; it (or a byte-identical copy, or a tie) must rank first."""
    import semdb
    from semdb.errors import NotReadyError

    if not paths:
        return []
    encoder = StressEncoder()
    queries = encoder.encode_images([Image.open(p) for p in paths])
    try:
        with semdb.connect(db, encoder=encoder, create=False) as conn:
            results = conn.search_vectors(queries, k=k)
    except NotReadyError as error:
        return [f"NotReadyError with {len(paths)} indexed images: {error}"]
    except Exception as error:
        return [f"search raised {type(error).__name__}: {error}"]
    problems = []
    for path, hits in zip(paths, results, strict=True):
        own = [hit.score for hit in hits if sha_of.get(hit.path) == sha_of[path]]
        if not hits:
            problems.append(f"{path}: no results")
        elif sha_of.get(hits[0].path) != sha_of[path] and not (own and own[0] >= hits[0].score - 1e-6):
            got = f"own score {own[0]:.4f}" if own else "own image not in top k"
            problems.append(f"{path}: rank 1 is {hits[0].path} ({hits[0].score:.4f}; {got})")
    return [f"{len(problems)}/{len(paths)} not found at rank 1; first: {problems[0]}"] if problems else []


# --- workers (run as subprocesses of this file) ---------------------------------------------------


def child_env() -> dict[str, str]:
    """The environment for workers: this checkout's semdb first on the path, one thread each."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def ingest_cmd(
    db: Path,
    folders: Sequence[str],
    batch: int,
    train: int,
    prune: bool = False,
    vacuum: bool = False,
    delay: float = 0.0,
) -> list[str]:
    """The command line of an ingest worker."""
    flags = ["--prune"] * prune + ["--vacuum"] * vacuum + [f"--delay={delay}"]
    return [
        sys.executable,
        __file__,
        "_ingest-worker",
        str(db),
        *folders,
        f"--batch={batch}",
        f"--train={train}",
        *flags,
    ]


def ingest_worker(argv: Sequence[str]) -> int:
    """Worker: ingest folders with the stress encoder (optionally prune, then VACUUM); print a JSON summary."""
    import resource

    import semdb

    parser = argparse.ArgumentParser(prog="stress.py _ingest-worker")
    parser.add_argument("db")
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train", type=int, default=100)
    parser.add_argument("--prune", action="store_true")
    parser.add_argument("--vacuum", action="store_true")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args(argv)
    with semdb.connect(args.db, encoder=StressEncoder(delay=args.delay), bits=BITS, codec="pq") as db:
        report = db.ingest(args.folders, batch_size=args.batch, train_size=args.train, prune=args.prune)
    if args.vacuum:  # a compaction of the whole file, to be killed in the middle of too
        with contextlib.closing(sqlite3.connect(args.db, timeout=60)) as conn:
            conn.execute("VACUUM")
    summary = report.to_dict()
    summary["skipped"] = len(report.skipped)
    summary["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(summary))
    return 0


def search_worker(argv: Sequence[str]) -> int:
    """Worker: search the database in a loop until the stop file appears; print counts as JSON.

    ``NotReadyError`` (nothing searchable yet) is an expected answer; any other exception is an error.
    A hit list holding the query's own content below rank 1 (not a tie) is counted as misranked.
    """
    import semdb
    from semdb.errors import NotReadyError

    db_path, stop, folders = argv[0], Path(argv[1]), argv[2:]
    paths = sorted(str(p) for folder in folders for p in Path(folder).glob("*.png"))
    sha_of = {p: sha256_of(p) for p in paths}
    encoder = StressEncoder()
    queries = encoder.encode_images([Image.open(p) for p in paths])
    counts = {"searches": 0, "not_ready": 0, "errors": 0, "misranked": 0, "first_error": "", "first_misranked": ""}
    rng = random.Random(os.getpid())
    db = None
    deadline = time.monotonic() + 600
    while not stop.exists() and time.monotonic() < deadline:
        i = rng.randrange(len(paths))
        try:
            # Reconnect until the database exists: a writer may create it after this searcher started.
            db = db if db is not None and db.store is not None else semdb.connect(db_path, encoder=encoder)
            hits = db.search_vectors(queries[i : i + 1], k=5)[0]
            counts["searches"] += 1
            own = [h.score for h in hits if sha_of.get(h.path) == sha_of[paths[i]]]
            if own and hits and sha_of.get(hits[0].path) != sha_of[paths[i]] and own[0] < hits[0].score - 1e-6:
                counts["misranked"] += 1
                counts["first_misranked"] = counts["first_misranked"] or f"{paths[i]} → {hits[0].path}"
        except NotReadyError:
            counts["not_ready"] += 1
        except Exception as error:
            counts["errors"] += 1
            counts["first_error"] = counts["first_error"] or f"{type(error).__name__}: {error}"[:300]
            time.sleep(0.05)
    print(json.dumps(counts))
    return 0


def spawn(cmd: list[str]) -> subprocess.Popen[str]:
    """Start a worker with the child environment, its stdout and stderr captured as text."""
    return subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def first_traceback_line(stderr: str) -> str:
    """The exception line of a traceback on ``stderr`` (``Name: message``), or ``""`` when none."""
    if "Traceback" not in stderr:
        return ""
    # The last "module.Error: message" line at column 0 (SQLAlchemy adds [SQL: ...] lines after it).
    lines = [line for line in stderr.splitlines() if re.match(r"[A-Za-z_][\w.]*: ", line)]
    return lines[-1] if lines else "Traceback (no exception line)"


# --- part 1: SIGKILL loop -------------------------------------------------------------------------


def part_kill(report: Report, args: argparse.Namespace, work: Path, rng: random.Random) -> None:
    """Kill ingest workers at random moments and check what they leave behind; see the module docstring."""
    started, kills, cycle, fresh_db = time.monotonic(), 0, 0, 0
    batch, per_folder, folders = 4, 160, 4
    train = int(folders * per_folder * 0.4)  # crossed at ~40 % of a fresh run: kills land in training too
    # Measured on the first database (let finish, then re-run with nothing to do): a run's start-up
    # (imports, schema, finding the files) and the time of a fresh ingest after it.
    startup_s, ingest_s = 1.5, 1.0
    since_finish, db, coll, committed, removed = 4, work / "none", None, set[str](), set[str]()
    landed: dict[str, int] = {}  # where the kills landed, judged by what they left behind
    while True:
        out_of_time = time.monotonic() - started > args.seconds
        finish = since_finish >= 4 or kills >= args.kills or out_of_time
        if coll is None:  # a fresh database over fresh folders
            fresh_db += 1
            root = work / f"kill{fresh_db}"
            coll = write_collection(root, np.random.default_rng(rng.randrange(2**32)), folders, per_folder, True)
            db, committed, removed = root / "db.semdb", set(), set()
        if cycle and rng.random() < 0.2:  # files disappear between runs, for --prune to forget
            for path in rng.sample(sorted(set(coll.good) - removed), 2):
                os.unlink(path)
                removed.add(path)
        prune, vacuum = rng.random() < 0.3, rng.random() < 0.2
        on_disk = {p: sha for p, sha in coll.good.items() if p not in removed}
        untrained = not snapshot(db).codecs
        done = len(committed & set(coll.good)) / len(coll.good)  # a resumed run only does the rest
        t0 = time.monotonic()
        proc = spawn(ingest_cmd(db, coll.folders, batch, train, prune, vacuum))
        if finish:
            _, stderr = proc.communicate(timeout=300)
            if fresh_db == 1 and not committed:
                t1 = time.monotonic()
                rerun = subprocess.run(ingest_cmd(db, coll.folders, batch, train), env=child_env(), capture_output=True)
                startup_s = time.monotonic() - t1
                ingest_s = max(0.2, t1 - t0 - startup_s)
                report.record("kill/worker-exit", rerun.returncode == 0, f"no-op re-run: rc {rerun.returncode}")
        else:
            # Uniform over the expected duration, with extra weight on very early and on training.
            roll = rng.random()
            if roll < 0.15:  # during start-up, schema creation and the first batches
                at = rng.uniform(0, startup_s * 1.1)
            elif roll < 0.4 and untrained:  # around the batch that crosses train_size
                at = startup_s + ingest_s * max(0.0, train / len(coll.good) - done) * rng.uniform(0.8, 1.3)
            else:  # the rest of the run, prune, VACUUM and exit included
                at = rng.uniform(startup_s * 0.8, startup_s + ingest_s * (1.1 - done))
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=at)
            proc.send_signal(signal.SIGKILL)
            _, stderr = proc.communicate(timeout=60)
            kills += 1
        cycle += 1
        since_finish = 0 if finish else since_finish + 1
        tb = first_traceback_line(stderr)
        ok_rc = proc.returncode == 0 or (not finish and proc.returncode == -signal.SIGKILL)
        report.record("kill/worker-exit", ok_rc and not tb, f"cycle {cycle}: rc {proc.returncode}: {tb or stderr}")
        snap = snapshot(db)
        if not finish:  # where the kill landed, judged by what it left behind
            phase = (
                "after the run ended"
                if proc.returncode == 0
                else "before the run's first commit"
                if set(snap.paths) <= committed
                else "while staging"
                if not snap.codecs
                else "after training in this run"
                if untrained
                else "with a trained codec"
            )
            landed[phase] = landed.get(phase, 0) + 1
        report.record("kill/integrity", snap.integrity == "ok", f"cycle {cycle}: {snap.integrity}")
        report.record(
            "kill/duplicates",
            not snap.duplicate_paths and not snap.duplicate_shas,
            f"cycle {cycle}: {snap.duplicate_paths} duplicate paths, {snap.duplicate_shas} duplicate sha256",
        )
        lost = committed - set(snap.paths) - (removed if prune else set())
        report.record(
            "kill/lost-rows", not lost, f"cycle {cycle}: {len(lost)} committed paths lost, e.g. {min(lost, default='')}"
        )
        committed = set(snap.paths)
        problems = consistency_problems(snap, on_disk, exact_one_codec=finish)
        report.record("kill/consistency", not problems, f"cycle {cycle}: {'; '.join(problems)}")
        indexed = sorted(p for p in snap.sha_of_path if p in on_disk and snap.paths[p] == "indexed")
        if finish:
            missing = sorted(set(on_disk) - set(indexed))
            bad_indexed = [p for p in coll.bad if snap.paths.get(p) != "skipped"]
            report.record(
                "kill/finish",
                not missing and not bad_indexed and proc.returncode == 0,
                f"cycle {cycle}: rc {proc.returncode}; {len(missing)} good files not indexed (e.g. "
                f"{missing[:1]}), {len(bad_indexed)} bad files not recorded as skipped",
            )
        sample = indexed if finish else rng.sample(indexed, min(20, len(indexed)))
        if sample:
            found = self_search_problems(db, sample, coll.good)  # removed files keep their sha here
            report.record("kill/search", not found, f"cycle {cycle}: {'; '.join(found)}")
        if finish:
            coll = None  # start over on a fresh database
            if kills >= args.kills or out_of_time:
                why = "time limit" if out_of_time else "count"
                where = ", ".join(f"{n} {phase}" for phase, n in sorted(landed.items()))
                report.parts["kill"] = (
                    f"{kills} kills ({where}), {cycle} runs, {fresh_db} databases; stopped at {why}; "
                    f"run start-up {startup_s:.1f} s, fresh ingest {ingest_s:.1f} s"
                )
                return


# --- part 2: concurrent writers and readers -------------------------------------------------------


def run_writers(
    report: Report, kind: str, db: Path | str, folder_sets: list[list[str]], searchers: int, timeout: float, stop: Path
) -> None:
    """Start one writer per folder set (and ``searchers`` searchers, stopped by creating ``stop``) at
    once; record how they ended. ``db``: a file, or a PostgreSQL URL."""
    all_folders = sorted({f for folders in folder_sets for f in folders})
    writers = [spawn(ingest_cmd(db, fs, 8, 64, delay=0.02)) for fs in folder_sets]
    readers = [
        spawn([sys.executable, __file__, "_search-worker", str(db), str(stop), *all_folders]) for _ in range(searchers)
    ]
    deadline = time.monotonic() + timeout
    try:
        for n, writer in enumerate(writers):
            try:
                _, stderr = writer.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                writer.kill()
                _, stderr = writer.communicate()
                stderr = f"hung: killed after {timeout:.0f} s\n{stderr}"
            tb = first_traceback_line(stderr)
            report.record(
                f"{kind}/writers",
                writer.returncode == 0 and not tb,
                f"writer {n}: rc {writer.returncode}: {tb or stderr}",
            )
        stop.touch()
        for reader in readers:
            try:
                stdout, stderr = reader.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                reader.kill()
                stdout, stderr = reader.communicate()
            counts = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {}
            tb = first_traceback_line(stderr)
            detail = (
                tb
                or counts.get("first_error")
                or (f"misranked during ingest: {counts.get('first_misranked')}" if counts.get("misranked") else stderr)
            )
            ok = reader.returncode == 0 and not tb and counts.get("errors") == 0 and counts.get("misranked") == 0
            report.record(
                f"{kind}/searchers", ok, f"{counts.get('errors')} errors in {counts.get('searches')} searches: {detail}"
            )
    finally:
        for proc in writers + readers:
            if proc.poll() is None:
                proc.kill()


def check_after_writers(report: Report, kind: str, db: Path, coll: Collection) -> None:
    """After concurrent ingests: integrity, no duplicates, one codec, every image indexed and found by itself."""
    snap = snapshot(db)
    report.record(f"{kind}/integrity", snap.integrity == "ok", snap.integrity)
    report.record(
        f"{kind}/duplicates",
        not snap.duplicate_paths and not snap.duplicate_shas,
        f"{snap.duplicate_paths} duplicate paths, {snap.duplicate_shas} duplicate sha256",
    )
    problems = consistency_problems(snap, coll.good, exact_one_codec=True)
    report.record(f"{kind}/codec-count", not problems, "; ".join(problems))
    missing = sorted(p for p in coll.good if snap.paths.get(p) != "indexed")
    report.record(
        f"{kind}/complete", not missing, f"{len(missing)}/{len(coll.good)} images not indexed, e.g. {missing[:1]}"
    )
    found = self_search_problems(db, sorted(coll.good), coll.good)
    report.record(f"{kind}/search", not found, "; ".join(found))


def new_server_database(server: str) -> str:
    """A new, empty database on the PostgreSQL server at URL ``server``; returns its URL."""
    import psycopg

    from semdb.store.postgres import parse_url

    name = f"stress_{os.getpid()}_{random.randrange(16**8):08x}"
    url = parse_url(f"{server.rstrip('/')}/postgres")
    options = {"host": url.host, "port": url.port, "user": url.username, "password": url.password, "dbname": "postgres"}
    with psycopg.connect(**options, autocommit=True) as connection:  # type: ignore[arg-type]
        connection.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    return f"{server.rstrip('/')}/{name}"


def part_concurrent(report: Report, args: argparse.Namespace, work: Path, rng: random.Random) -> None:
    """R rounds, each on fresh databases: 4 writers on 4 folders + searchers, then 2 writers on one folder.

    With ``--postgres``, the databases are new ones on that PostgreSQL server instead of files.
    """
    started, rounds = time.monotonic(), 0
    server = args.postgres_url
    while rounds < args.rounds and time.monotonic() - started < args.seconds:
        rounds += 1
        root = work / f"conc{rounds}"
        coll = write_collection(root, np.random.default_rng(rng.randrange(2**32)), args.writers, 48, False)
        limit = max(30.0, args.seconds - (time.monotonic() - started))
        db, same_db = (
            (new_server_database(server), new_server_database(server))
            if server
            else (root / "db.semdb", root / "same.semdb")
        )
        folders = [[f] for f in coll.folders]
        run_writers(report, "concurrent", db, folders, args.searchers, limit, root / "concurrent.stop")
        check_after_writers(report, "concurrent", db, coll)
        same = write_collection(root / "same", np.random.default_rng(rng.randrange(2**32)), 1, 120, False)
        run_writers(report, "same-folder", same_db, [same.folders, same.folders], 0, limit, root / "same.stop")
        check_after_writers(report, "same-folder", same_db, same)
    why = "count" if rounds >= args.rounds else "time limit"
    where = "PostgreSQL" if server else "SQLite"
    report.parts["concurrent"] = (
        f"{rounds} rounds on {where} ({args.writers} writers, {args.searchers} searchers); stopped at {why}"
    )


# --- part 3: bad-input fuzz -----------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with its CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def zero_png(width: int, height: int, rows: int | None = None) -> bytes:
    """A greyscale PNG of zeros (``rows`` rows of data; all by default): tiny on disk, huge when decoded."""
    squeeze, idat = zlib.compressobj(9), []
    row = b"\x00" * (width + 1)
    for _ in range(height if rows is None else rows):
        idat.append(squeeze.compress(row))
    idat.append(squeeze.flush())
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", b"".join(idat)) + png_chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    """``image`` saved to bytes in ``fmt``."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def make_fuzz_corpus(folder: Path, n: int, rng: np.random.Generator, deadline: float) -> list[tuple[bytes, str]]:
    """Write ≥ ``n`` adversarial entries to ``folder``; returns (path as bytes, expectation).

    Expectation: ``indexed`` (valid, if odd, images), ``skipped`` (must be refused with a reason),
    ``either`` (damaged files that may still decode) or ``none`` (a folder: nothing to record).
    """
    root = os.fsencode(folder)
    entries: list[tuple[bytes, str]] = []

    def put(name: str | bytes, data: bytes, expect: str) -> None:
        path = os.path.join(root, os.fsencode(name))
        with open(path, "wb") as handle:
            handle.write(data)
        entries.append((path, expect))

    pic = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
    bases = {
        "png": encoded(pic, "PNG"),
        "jpg": encoded(pic, "JPEG"),
        "gif": encoded(pic, "GIF"),
        "webp": encoded(pic, "WEBP"),
    }
    for i in range(8):  # controls: ordinary images that must be indexed
        put(f"good{i}.png", encoded(random_image(rng), "PNG"), "indexed")
    put("one_by_one.png", encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "indexed")
    put("tall_1x1000.png", encoded(Image.new("RGB", (1, 1000), (50, 9, 9)), "PNG"), "indexed")
    put("wide_100x1.png", encoded(Image.new("RGB", (100, 1), (9, 50, 9)), "PNG"), "indexed")
    put(
        "sixteen_bit.png", encoded(Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)), "PNG"), "indexed"
    )
    put("cmyk.jpg", encoded(Image.new("CMYK", (20, 20), (10, 200, 30, 5)), "JPEG"), "indexed")
    put("palette_alpha.png", encoded(pic.convert("P"), "PNG", transparency=0), "indexed")
    put("rgba.png", encoded(pic.convert("RGBA"), "PNG"), "indexed")
    frames = [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(4)]
    put(
        "animated.gif",
        encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0),
        "indexed",
    )
    put("pic.webp", bases["webp"], "indexed")
    put("L" * 250 + ".png", bases["png"], "indexed")  # 254 bytes, just under NAME_MAX
    put("é" * 125 + ".png", bases["png"], "indexed")  # 254 bytes of UTF-8
    put("large_7000x7000.png", zero_png(7000, 7000), "indexed")  # 49 M pixels: under the limit, decoded
    put("bomb_100000x100000.png", zero_png(100_000, 100_000, rows=2), "skipped")  # header claims 10^10 pixels
    put("bomb_9000x9000.png", zero_png(9000, 9000), "skipped")  # a real one: 81 M pixels of zeros
    gif_bomb = (
        b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0) + b"," + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0)
    )
    put("bomb.gif", gif_bomb + b"\x02\x02\x44\x01\x00;", "skipped")
    put("empty.png", b"", "skipped")
    put("empty.jpg", b"", "skipped")
    put("text.png", b"hello, I am a text file\n" * 20, "skipped")
    put(b"non_utf8_\xff\xfe.png", bases["png"], "skipped")
    put(b"latin1_caf\xe9.jpg", bases["jpg"], "skipped")
    put("unreadable.png", bases["png"], "either")
    os.chmod(os.path.join(root, b"unreadable.png"), 0)
    os.mkfifo(os.path.join(root, b"x.jpg"))
    entries.append((os.path.join(root, b"x.jpg"), "skipped"))
    os.mkdir(os.path.join(root, b"y.jpg"))
    entries.append((os.path.join(root, b"y.jpg"), "none"))
    put(os.path.join(b"y.jpg", b"inside.png"), encoded(random_image(rng), "PNG"), "indexed")
    os.symlink(os.path.join(root, b"nowhere.png"), os.path.join(root, b"broken.jpg"))
    os.symlink(os.path.join(root, b"loop_b.jpg"), os.path.join(root, b"loop_a.jpg"))
    os.symlink(os.path.join(root, b"loop_a.jpg"), os.path.join(root, b"loop_b.jpg"))
    entries += [(os.path.join(root, name), "skipped") for name in (b"broken.jpg", b"loop_a.jpg", b"loop_b.jpg")]
    i = 0
    while len(entries) < n and time.monotonic() < deadline:  # random damage to fill the corpus
        fmt = list(bases)[i % 4]
        data = bytearray(bases[fmt])
        how = ["truncated", "bitflip", "random", "header"][(i // 4) % 4]
        if how == "truncated":
            data = data[: int(rng.integers(0, len(data)))]
        elif how == "bitflip":
            for bit in rng.integers(0, len(data) * 8, size=int(rng.integers(1, 9))):
                data[bit // 8] ^= 1 << (bit % 8)
        elif how == "random":
            data = bytearray(rng.bytes(int(rng.integers(1, 4096))))
        else:
            data = data[: int(rng.integers(1, 40))]
        put(
            f"{how}{i:04d}.{fmt if how != 'random' else 'jpg'}", bytes(data), "skipped" if how == "header" else "either"
        )
        i += 1
    return entries


def display(path: bytes) -> str:
    """A path as semdb records it: UTF-8, undecodable bytes as ``\\xNN`` escapes."""
    return path.decode("utf-8", errors="backslashreplace")


def part_fuzz(report: Report, args: argparse.Namespace, work: Path, rng: random.Random) -> None:
    """Ingest the adversarial corpus in a subprocess with a timeout and peak RSS; check every file's fate."""
    started = time.monotonic()
    folder = work / "fuzz"
    folder.mkdir()
    entries = make_fuzz_corpus(
        folder, args.fuzz, np.random.default_rng(rng.randrange(2**32)), started + args.seconds / 2
    )
    db = work / "fuzz.semdb"
    timeout = max(20.0, args.seconds - (time.monotonic() - started))
    proc = spawn(ingest_cmd(db, [str(folder)], 16, 10_000))
    peak, hung, deadline = 0, False, time.monotonic() + timeout
    with contextlib.suppress(psutil.Error):
        watched = psutil.Process(proc.pid)
        while proc.poll() is None and time.monotonic() < deadline:
            peak = max(peak, watched.memory_info().rss)
            time.sleep(0.02)
    if proc.poll() is None:
        hung = True
        proc.kill()
    stdout, stderr = proc.communicate()
    summary = json.loads(stdout.strip().splitlines()[-1]) if proc.returncode == 0 and stdout.strip() else {}
    peak_mib = max(peak / 2**20, summary.get("maxrss_kib", 0) / 1024)
    tb = first_traceback_line(stderr)
    detail = f"hung: killed after {timeout:.0f} s" if hung else f"rc {proc.returncode}: {tb or stderr}"
    report.record("fuzz/completes", proc.returncode == 0 and not tb, detail)
    report.record(
        "fuzz/peak-rss", peak_mib <= args.rss_limit_mb, f"peak RSS {peak_mib:.0f} MiB > {args.rss_limit_mb} MiB"
    )
    snap = snapshot(db)
    reasons = snap.errors
    for path, expect in entries:
        if expect == "none":
            continue
        key = display(os.path.abspath(path))
        status = snap.paths.get(key)
        reason = reasons.get(key, "").strip()
        fine = (status == "indexed" and key in snap.sha_of_path) or (status == "skipped" and bool(reason))
        report.record("fuzz/recorded", bool(fine), f"{key}: status {status!r}, reason {reasons.get(key)!r}")
        if expect != "either":
            report.record(
                "fuzz/expected", status == expect, f"{key}: expected {expect}, got {status!r} ({reasons.get(key)!r})"
            )
    unreadable = display(os.path.join(os.fsencode(folder), b"unreadable.png"))
    report.notes.append(f"fuzz: unreadable.png (chmod 000, uid {os.getuid()}) ended {snap.paths.get(unreadable)!r}")
    report.notes.append(f"fuzz: {len(entries)} entries, peak RSS of the ingest {peak_mib:.0f} MiB, summary {summary}")
    why = "count" if len(entries) >= args.fuzz else "time limit"
    report.parts["fuzz"] = f"{len(entries)} files; stopped at {why}; peak RSS {peak_mib:.0f} MiB"


# --- the report -----------------------------------------------------------------------------------


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random damage of a file's bytes."""
    how = rng.choice(["flip", "truncate", "splice", "append", "zero"])
    out = bytearray(data)
    if how == "flip":
        for _ in range(rng.randint(1, 16)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif how == "truncate":
        del out[rng.randrange(len(out)) :]
    elif how == "splice":
        start = rng.randrange(len(out))
        out[start : start + rng.randint(1, 64)] = os.urandom(rng.randint(1, 64))
    elif how == "append":
        out += os.urandom(rng.randint(1, 4096))
    else:
        start = rng.randrange(len(out))
        out[start : start + rng.randint(1, 4096)] = bytes(min(4096, len(out) - start))
    return bytes(out)


def part_cache(report: Report, args: argparse.Namespace, work: Path, rng: random.Random) -> None:
    """Damaged and foreign index caches: searches must answer as if there were no cache."""
    import semdb
    from semdb.index import cache_path

    deadline = time.monotonic() + args.seconds
    nprng = np.random.default_rng(rng.randrange(2**32))
    root = work / "cache"
    collections = {name: write_collection(root / name, nprng, 2, 60, extras=False) for name in ("a", "b", "later")}
    encoder = StressEncoder()
    queries = encoder.encode_images([random_image(nprng) for _ in range(8)])
    first, second, backup = root / "first.semdb", root / "second.semdb", root / "backup.semdb"

    def answer(db: Path) -> list[list[tuple[str, float]]]:
        with semdb.connect(db, encoder=encoder, create=False) as conn:
            return [[(hit.path, hit.score) for hit in hits] for hits in conn.search_vectors(queries, k=10)]

    def truth(db: Path) -> list[list[tuple[str, float]]]:
        cache_path(db).unlink(missing_ok=True)
        return answer(db)  # also writes the cache of db's current state

    for db, name in ((first, "a"), (second, "b")):
        with semdb.connect(db, encoder=encoder, bits=BITS, codec="pq") as conn:
            conn.ingest(collections[name].folders, batch_size=16, train_size=40)
    shutil.copy(first, backup)
    caches = {"backup": (truth(backup), cache_path(backup).read_bytes())}
    with semdb.connect(first, encoder=encoder) as conn:
        conn.ingest(collections["later"].folders, batch_size=16)
    caches["later"] = (truth(first), cache_path(first).read_bytes())
    caches["second"] = (truth(second), cache_path(second).read_bytes())
    targets = {"backup": backup, "later": first, "second": second}
    trials = 0
    while trials < args.cache_trials and time.monotonic() < deadline:
        trials += 1
        # A mutated copy of one database's own cache.
        name = rng.choice(list(targets))
        expected, good = caches[name]
        cache_path(targets[name]).write_bytes(mutate(good, rng))
        try:
            got = answer(targets[name])
            report.record("cache/mutation", got == expected, f"{name}: answers differ from the uncached ones")
        except Exception as error:
            report.record("cache/mutation", False, f"{name}: {type(error).__name__}: {error}")
        # Another database's, a backup's or a later state's cache in place of the right one.
        owner, other = rng.sample(list(targets), 2)
        cache_path(targets[owner]).write_bytes(caches[other][1])
        try:
            got = answer(targets[owner])
            report.record("cache/swap", got == caches[owner][0], f"{other}'s cache used for {owner}")
        except Exception as error:
            report.record("cache/swap", False, f"{other} on {owner}: {type(error).__name__}: {error}")
    why = "count" if trials >= args.cache_trials else "time limit"
    report.parts["cache"] = f"{trials} rounds of one mutation and one swap; stopped at {why}"


def print_report(report: Report, as_json: bool) -> None:
    """A table of trials and failures by kind (or JSON), the parts' stop reasons, then the notes."""
    if as_json:
        checks = {kind: vars(check) for kind, check in report.checks.items()}
        print(
            json.dumps(
                {"ok": not report.failed, "checks": checks, "parts": report.parts, "notes": report.notes}, indent=2
            )
        )
        return
    print(f"{'kind':<24} {'trials':>7} {'fails':>6}  first failure")
    for kind, check in report.checks.items():
        print(f"{kind:<24} {check.trials:>7} {check.failures:>6}  {check.first}")
    for part, text in report.parts.items():
        print(f"[{part}] {text}")
    for note in report.notes:
        print(f"note: {note}")
    print("FAILED" if report.failed else "OK")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the parts and print the report; 1 if any check failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_ingest-worker"]:
        return ingest_worker(argv[1:])
    if argv[:1] == ["_search-worker"]:
        return search_worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--kills", type=int, default=50, help="SIGKILL cycles (part 1)")
    parser.add_argument("--rounds", type=int, default=20, help="concurrency rounds (part 2)")
    parser.add_argument("--fuzz", type=int, default=200, help="adversarial files (part 3)")
    parser.add_argument("--cache-trials", type=int, default=100, help="cache mutations and swaps (part 4)")
    parser.add_argument("--seconds", type=float, default=300, help="time limit of each part")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--searchers", type=int, default=4)
    parser.add_argument("--rss-limit-mb", type=int, default=1536, help="peak RSS allowed for the fuzz ingest")
    parser.add_argument("--parts", default="kill,concurrent,fuzz,cache", help="comma-separated subset to run")
    parser.add_argument(
        "--postgres",
        default=None,
        metavar="URL|start",
        help="run the concurrent part on new databases of this PostgreSQL server (URL without a database), "
        "or 'start' a throw-away one as the tests do",
    )
    parser.add_argument("--keep", action="store_true", help="keep the working folder (its path is printed)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="semdb-stress-"))
    report = Report()
    parts = {"kill": part_kill, "concurrent": part_concurrent, "fuzz": part_fuzz, "cache": part_cache}
    servers = contextlib.ExitStack()
    args.postgres_url = args.postgres
    if args.postgres == "start":
        sys.path.insert(0, str(REPO / "tests"))
        from servers import own_postgres

        args.postgres_url = servers.enter_context(own_postgres()).base_url
    try:
        for name in args.parts.split(","):
            parts[name](report, args, work, rng)
    finally:
        servers.close()
        if args.keep:
            report.notes.append(f"working folder kept: {work}")
        else:
            with contextlib.suppress(OSError):
                os.chmod(work / "fuzz" / "unreadable.png", 0o600)
            shutil.rmtree(work, ignore_errors=True)
    print_report(report, args.json)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
