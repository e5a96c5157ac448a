"""The change log (revision 0005) and the index that catches up from it (issue 10).

Every test compares the caught-up index with one built from the store alone: same image ids, same
codes, same answers. A spy on the full read tells which path was taken.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import semdb
from semdb.index import SearchIndex, build, cache_path
from semdb.store import repository as repository_module


def clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, 32)).astype(np.float32)
    x = centres[rng.integers(0, 12, n)] + 0.4 * rng.standard_normal((n, 32)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def small_thresholds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Fast scan and inverted lists at a few thousand rows; returns a list that counts full reads."""
    monkeypatch.setattr(build, "FAST_SCAN_MIN_ITEMS", 500)
    monkeypatch.setattr(build, "LISTS_MIN_ITEMS", 1000)
    reads: list[int] = []
    read_group = build._read_group

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        reads.append(1)
        return read_group(*args, **kwargs)

    monkeypatch.setattr(build, "_read_group", counted)
    return reads


def contents(index: SearchIndex) -> dict[int, tuple[list[int], bytes]]:
    """codec id → (image ids, code bytes in id order): what an index holds, to compare two."""
    held = {}
    for group in index.coded:
        codes, _ = group.arrays()
        held[group.codec_id] = (group.ids.tolist(), codes.tobytes())
        if group.fast is not None:
            assert group.fast.ids_by_row().tolist() == group.ids.tolist()
    return held


def rebuilt(path: Path) -> SearchIndex:
    """The index of ``path`` built from the store alone (its cache moved away, then back)."""
    cache = cache_path(path)
    kept = cache.with_name(cache.name + ".kept")
    if cache.exists():
        cache.rename(kept)
    with semdb.connect(path) as db:
        index = db.index()
    cache.unlink(missing_ok=True)
    if kept.exists():
        kept.rename(cache)
    return index


def assert_same(index: SearchIndex, truth: SearchIndex, queries: np.ndarray) -> None:
    assert contents(index) == contents(truth)
    for exact in (True, False):
        got = index.search(queries, 10, exact=exact, rerank=10_000, nprobe=1_000)
        want = truth.search(queries, 10, exact=exact, rerank=10_000, nprobe=1_000)
        np.testing.assert_array_equal(got[1], want[1])


def remove(db: semdb.Database, image_ids: list[int]) -> None:
    """Forget images as a prune does (records, orphaned contents and codes, a new state)."""
    assert db.store is not None
    with db.store.writing() as repository:
        repository.delete_images(image_ids)
        repository.delete_orphans()
        repository.record_change()


def seeded(tmp_path: Path, name: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, Path, list[str]]:
    """A database of the first 2,000 of ``n`` clustered embeddings (its codec trained on 1,000):
    ``(embeddings (n, 32), queries (6, 32), its path, the n image paths)``."""
    x = clustered(n, seed)
    path = tmp_path / f"{name}.semdb"
    paths = [f"/nowhere/{i}.png" for i in range(n)]
    with semdb.connect(path, codec="pcapq", bits=64, model="hf-hub:none/none") as db:
        db.add_embeddings(paths[:2000], x[:2000], train_size=1000)
    return x, clustered(6, seed + 1), path, paths


