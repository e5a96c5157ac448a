"""A database you can trust: several writers, faults, odd paths, damaged and foreign caches.

Each test reproduces a defect found by trying semdb as a user would (see the issue "A database you
can trust" and its follow-up), with the fake encoder so that no model weights are needed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from conftest import FakeEncoder, write_colour_images
from PIL import Image
from sqlalchemy import event

import semdb
from semdb.cli import main
from semdb.errors import DiskFullError, InvalidArgumentError, ReadOnlyDatabaseError
from semdb.index import cache_path


def codec_count(path: Path) -> int:
    with sqlite3.connect(path) as connection:
        return int(connection.execute("SELECT count(*) FROM codecs").fetchone()[0])


def assert_each_image_finds_itself_first(db: semdb.Database, paths: list[str]) -> None:
    """Search with each image's own embedding: it must score within a quantisation error of the best
    hit (near-identical images may share a code, or another code may sit a hair closer). A code
    decoded by a codec other than its own scores far lower (it ranked 409th of 2,000 before the fix)."""
    encoder = FakeEncoder()
    queries = encoder.encode_images([Image.open(path) for path in paths])
    everything = db.stats().images
    for path, results in zip(paths, db.search_vectors(queries, k=everything), strict=True):
        own = [hit for hit in results if hit.path == path]
        assert own, f"{path} is not searchable"
        assert own[0].score >= results[0].score - 0.02, (path, results.index(own[0]))


def run_writers(targets: list[tuple[Path, Path]], **ingest_options: int) -> list[BaseException]:
    """Ingest each ``(database, folder)`` in its own thread, all starting together; the errors raised."""
    barrier = threading.Barrier(len(targets))
    errors: list[BaseException] = []

    def write(database: Path, folder: Path) -> None:
        try:
            db = semdb.connect(database, encoder=FakeEncoder(), bits=16)
            barrier.wait()
            db.ingest([folder], **ingest_options)
            db.close()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=write, args=target) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_two_writers_racing_on_a_new_database_train_one_codec(tmp_path: Path) -> None:
    first = write_colour_images(tmp_path / "a", per_colour=6, seed=1)
    second = write_colour_images(tmp_path / "b", per_colour=6, seed=2)
    path = tmp_path / "db.semdb"
    errors = run_writers([(path, tmp_path / "a"), (path, tmp_path / "b")], batch_size=4, train_size=12)
    assert errors == []
    assert codec_count(path) == 1
    db = semdb.connect(path, encoder=FakeEncoder())
    assert db.stats().images == len(first) + len(second)
    assert_each_image_finds_itself_first(db, [*first, *second])


def test_two_writers_of_the_same_files_deduplicate_instead_of_failing(tmp_path: Path) -> None:
    labels = write_colour_images(tmp_path / "a", per_colour=6)
    path = tmp_path / "db.semdb"
    errors = run_writers([(path, tmp_path / "a")] * 2, batch_size=4, train_size=12)
    assert errors == []
    stats = semdb.connect(path, encoder=FakeEncoder()).stats()
    assert (stats.images, stats.distinct_contents, codec_count(path)) == (len(labels), len(labels), 1)


def test_ingest_takes_a_single_path_as_well_as_a_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = write_colour_images(tmp_path / "images", per_colour=2)
    monkeypatch.chdir(tmp_path)
    db = semdb.connect(tmp_path / "db.semdb", encoder=FakeEncoder(), bits=16)
    report = db.ingest("images")
    assert (report.added, report.skipped) == (len(labels), [])
    assert all(os.path.isabs(hit.path) for hit in db.search("red", k=3))


def test_a_missing_path_is_an_error_and_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    database = tmp_path / "db.semdb"
    db = semdb.connect(database, encoder=FakeEncoder(), bits=16)
    with pytest.raises(InvalidArgumentError, match="no such file or folder"):
        db.ingest([tmp_path / "Picturs"])
    assert not database.exists()
    assert main(["ingest", str(tmp_path / "Picturs"), "--db", str(database), "--model", "tiny-fashion"]) == 1
    assert "Picturs" in capsys.readouterr().err
    assert not database.exists()


def test_bits_beyond_any_codec_are_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_colour_images(tmp_path / "images", per_colour=1)
    database = tmp_path / "db.semdb"
    assert main(["ingest", str(tmp_path / "images"), "--db", str(database), "--bits", "100000"]) == 1
    assert "--bits 100000" in capsys.readouterr().err
    assert not database.exists()
    encoder = FakeEncoder()  # 32-d: at most 256 bits
    with pytest.raises(InvalidArgumentError, match="at most 256"):
        semdb.connect(database, encoder=encoder, bits=512).ingest(tmp_path / "images")
    assert encoder.images_encoded == 0 and not database.exists()


@pytest.mark.parametrize("damage", ["random bytes", "text", "half"])
def test_a_damaged_database_is_one_line_from_every_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    database = tmp_path / "db.semdb"
    write_colour_images(tmp_path / "images", per_colour=40, size=64)
    db = semdb.connect(database, encoder=FakeEncoder(), bits=16)
    db.ingest(tmp_path / "images")
    db.close()
    data = database.read_bytes()
    damaged = {"random bytes": os.urandom(len(data)), "text": b"not a database\n" * 100, "half": data[: len(data) // 2]}
    database.write_bytes(damaged[damage])
    for command in (["stats"], ["stats", "--skipped"], ["search", "red"]):
        code = main([*command, "--db", str(database)])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
        assert "not a semdb database" in err or "damaged" in err, err
    assert database.read_bytes() == damaged[damage]


def test_a_truncated_or_altered_cache_is_rebuilt(tmp_path: Path) -> None:
    database = tmp_path / "db.semdb"
    write_colour_images(tmp_path / "images", per_colour=8)
    db = semdb.connect(database, encoder=FakeEncoder(), bits=16)
    db.ingest(tmp_path / "images")
    query = FakeEncoder().encode_texts(["purple"])
    truth = [(hit.path, hit.score) for hit in db.search_vectors(query, k=20)[0]]
    cache = cache_path(database)
    good = cache.read_bytes()
    rng = np.random.default_rng(0)
    damages = [good[: len(good) // 2], good[:100], b"", b"PK\x03\x04" + os.urandom(500)]
    for _ in range(20):
        mutated = bytearray(good)
        for position in rng.integers(0, len(good), size=int(rng.integers(1, 8))):
            mutated[position] ^= 1 << int(rng.integers(0, 8))
        damages.append(bytes(mutated))
    for damaged in damages:
        cache.write_bytes(damaged)
        again = semdb.connect(database, encoder=FakeEncoder())
        assert [(hit.path, hit.score) for hit in again.search_vectors(query, k=20)[0]] == truth
        again.close()
    assert cache.read_bytes() != damages[-1]  # rewritten by the last rebuild


def test_a_cache_from_another_database_or_an_earlier_state_is_never_used(tmp_path: Path) -> None:
    write_colour_images(tmp_path / "a", per_colour=8, seed=1)
    write_colour_images(tmp_path / "b", per_colour=8, seed=2)
    first, second = tmp_path / "first.semdb", tmp_path / "second.semdb"
    query = FakeEncoder().encode_texts(["green"])

    def answer(path: Path) -> list[str]:
        with semdb.connect(path, encoder=FakeEncoder()) as db:
            return [hit.path for hit in db.search_vectors(query, k=10)[0]]

    for path, folder in ((first, "a"), (second, "b")):
        # Closed at once: a connection left open keeps the WAL file, which a restore copied over the
        # database file would then replay (SQLite's rule: restore a database without its -wal).
        with semdb.connect(path, encoder=FakeEncoder(), bits=16) as db:
            db.ingest(tmp_path / folder, batch_size=8, train_size=8)
        answer(path)  # writes the cache
    truth = answer(second)
    # Another database's cache, with the same generation counter and codec id.
    shutil.copy(cache_path(first), cache_path(second))
    assert answer(second) == truth

    # A backup restored after more ingests: the newer cache must not be used for it.
    backup = tmp_path / "backup.semdb"
    shutil.copy(first, backup)
    backup_truth = answer(backup)
    cache_path(backup).unlink(missing_ok=True)
    write_colour_images(tmp_path / "c", per_colour=8, seed=3)
    with semdb.connect(first, encoder=FakeEncoder()) as db:
        db.ingest(tmp_path / "c", batch_size=8)
        answer(first)  # writes the cache of the newer state
    shutil.copy(backup, first)
    assert answer(first) == backup_truth
    # ... and after as many ingests as before: the generation repeats, the change token does not.
    with semdb.connect(first, encoder=FakeEncoder()) as db:
        db.ingest(tmp_path / "c", batch_size=8)
    assert all("/c/" in path or "/a/" in path for path in answer(first))


def test_disk_full_is_one_line_and_keeps_committed_batches(tmp_path: Path) -> None:
    database = tmp_path / "db.semdb"
    write_colour_images(tmp_path / "a", per_colour=4)
    write_colour_images(tmp_path / "b", per_colour=40, seed=5)
    db = semdb.connect(database, encoder=FakeEncoder(), bits=16)
    db.ingest(tmp_path / "a")
    assert db.store is not None
    with sqlite3.connect(database) as connection:
        pages = connection.execute("PRAGMA page_count").fetchone()[0]

    def full_disk(connection: sqlite3.Connection, _record: object) -> None:
        connection.execute(f"PRAGMA max_page_count = {pages + 1}")

    event.listen(db.store.engine, "connect", full_disk)
    db.store.engine.dispose()
    with pytest.raises(DiskFullError) as error:
        db.ingest(tmp_path / "b", batch_size=8)
    assert "\n" not in str(error.value) and "free some space" in str(error.value)
    event.remove(db.store.engine, "connect", full_disk)
    db.store.engine.dispose()
    kept = db.stats().images  # the first folder, and every batch of the second committed before the disk filled
    assert 20 <= kept < 220 and (kept - 20) % 8 == 0 and db.integrity_check() == "ok"
    assert len(db.search("red", k=kept)) == kept
    db.ingest(tmp_path / "b", batch_size=8)  # space freed: the same command finishes the job
    assert db.stats().images == 220


READ_ONLY_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[2])
from conftest import FakeEncoder
import semdb
from semdb.errors import ReadOnlyDatabaseError
db = semdb.connect(sys.argv[1], encoder=FakeEncoder())
print(len(db.search("red", k=3)), db.stats().images)
try:
    db.ingest(sys.argv[3])
except ReadOnlyDatabaseError as error:
    print("refused:", error)
"""


