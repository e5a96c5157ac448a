"""The store, migrations, ingest and search on both backends: an SQLite file and a real PostgreSQL server.

Every test here runs once per backend (the ``database_location`` fixture of ``servers.py``); the
PostgreSQL server is started by the project, never mocked. The tests at the end are PostgreSQL's
own: connection errors, a foreign database, read snapshots and the index cache on the client.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import FakeEncoder, write_colour_images
from PIL import Image
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError

import semdb
from semdb.cli import main
from semdb.errors import DatabaseNotFoundError, InvalidArgumentError, NotASemdbDatabaseError, SemdbError
from semdb.store import Base, Store, migrate
from semdb.store.postgres import parse_url


def test_a_new_database_is_at_the_head_revision_and_matches_the_models(database_location: str) -> None:
    store = Store.open(database_location, write=True, create=True)
    with store.reading() as repository:
        connection = repository.connection
        assert migrate.current_revision(connection) == migrate.head_revision()
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        columns = {column["name"]: column["type"] for column in inspect(connection).get_columns("codes")}
        settings = repository.settings()
    expected = "BYTEA" if store.dialect == "postgresql" else "BLOB"
    assert str(columns["code"]) == expected
    assert settings["format"] == "semdb" and len(settings["database_id"]) == 32
    store.close()


def test_the_revisions_run_down_and_up_again_with_data(database_location: str) -> None:
    """0001 → head on a database holding rows: 0002's partial unique index and 0003's text → bytes paths."""
    store = Store.open(database_location, write=True, create=True)
    with store.writing() as repository:
        command.downgrade(migrate.alembic_config(repository.connection), "0001")
    with store.engine.connect() as connection, connection.begin():
        connection.execute(
            text(
                "INSERT INTO images (path, status, updated_at) VALUES ('/photos/été.png', 'skipped', CURRENT_TIMESTAMP)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO codecs (name, bits_per_image, dim, state, trained_on, created_at) "
                "VALUES ('pq', 16, 32, :state, 1, CURRENT_TIMESTAMP)"
            ),
            {"state": b"x"},
        )
    store.close()
    upgraded = Store.open(database_location, write=True)
    with upgraded.reading() as repository:
        assert migrate.current_revision(repository.connection) == migrate.head_revision()
        assert list(repository.images_by_path(["/photos/été.png"])) == ["/photos/été.png"]
        assert repository.active_codec_id() is not None
    with pytest.raises(IntegrityError), upgraded.writing() as repository:
        repository.add_active_codec("pq", 16, 32, b"other", trained_on=1)
    upgraded.close()


def test_a_writer_queues_behind_another_and_is_told_so(database_location: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from semdb.store import store as store_module

    monkeypatch.setattr(store_module, "WAIT_NOTICE_SECONDS", 0.2)
    first = Store.open(database_location, write=True, create=True)
    messages: list[str] = []
    second = Store.open(database_location, write=True, on_wait=messages.append)
    holding = threading.Event()
    order: list[str] = []

    def hold_the_lock() -> None:
        with first.writing() as repository:
            repository.set_settings({"holder": "first"})
            holding.set()
            time.sleep(1.0)
            order.append("first committed")

    thread = threading.Thread(target=hold_the_lock)
    thread.start()
    holding.wait()
    with second.writing() as repository:
        order.append("second has the lock")
        assert repository.setting("holder") == "first"  # it sees the first writer's commit
    thread.join()
    assert order == ["first committed", "second has the lock"]
    assert len(messages) == 1 and "waiting for another ingest" in messages[0]
    first.close()
    second.close()


def test_ingest_search_resume_and_bad_files(database_location: str, tmp_path: Path) -> None:
    labels = write_colour_images(tmp_path / "images", per_colour=4)
    (tmp_path / "images" / "notes.png").write_text("not an image\n")
    (tmp_path / "images" / "copy.png").write_bytes((tmp_path / "images" / "red_0.png").read_bytes())
    db = semdb.connect(database_location, encoder=FakeEncoder(), bits=16)
    report = db.ingest(tmp_path / "images", batch_size=4, train_size=8)
    assert (report.added, report.duplicates, report.codec_trained_on) == (len(labels), 1, 8)
    assert [Path(path).name for path, _ in report.skipped] == ["notes.png"]
    hits = db.search("blue", k=4)
    assert [labels[hit.path] for hit in hits] == ["blue"] * 4
    stats = db.stats()
    assert (stats.images, stats.distinct_contents, stats.staged, stats.skipped) == (len(labels) + 1, len(labels), 0, 1)
    again = db.ingest(tmp_path / "images", batch_size=4)
    assert (again.added, again.unchanged) == (0, len(labels) + 1)
    db.close()


def test_the_open_index_catches_up_from_the_change_log(
    database_location: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from semdb.index import build, cache_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    reads: list[int] = []
    read_group = build._read_group
    monkeypatch.setattr(build, "_read_group", lambda *args: reads.append(1) or read_group(*args))
    write_colour_images(tmp_path / "a", per_colour=4, seed=1)
    write_colour_images(tmp_path / "b", per_colour=4, seed=2)
    with semdb.connect(database_location, encoder=FakeEncoder(), bits=16) as db:
        db.ingest(tmp_path / "a", train_size=8)
        db.search("red", k=3)
        reads.clear()
        db.ingest(tmp_path / "b")  # the triggers log the new images and codes (plpgsql on PostgreSQL)
        (tmp_path / "a" / "red_0.png").unlink()
        db.ingest(tmp_path / "a", prune=True)
        caught = [(hit.path, round(hit.score, 5)) for hit in db.search("red", k=8, exact=True)]
        assert not reads  # caught up from the log: no full read of the codes
        assert db.index().size == db.stats().images == 39  # 2 × 20 written, one pruned
    # No cache (a server database's is on the client, a file's beside it): built from the store.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
    if "://" not in database_location:
        cache_path(Path(database_location)).unlink()
    with semdb.connect(database_location, encoder=FakeEncoder()) as fresh:
        assert [(hit.path, round(hit.score, 5)) for hit in fresh.search("red", k=8, exact=True)] == caught
    assert reads and str(tmp_path / "a" / "red_0.png") not in {path for path, _ in caught}


def test_a_full_build_reads_the_same_codes_without_a_row_object_as_with_one(database_location: str) -> None:
    """SQLite's aggregated pages and PostgreSQL's binary COPY give what the driver's rows give, by id,
    across chunks, a run of images that are not searchable, and one removed; a code one byte short
    is a damaged row on both."""
    path = database_location
    x = np.random.default_rng(0).standard_normal((60, 16)).astype(np.float32)
    with semdb.connect(path, codec="pq", bits=16, model="hf-hub:none/none") as db:
        db.add_embeddings([f"/nowhere/{i}.png" for i in range(60)], x, train_size=20)
    store = Store.open(path, write=True)
    with store.writing() as repository:
        run = repository.connection.execute(text("SELECT id FROM images ORDER BY id")).scalars().all()[8:26]
        listed = ",".join(map(str, run))
        repository.connection.execute(text(f"UPDATE images SET status = 'skipped' WHERE id IN ({listed})"))
        repository.connection.execute(text("DELETE FROM images WHERE id = (SELECT max(id) FROM images) - 20"))
        repository.connection.execute(text("UPDATE codes SET list_no = 3 WHERE content_id % 2 = 0"))
    with store.reading() as repository:
        codec_id = int(repository.connection.execute(text("SELECT id FROM codecs")).scalar_one())
        chunks = list(repository.coded_chunks(codec_id, 2, rows=7))
        by_row = list(repository.coded_chunks(codec_id, 2, by_row=True))
    assert len(chunks) > 2 and all(len(ids) <= 7 for ids, _, _ in chunks)
    for part in range(3):
        assert np.array_equal(np.concatenate([c[part] for c in chunks]), np.concatenate([r[part] for r in by_row]))
    ids = np.concatenate([c[0] for c in chunks])
    assert len(ids) == 60 - 18 - 1 and not np.isin(ids, run).any() and np.all(np.diff(ids) > 0)
    assert set(np.concatenate([c[2] for c in chunks]).tolist()) == {-1, 3}
    shorter = "substr(code, 2)" if store.dialect == "sqlite" else "substring(code from 2)"
    with store.writing() as repository:
        repository.connection.execute(
            text(f"UPDATE codes SET code = {shorter} WHERE content_id = (SELECT max(content_id) FROM codes)")
        )
    with store.reading() as repository, pytest.raises(ValueError, match="stored codes of 2 bytes expected"):
        list(repository.coded_chunks(codec_id, 2, rows=7))
    store.close()


def test_four_concurrent_writers_train_one_codec_and_store_nothing_twice(
    database_location: str, tmp_path: Path
) -> None:
    folders = [tmp_path / f"f{n}" for n in range(4)]
    paths: list[str] = []
    for n, folder in enumerate(folders):
        paths += list(write_colour_images(folder, per_colour=3, seed=n + 1))
    barrier = threading.Barrier(len(folders))
    errors: list[BaseException] = []

    def write(folder: Path) -> None:
        try:
            with semdb.connect(database_location, encoder=FakeEncoder(), bits=16) as db:
                barrier.wait()
                db.ingest([folder, folders[0]], batch_size=4, train_size=20)  # folders[0] by everyone
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=write, args=(folder,)) for folder in folders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    db = semdb.connect(database_location, encoder=FakeEncoder())
    assert db.store is not None
    with db.store.reading() as repository:
        assert repository.codec_count() == 1
        counts = repository.counts()
    assert (counts.indexed, counts.contents, counts.staged) == (len(paths), len(paths), 0)
    queries = FakeEncoder().encode_images([Image.open(path) for path in paths])
    for path, hits in zip(paths, db.search_vectors(queries, k=len(paths)), strict=True):
        own = [hit for hit in hits if hit.path == path]
        assert own and own[0].score >= hits[0].score - 0.02, path
    db.close()


def test_stats_and_migrate_take_the_same_location_on_the_command_line(
    database_location: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_colour_images(tmp_path / "images", per_colour=2)
    semdb.connect(database_location, encoder=FakeEncoder(), bits=16).ingest(tmp_path / "images")
    capsys.readouterr()
    assert main(["stats", "--db", database_location, "--json"]) == 0
    assert '"images": 10' in capsys.readouterr().out
    assert main(["migrate", "--db", database_location]) == 0
    assert "schema up to date" in capsys.readouterr().out


# --- PostgreSQL's own -----------------------------------------------------------------------------


def one_line_error(url: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["stats", "--db", url]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_connection_mistakes_are_one_line_and_hide_the_password(
    postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = parse_url(postgres_url)
    wrong_password = url.set(password="not-the-password").render_as_string(hide_password=False)
    err = one_line_error(wrong_password, capsys)
    assert "refused the credentials" in err and "not-the-password" not in err
    missing = url.set(database="no_such_database").render_as_string(hide_password=False)
    err = one_line_error(missing, capsys)
    assert "'no_such_database' does not exist" in err and "createdb" in err
    unreachable = url.set(port=1).render_as_string(hide_password=False)
    err = one_line_error(unreachable, capsys)
    assert "cannot reach the PostgreSQL server" in err and str(url.password) not in err
    with pytest.raises(SemdbError, match="not mysql"):
        semdb.connect("mysql://user@host/db")
    with pytest.raises(DatabaseNotFoundError):
        Store.open(missing)


def test_a_foreign_database_is_refused_and_left_untouched(postgres_url: str) -> None:
    engine = create_engine(parse_url(postgres_url))
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE recipes (name text)"))
        connection.execute(text("INSERT INTO recipes VALUES ('bread')"))
    for write in (False, True):
        with pytest.raises(NotASemdbDatabaseError, match="not a semdb database"):
            Store.open(postgres_url, write=write, create=write)
    with engine.connect() as connection:
        assert inspect(connection).get_table_names() == ["recipes"]
        assert connection.execute(text("SELECT name FROM recipes")).scalars().all() == ["bread"]
    engine.dispose()


def test_a_read_is_one_snapshot_while_a_writer_commits(postgres_url: str) -> None:
    store = Store.open(postgres_url, write=True, create=True)
    with store.reading() as repository:
        before = repository.setting("generation")
        with store.writing() as writer:
            writer.record_change()
        assert repository.setting("generation") == before  # the same snapshot
    with store.reading() as repository:
        assert repository.setting("generation") != before
    store.close()


def test_the_index_cache_lives_on_the_client_one_file_per_database(
    postgres_server: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from servers import PostgresServer

    assert isinstance(postgres_server, PostgresServer)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    write_colour_images(tmp_path / "a", per_colour=3, seed=1)
    write_colour_images(tmp_path / "b", per_colour=3, seed=2)
    answers = []
    for folder in ("a", "b"):
        url = postgres_server.create_database()
        with semdb.connect(url, encoder=FakeEncoder(), bits=16) as db:
            db.ingest(tmp_path / folder)
            answers.append([hit.path for hit in db.search("green", k=5)])
        with semdb.connect(url, encoder=FakeEncoder()) as again:  # a new process would load the cache
            assert [hit.path for hit in again.search("green", k=5)] == answers[-1]
    files = sorted((tmp_path / "cache" / "semdb").glob("*.index"))
    assert len(files) == 2
    assert all(f"/{folder}/" in path for folder, paths in zip("ab", answers, strict=True) for path in paths)
    assert (
        np.load(files[0], allow_pickle=False)["tag"].tobytes() != np.load(files[1], allow_pickle=False)["tag"].tobytes()
    )


def test_a_url_with_a_bad_port_or_libpqs_scheme_is_read_without_a_server() -> None:
    for location, fragment in (
        ("postgresql+psycopg://user:hunter2@127.0.0.1:notaport/photos", "the port is not a number"),
        ("postgresql+psycopg://user:hunter2@127.0.0.1:99999/photos", "a port is 1..65535"),
    ):
        with pytest.raises(InvalidArgumentError, match=fragment) as refused:
            parse_url(location)
        assert "hunter2" not in str(refused.value)
    # libpq's "postgres://" is PostgreSQL too, driven by psycopg.
    assert parse_url("postgres://user@host/photos").drivername == "postgresql+psycopg"