def test_every_change_is_logged_and_the_open_index_catches_up_from_the_log(
    tmp_path: Path, small_thresholds: list[int]
) -> None:
    x, queries, path, paths = seeded(tmp_path, "log", 2600, 1)
    with semdb.connect(path) as db:
        db.index()
        assert db.store is not None
        with db.store.reading() as repository:
            start = repository.last_change()
        reads_before = len(small_thresholds)
        steps = [
            lambda: db.add_embeddings(paths[2000:2300], x[2000:2300]),  # new images
            lambda: remove(db, list(range(5, 400, 7))),  # pruned
            lambda: db.add_embeddings(paths[2300:2310], x[2300:2310]),  # a few more
            lambda: db.add_embeddings(paths[10:20], x[2500:2510]),  # same paths, new content
            lambda: db.add_embeddings(paths[2400:2402], x[:2]),  # a second path for a known content
        ]
        for step in steps:
            step()
            index = db.index()
            assert index.changes_seq > start
            # One copy of the codes: the fast scan's; the exact scan is built when an exact search asks.
            assert index.coded[0].fast is not None and index.coded[0].index is None
            assert_same(index, rebuilt(path), queries)
        assert len(small_thresholds) == reads_before + len(steps)  # rebuilt() reads; the open index never did
        with db.store.reading() as repository:
            changes = repository.changes_after(start, at_most=10**6)
        assert changes is not None
        image_ids, content_ids = changes
        logged = set(image_ids.tolist())
        assert set(range(5, 400, 7)) <= logged  # the removed records
        assert {11, 14, 20} <= logged  # records whose content changed (paths[10], [13], [19]; ids start at 1)
        assert not logged & set(range(400, 2001))  # untouched records are not logged
        assert len(content_ids) >= 300 + 10 + 10  # the codes added, and those removed with their contents


def test_a_reopen_catches_up_from_an_earlier_cache(tmp_path: Path, small_thresholds: list[int]) -> None:
    x, queries, path, paths = seeded(tmp_path, "reopen", 2300, 3)
    with semdb.connect(path) as db:
        written = db.index()  # built from the store: the cache file is written
    with semdb.connect(path) as db:
        db.add_embeddings(paths[2000:], x[2000:])
        remove(db, [3, 30, 300])
    reads = len(small_thresholds)
    with semdb.connect(path) as db:
        index = db.index()
    assert len(small_thresholds) == reads  # the cache, then the log: no full read
    assert index.cache_seq == written.changes_seq  # the file was not rewritten for 300 changes
    assert_same(index, rebuilt(path), queries)


def test_a_restored_backup_is_never_caught_up_from_a_later_cache(tmp_path: Path, small_thresholds: list[int]) -> None:
    x, queries, path, paths = seeded(tmp_path, "restore", 2300, 5)
    backup = tmp_path / "backup.semdb"
    shutil.copy(path, backup)  # state A
    with semdb.connect(path) as db:
        db.add_embeddings(paths[2000:2100], x[2000:2100])  # state B
    cache_path(path).unlink(missing_ok=True)
    with semdb.connect(path) as db:
        db.index()  # the cache of state B
    shutil.copy(backup, path)  # the backup comes back (state A), and changes differently
    with semdb.connect(path) as db:
        db.add_embeddings(paths[2100:2200], x[2100:2200])
    reads = len(small_thresholds)
    with semdb.connect(path) as db:
        index = db.index()
    assert len(small_thresholds) == reads + 1  # state B's cache cannot vouch for this history: read it all
    assert_same(index, rebuilt(path), queries)
    assert index.size == 2100


def test_the_log_is_trimmed_from_its_oldest_end(
    tmp_path: Path, small_thresholds: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(repository_module, "CHANGE_LOG_MIN_ROWS", 50)
    x, queries, path, paths = seeded(tmp_path, "trim", 2400, 7)
    with semdb.connect(path) as db:
        old = db.index()
        db.add_embeddings(paths[2000:2400], x[2000:2400])  # 800 rows logged, more than 2 × 200 kept
        assert db.store is not None
        with db.store.reading() as repository:
            newest = repository.last_change()
            oldest = repository.changes_after(-1, at_most=10**6)
            assert not repository.state_logged(old.tag.rsplit(":", 1)[-1])
        assert oldest is not None and len(oldest[0]) + len(oldest[1]) <= 2 * 240
        reads = len(small_thresholds)
        index = db.index()
        assert len(small_thresholds) == reads + 1  # the old state's marker is gone: a full read
        assert index.changes_seq == newest
        assert_same(index, rebuilt(path), queries)