def run_on_read_only_folder(folder: Path, command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``command`` with ``folder`` mounted read-only (root: a private mount namespace) or made
    read-only by permissions (other users)."""
    if os.geteuid() != 0:
        modes = {path: path.stat().st_mode for path in [folder, *folder.iterdir()]}
        for path in modes:
            path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=300)
        finally:
            for path, mode in modes.items():
                path.chmod(mode)
    if shutil.which("unshare") is None:
        pytest.skip("running as root without unshare(1): no way to make a read-only folder here")
    quoted = " ".join(f"'{part}'" for part in command)
    script = f"mount --bind '{folder}' '{folder}' && mount -o remount,bind,ro '{folder}' && exec {quoted}"
    result = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    if "Operation not permitted" in result.stderr or "permission denied" in result.stderr.lower():
        pytest.skip(f"cannot make a read-only mount here: {result.stderr.strip()}")
    return result


def test_a_read_only_database_is_searchable_and_ingest_says_it_cannot_write(tmp_path: Path) -> None:
    folder = tmp_path / "library"
    folder.mkdir()
    write_colour_images(tmp_path / "images", per_colour=4)
    database = folder / "db.semdb"
    semdb.connect(database, encoder=FakeEncoder(), bits=16).ingest(tmp_path / "images")
    cache_path(database).unlink(missing_ok=True)  # the search must work without writing its cache, too
    digest = hashlib.sha256(database.read_bytes()).hexdigest()
    tests = str(Path(__file__).parent)
    result = run_on_read_only_folder(
        folder, [sys.executable, "-c", READ_ONLY_SCRIPT, str(database), tests, str(tmp_path / "images")]
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "3 20" and lines[1].startswith("refused:") and "read-only" in lines[1], result.stdout
    stats = run_on_read_only_folder(folder, [sys.executable, "-m", "semdb.cli", "stats", "--db", str(database)])
    assert stats.returncode == 0 and "Traceback" not in stats.stderr, stats.stderr
    assert hashlib.sha256(database.read_bytes()).hexdigest() == digest
    assert ReadOnlyDatabaseError.__name__ in READ_ONLY_SCRIPT


def test_stats_on_a_foreign_sqlite_file_leaves_it_untouched(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "photos.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE albums (name TEXT)")
    before = path.read_bytes()
    assert main(["stats", "--db", str(path)]) == 1
    assert "not a semdb database" in capsys.readouterr().err
    assert main(["ingest", str(tmp_path), "--db", str(path)]) == 1
    assert path.read_bytes() == before
    empty = tmp_path / "empty.semdb"
    empty.touch()
    assert main(["stats", "--db", str(empty)]) == 1
    assert empty.stat().st_size == 0


@pytest.mark.parametrize(
    "crafting",
    [
        "UPDATE settings SET value = '999999999999' WHERE key = 'dim'",
        "UPDATE codecs SET bits_per_image = 8192",
        "UPDATE codes SET code = x'00112233445566778899' WHERE content_id = (SELECT min(content_id) FROM codes)",
        "UPDATE codecs SET dim = 4096",
        "UPDATE codecs SET state = x'00'",
        "UPDATE codes SET codec_id = 77",
        # One code a byte short and another a byte long: the total length of the batch is right.
        "UPDATE codes SET code = substr(code, 2) WHERE content_id = (SELECT min(content_id) FROM codes);"
        " UPDATE codes SET code = CAST(code || x'00' AS BLOB) WHERE content_id = (SELECT max(content_id) FROM codes)",
        "UPDATE codes SET list_no = 'seven' WHERE content_id = (SELECT min(content_id) FROM codes)",
        # || makes text of a blob: here text that is not UTF-8 where a code should be.
        "UPDATE codes SET code = x'ff' || code WHERE content_id = (SELECT max(content_id) FROM codes)",
    ],
)
def test_a_crafted_database_gets_one_line_never_a_crash(tmp_path: Path, crafting: str) -> None:
    database = tmp_path / "db.semdb"
    write_colour_images(tmp_path / "images", per_colour=4)
    semdb.connect(database, encoder=FakeEncoder(), bits=16).ingest(tmp_path / "images")
    with sqlite3.connect(database) as connection:
        connection.execute("PRAGMA foreign_keys = OFF")
        connection.executescript(crafting)
    cache_path(database).unlink(missing_ok=True)
    with pytest.raises(semdb.SemdbError) as error:
        db = semdb.connect(database, encoder=FakeEncoder())
        db.search_vectors(FakeEncoder().encode_texts(["red"]), k=3)
        db.ingest(tmp_path / "images")
    assert "\n" not in str(error.value) and "damaged" in str(error.value), str(error.value)


def test_text_that_is_not_utf8_is_named_without_its_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A damaged text column is named; the undecodable bytes sqlite3 quotes stay off the terminal."""
    database = tmp_path / "db.semdb"
    write_colour_images(tmp_path / "images", per_colour=4)
    semdb.connect(database, encoder=FakeEncoder(), bits=16).ingest(tmp_path / "images")
    with sqlite3.connect(database) as connection:
        connection.execute("UPDATE codecs SET report = CAST(x'7bff00fe0a41' AS TEXT)")
    assert main(["stats", "--db", str(database)]) == 1
    err = capsys.readouterr().err
    assert "is damaged: Could not decode to UTF-8 column 'report'; restore it from a backup" in err, err
    assert err.rstrip("\n").isprintable(), repr(err)


def test_content_pruned_by_another_writer_mid_batch_is_retried_not_a_crash(tmp_path: Path) -> None:
    from semdb.ingest import BatchWriter, CodecChoice, IngestReport
    from semdb.ingest.writer import Prepared

    database = tmp_path / "db.semdb"
    write_colour_images(tmp_path / "images", per_colour=2)
    db = semdb.connect(database, encoder=FakeEncoder(), bits=16)
    db.ingest(tmp_path / "images")
    assert db.store is not None
    report = IngestReport()
    writer = BatchWriter(
        db.store,
        CodecChoice("pq", 16),
        train_size=10,
        dim=32,
        train_codec=lambda *_: pytest.fail("nothing to train"),
        load_codec=lambda row: semdb.codecs.load_codec(row.name, row.state),
        report=report,
    )
    # This writer saw the content stored (so it did not embed it); another writer's prune deleted it since.
    gone = Prepared(str(tmp_path / "late.png"), size=10, mtime_ns=10, sha256="0" * 64)
    writer.commit([gone], embeddings={})
    assert [reason for _, reason in report.skipped] == [
        "its content was removed by another ingest while this one ran; run ingest again"
    ]
    with sqlite3.connect(database) as connection:
        row = connection.execute("SELECT size, mtime_ns, status FROM images WHERE path = ?", (os.fsencode(gone.path),))
        assert row.fetchone() == (None, None, "skipped")  # no stat kept: the next run reads the file again


class PickyEncoder(FakeEncoder):
    """Refuses images 7 px wide, as a model's preprocessing may refuse an odd image."""

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if any(image.width == 7 for image in images):
            raise ValueError("height and width must be > 0")
        return super().encode_images(images)


def test_an_image_the_model_refuses_is_skipped_and_the_batch_goes_on(tmp_path: Path) -> None:
    labels = write_colour_images(tmp_path / "images", per_colour=3)
    Image.new("RGB", (7, 30), (200, 0, 0)).save(tmp_path / "images" / "odd.png")
    shutil.copy(tmp_path / "images" / "odd.png", tmp_path / "images" / "odd-copy.png")
    db = semdb.connect(tmp_path / "db.semdb", encoder=PickyEncoder(), bits=16)
    report = db.ingest(tmp_path / "images")
    assert report.added == len(labels)
    reasons = {Path(path).name: reason for path, reason in report.skipped}
    assert set(reasons) == {"odd.png", "odd-copy.png"}
    assert all(
        reason == "the model could not take this image: height and width must be > 0" for reason in reasons.values()
    )


def test_an_error_every_image_meets_still_stops_the_ingest(tmp_path: Path) -> None:
    class BrokenEncoder(FakeEncoder):
        def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
            raise RuntimeError("CUDA out of memory")

    write_colour_images(tmp_path / "images", per_colour=1)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        semdb.connect(tmp_path / "db.semdb", encoder=BrokenEncoder(), bits=16).ingest(tmp_path / "images")


def test_an_open_reader_sees_every_commit_of_another_process_and_skips_the_check_when_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_colour_images(tmp_path / "a", per_colour=3, seed=1)
    write_colour_images(tmp_path / "b", per_colour=3, seed=2)
    path = tmp_path / "db.semdb"
    with semdb.connect(path, encoder=FakeEncoder(), bits=16) as writer:
        writer.ingest(tmp_path / "a", train_size=8)
    reader = semdb.connect(path, encoder=FakeEncoder())
    first = reader.index()
    assert reader.index() is first and first.size == 15
    # Another process (a subprocess here, so truly another SQLite connection and process) commits.
    script = (
        "import sys; sys.path.insert(0, sys.argv[3]); import semdb; from conftest import FakeEncoder; "
        "semdb.connect(sys.argv[1], encoder=FakeEncoder()).ingest(sys.argv[2])"
    )
    tests = str(Path(__file__).parent)
    subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "b"), tests], check=True)
    assert reader.index().size == 30  # data_version moved: the reader looked, and caught up
    # Nothing committed since: no transaction is even begun for the freshness check.
    assert reader.store is not None
    began: list[int] = []
    event.listen(reader.store.engine, "begin", lambda connection: began.append(1))
    again = reader.index()
    assert again.size == 30 and not began
    reader.close()


