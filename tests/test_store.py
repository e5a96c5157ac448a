"""The store: Alembic migrations applied on open, WAL mode, the schema the models describe."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from semdb.store import Base, Store, alembic_config, make_engine, schema_revision, table_names, upgrade_schema


def test_migrations_create_every_table_on_an_empty_database(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.semdb'}")
    assert table_names(engine) == []
    upgrade_schema(engine)
    assert set(table_names(engine)) == {*Base.metadata.tables, "alembic_version"}
    head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    assert schema_revision(engine) == head


def test_migrated_schema_matches_the_models(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.semdb'}")
    upgrade_schema(engine)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_opening_twice_is_idempotent_and_uses_wal(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.semdb'}"
    Store(url).close()
    store = Store(url)
    with store.engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    store.close()


def test_every_revision_explains_why_it_exists(tmp_path: Path) -> None:
    script = ScriptDirectory.from_config(alembic_config(make_engine("sqlite://")))
    for revision in script.walk_revisions():
        assert revision.module.__doc__ and "Why" in revision.module.__doc__, revision.revision
