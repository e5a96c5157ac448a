"""The store: safe opening (foreign, damaged, read-only, old and new files), migrations, the write lock."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.exc import IntegrityError

from semdb.errors import (
    DatabaseDamagedError,
    DatabaseNotFoundError,
    NotASemdbDatabaseError,
    NotReadyError,
    ReadOnlyDatabaseError,
    SchemaVersionError,
)
from semdb.store import Base, Store, migrate


def new_store(path: Path) -> Store:
    return Store.open(path, write=True, create=True)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_new_database_gets_every_table_at_the_head_revision(tmp_path: Path) -> None:
    store = new_store(tmp_path / "db.semdb")
    with store.reading() as repository:
        connection = repository.connection
        assert migrate.current_revision(connection) == migrate.head_revision()
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        settings = repository.settings()
    assert settings["format"] == "semdb" and len(settings["database_id"]) == 32
    store.close()


def test_opening_for_writing_uses_wal_and_opening_twice_is_idempotent(tmp_path: Path) -> None:
    new_store(tmp_path / "db.semdb").close()
    store = Store.open(tmp_path / "db.semdb", write=True)
    with store.reading() as repository:
        assert repository.connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert repository.connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert repository.connection.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar() == 1
    store.close()


def test_every_revision_explains_why_it_exists() -> None:
    from alembic.script import ScriptDirectory

    for revision in ScriptDirectory.from_config(migrate.alembic_config()).walk_revisions():
        assert revision.module.__doc__ and "Why" in revision.module.__doc__, revision.revision


def test_a_second_active_codec_is_impossible(tmp_path: Path) -> None:
    store = new_store(tmp_path / "db.semdb")
    with store.writing() as repository:
        repository.add_active_codec("pq", 32, 8, b"state", trained_on=1)
    with pytest.raises(IntegrityError), store.writing() as repository:
        repository.add_active_codec("pq", 32, 8, b"other", trained_on=1)
    with store.reading() as repository:
        assert repository.codec_count() == 1
    store.close()


def test_a_foreign_sqlite_file_is_refused_and_left_byte_for_byte_untouched(tmp_path: Path) -> None:
    path = tmp_path / "someone-else.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE recipes (name TEXT)")
        connection.execute("INSERT INTO recipes VALUES ('bread')")
    before = file_digest(path)
    for write in (False, True):
        with pytest.raises(NotASemdbDatabaseError, match="not a semdb database"):
            Store.open(path, write=write, create=write)
    assert file_digest(path) == before
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert not (tmp_path / "someone-else.db-wal").exists()


@pytest.mark.parametrize(
    ("content", "error_class", "message"),
    [
        (b"", NotReadyError, "is an empty file"),
        (b"hello, I am a text file\n" * 50, NotASemdbDatabaseError, "not an SQLite file"),
        (bytes(range(256)) * 40, NotASemdbDatabaseError, "not an SQLite file"),
    ],
)
def test_files_that_are_not_databases_get_one_line(
    tmp_path: Path, content: bytes, error_class: type[Exception], message: str
) -> None:
    path = tmp_path / "db.semdb"
    path.write_bytes(content)
    with pytest.raises(error_class, match=message) as error:
        Store.open(path)
    assert "\n" not in str(error.value)
    assert path.read_bytes() == content


def test_a_folder_is_not_a_database(tmp_path: Path) -> None:
    with pytest.raises(NotASemdbDatabaseError, match="is a folder"):
        Store.open(tmp_path)


def test_a_missing_database_is_not_created_by_reading(tmp_path: Path) -> None:
    with pytest.raises(DatabaseNotFoundError):
        Store.open(tmp_path / "missing.semdb")
    assert not (tmp_path / "missing.semdb").exists()


def test_half_a_database_file_is_reported_damaged(tmp_path: Path) -> None:
    path = tmp_path / "db.semdb"
    store = new_store(path)
    with store.writing() as repository:
        repository.add_images(
            [
                {"path": f"/p/{i:05d}-{'x' * 200}.png", "content_id": None, "size": 1, "mtime_ns": 1}
                | {"status": "skipped", "error": "e" * 200}
                for i in range(3000)
            ]
        )
    store.compact()
    store.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatabaseDamagedError, match="damaged") as error:
        reader = Store.open(path)
        with reader.reading() as repository:
            repository.skipped()
    assert "\n" not in str(error.value)


def test_a_database_from_a_newer_semdb_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "db.semdb"
    new_store(path).close()
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(SchemaVersionError, match="newer semdb"):
        Store.open(path)


def test_an_old_schema_is_refused_read_only_and_upgraded_by_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "db.semdb"
    store = new_store(path)
    with store.writing() as repository:
        command.downgrade(migrate.alembic_config(repository.connection), migrate.known_revisions()[0])
    store.close()
    before = file_digest(path)
    with pytest.raises(SchemaVersionError, match="semdb migrate"):
        Store.open(path)
    assert file_digest(path) == before
    upgraded = Store.open(path, write=True)
    with upgraded.reading() as repository:
        assert migrate.current_revision(repository.connection) == migrate.head_revision()
        assert repository.settings()["format"] == "semdb"
    upgraded.close()


def test_opening_read_only_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "db.semdb"
    new_store(path).close()
    before = file_digest(path)
    store = Store.open(path)
    with store.reading() as repository:
        repository.counts()
    with pytest.raises(ReadOnlyDatabaseError), store.writing():
        pass
    store.close()
    assert file_digest(path) == before


def test_semdb_migrate_upgrades_a_database_at_an_older_schema(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from semdb.cli import main

    path = tmp_path / "db.semdb"
    store = new_store(path)
    with store.writing() as repository:
        command.downgrade(migrate.alembic_config(repository.connection), "0004")
    store.close()
    assert main(["migrate", "--db", str(path)]) == 0
    assert "schema up to date" in capsys.readouterr().out
    with Store.open(path).reading() as repository:
        assert migrate.current_revision(repository.connection) == migrate.head_revision()
    assert main(["migrate", "--db", str(tmp_path / "missing.semdb")]) != 0


def test_a_search_of_an_older_schema_says_to_migrate_and_an_ingest_migrates_it(tmp_path: Path) -> None:
    import numpy as np

    import semdb

    path = tmp_path / "db.semdb"
    x = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    with semdb.connect(path, codec="pq", bits=16, model="hf-hub:none/none") as db:
        db.add_embeddings([f"/nowhere/{i}.png" for i in range(30)], x[:30], train_size=20)
    store = Store.open(path, write=True)
    with store.writing() as repository:
        command.downgrade(migrate.alembic_config(repository.connection), "0004")
    store.close()
    db = semdb.connect(path)
    with pytest.raises(SchemaVersionError, match="semdb migrate"):
        db.search_vectors(x[:1], k=3)  # not "no searchable images yet"
    db.add_embeddings([f"/nowhere/{i}.png" for i in range(30, 40)], x[30:])  # a writer migrates
    assert len(db.search_vectors(x[:1], k=3)[0]) == 3
    db.close()