def test_a_database_file_replaced_while_open_is_named_as_replaced_not_as_damaged(tmp_path: Path) -> None:
    from semdb.errors import DatabaseDamagedError, NotASemdbDatabaseError

    write_colour_images(tmp_path / "images", per_colour=3)
    database = tmp_path / "db.semdb"
    with semdb.connect(database, encoder=FakeEncoder(), bits=32) as db:
        db.ingest(tmp_path / "images")
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as connection:
        connection.execute("CREATE TABLE t (x)")
    db = semdb.connect(database, encoder=FakeEncoder())
    assert len(db.search("red")) == 10  # connections are open now (a server's, say)
    shutil.copyfile(foreign, database)  # written into the same file, under them
    # The file on disk is a whole SQLite file: "damaged, integrity_check says ok" would contradict itself.
    with pytest.raises(DatabaseDamagedError, match="was replaced or changed by another program"):
        db.search("red")
    db.close()
    with pytest.raises(NotASemdbDatabaseError, match="not a semdb database"):
        semdb.connect(database, encoder=FakeEncoder()).stats()


def test_a_closed_database_stays_closed(tmp_path: Path) -> None:
    write_colour_images(tmp_path / "images", per_colour=3)
    with semdb.connect(tmp_path / "db.semdb", encoder=FakeEncoder(), bits=32) as db:
        db.ingest(tmp_path / "images")
        assert len(db.search("red")) == 10
    for call in (lambda: db.search("red"), db.stats, lambda: db.ingest(tmp_path / "images")):
        with pytest.raises(InvalidArgumentError, match="is closed; open it again"):
            call()
    again = semdb.connect(tmp_path / "db.semdb", encoder=FakeEncoder())
    assert len(again.search("red")) == 10
