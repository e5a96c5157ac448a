"""Opening a database safely, and the two kinds of transaction semdb runs on it.

:meth:`Store.open` refuses files that are not semdb databases before anything is written to them
(foreign SQLite files are left exactly as they were), opens read-only for commands that only read
(so a read-only file or mount can be searched), and creates or migrates only when asked to write.

* :meth:`Store.reading` — a snapshot: a reader never sees half a batch and never blocks a writer
  (SQLite in WAL mode; REPEATABLE READ on PostgreSQL).
* :meth:`Store.writing` — the database's write lock (SQLite ``BEGIN IMMEDIATE``; a transaction-level
  advisory lock on PostgreSQL, see :mod:`semdb.store.postgres`) for the whole transaction, so that
  every check made inside it still holds at commit: writers queue, and one that waits longer than a
  few seconds is told so.

Errors from the database engine become one-line :class:`~semdb.errors.SemdbError` messages (disk
full, read-only, damaged file, locked too long); committed data is never touched by them.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import Connection, Engine, create_engine, event, inspect, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.pool import QueuePool

from semdb.errors import (
    DatabaseDamagedError,
    DatabaseLockedError,
    DatabaseNotFoundError,
    DiskFullError,
    InvalidArgumentError,
    NotASemdbDatabaseError,
    NotReadyError,
    ReadOnlyDatabaseError,
    SchemaVersionError,
    SemdbError,
)
from semdb.store import migrate, postgres
from semdb.store.models import Base
from semdb.store.repository import Repository

SQLITE_HEADER = b"SQLite format 3\x00"
SEMDB_TABLES = frozenset(Base.metadata.tables)
# The revision that added each table not in the first one (so a database before it is not "damaged").
TABLE_ADDED_BY = {"index_changes": "0005"}
# A writer waiting for the lock longer than this is told why it is not moving.
WAIT_NOTICE_SECONDS = 3.0
DEFAULT_LOCK_TIMEOUT_SECONDS = 900.0
BUSY_TIMEOUT_MS = 30_000
# While queueing for the write lock, SQLite's own busy wait is cut into slices this long, so that
# the wait can be reported and bounded.
LOCK_POLL_MS = 500


def _sqlite_path(location: str) -> Path | None:
    """The file behind ``location`` (a path or a ``sqlite:///`` URL); None for other URLs."""
    if "://" not in location:
        return Path(location).expanduser()
    try:
        url = make_url(location)
    except (ArgumentError, ValueError):
        return None  # not a URL SQLAlchemy reads (or a port that is no number): refused by postgres.parse_url
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return Path(url.database).expanduser()
    return None


def _connect_sqlite(path: Path, read_only: bool) -> sqlite3.Connection:
    """A driver connection in autocommit mode (transactions are begun explicitly, see :class:`Store`)."""
    uri = f"file:{quote(os.fspath(path.absolute()))}"
    connection = sqlite3.connect(
        f"{uri}?mode={'ro' if read_only else 'rw'}", uri=True, isolation_level=None, check_same_thread=False
    )
    try:
        connection.execute("PRAGMA schema_version").fetchone()
    except sqlite3.OperationalError:
        connection.close()
        if not read_only or os.access(path.parent, os.W_OK):
            raise
        # A WAL database on a read-only mount: SQLite cannot create the -shm file a reader needs.
        # Nobody can write it there either, so reading it as immutable is safe.
        connection = sqlite3.connect(
            f"{uri}?mode=ro&immutable=1", uri=True, isolation_level=None, check_same_thread=False
        )
    connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    connection.execute("PRAGMA foreign_keys = ON")
    if read_only:
        connection.execute("PRAGMA query_only = ON")
    else:
        # NORMAL is durable across process kills in WAL mode (only power loss can drop the last commits).
        connection.execute("PRAGMA synchronous = NORMAL")
    return connection


def _sqlite_engine(path: Path, read_only: bool) -> Engine:
    engine = create_engine("sqlite://", creator=lambda: _connect_sqlite(path, read_only), poolclass=QueuePool)

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        # pysqlite's own transaction handling is switched off (isolation_level=None); a transaction
        # already begun by Store.writing (BEGIN IMMEDIATE) is kept, anything else begins deferred.
        driver = connection.connection.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        if not driver.in_transaction:
            driver.execute("BEGIN")  # on the driver: SQLAlchemy's own execution path costs more than BEGIN

    return engine


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else text


class Store:
    """One open semdb database (see the module docstring). Use :meth:`open`."""

    def __init__(self, engine: Engine, location: str, path: Path | None, writable: bool) -> None:
        self.engine = engine
        self.location = location
        self.path = path
        self.writable = writable
        self.lock_timeout = DEFAULT_LOCK_TIMEOUT_SECONDS
        # Told (once per transaction) when a writer has queued for the lock longer than WAIT_NOTICE_SECONDS.
        self.on_wait: Callable[[str], None] | None = None
        self._version_connection: sqlite3.Connection | None = None
        self._version_lock = threading.Lock()
        self.closed = False

    @property
    def dialect(self) -> str:
        """``sqlite``, ``postgresql``..."""
        return self.engine.dialect.name

    # --- opening --------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        location: str | os.PathLike[str],
        *,
        write: bool = False,
        create: bool = False,
        on_wait: Callable[[str], None] | None = None,
    ) -> Store:
        """Open the database at ``location`` (a file path or a SQLAlchemy URL).

        ``write``: open for writing, applying pending migrations; ``create``: a missing (or empty)
        file becomes a new database. Without ``write`` nothing is written, not even a migration.
        """
        location = os.fspath(location)
        path = _sqlite_path(location)
        display = str(path) if path is not None and "://" not in location else location
        if path is None:
            display = postgres.display_url(location)
            store = cls(postgres.create_server_engine(location), display, None, writable=write)
        else:
            if _check_file(path, display, write=write, create=create) and not path.exists():
                _create_sqlite(path)
            store = cls(_sqlite_engine(path, read_only=not write), display, path, writable=write)
        store.on_wait = on_wait
        try:
            store._prepare(write)
        except BaseException:
            store.close()
            raise
        return store

    def _prepare(self, write: bool) -> None:
        """Check that the database is semdb's, at this semdb's schema (migrating it when writing)."""
        if not write:
            with self.reading() as repository:
                self._check_schema(repository.connection, may_migrate=False)
            return
        with self.writing() as repository:
            self._check_schema(repository.connection, may_migrate=True)
        if self.dialect == "sqlite":
            with self._translated(), self.engine.connect() as connection:
                driver = connection.connection.driver_connection
                assert isinstance(driver, sqlite3.Connection)
                # Set once, after the file is known to be semdb's: WAL lets searches read while an ingest writes.
                driver.execute("PRAGMA journal_mode = WAL")
                problem = driver.execute("PRAGMA quick_check").fetchone()
                if problem is None or problem[0] != "ok":
                    raise DatabaseDamagedError(self._damage_message(str(problem[0] if problem else "no answer")))

    def _check_schema(self, connection: Connection, may_migrate: bool) -> None:
        tables = set(inspect(connection).get_table_names())
        if not tables:
            if not may_migrate:
                # Nothing to read: an empty file, or one being created by an ingest at this moment.
                raise NotReadyError(f"database {self.location} is empty; run `semdb ingest PATH --db {self.location}`")
            migrate.upgrade(connection)
            return
        missing = SEMDB_TABLES - tables
        revision = migrate.current_revision(connection) if "alembic_version" in tables else None
        marked = "settings" in tables and self._format_marker(connection) == "semdb"
        if revision not in migrate.known_revisions():
            if marked:
                raise SchemaVersionError(
                    f"{self.location} was made by a newer semdb (schema {revision}); upgrade semdb to open it"
                )
            kind = "an SQLite file" if self.dialect == "sqlite" else "a database"
            raise NotASemdbDatabaseError(
                f"{self.location} is not a semdb database ({kind} with tables: {', '.join(sorted(tables))}); "
                "semdb leaves it untouched"
            )
        # Tables a later revision adds are not missing from a database at an earlier one.
        order = migrate.known_revisions()
        missing = frozenset(
            table
            for table in missing
            if order.index(TABLE_ADDED_BY.get(table, order[0])) <= order.index(revision or order[0])
        )
        if missing:
            raise DatabaseDamagedError(
                f"{self.location} is damaged: semdb tables missing ({', '.join(sorted(missing))}); "
                "restore it from a backup"
            )
        if revision != migrate.head_revision():
            if not may_migrate:
                raise SchemaVersionError(
                    f"{self.location} has schema {revision}, this semdb reads {migrate.head_revision()}: "
                    f"upgrade it with `semdb migrate --db {self.location}` (ingest upgrades it too)",
                    older=True,
                )
            migrate.upgrade(connection)

    @staticmethod
    def _format_marker(connection: Connection) -> str | None:
        try:
            return connection.exec_driver_sql("SELECT value FROM settings WHERE key = 'format'").scalar()
        except DBAPIError:
            return None

    # --- transactions ---------------------------------------------------------------------------

    @contextmanager
    def reading(self) -> Iterator[Repository]:
        """A read-only snapshot of the database."""
        self._check_open()
        with self._translated(), self.engine.connect() as connection:
            if self.dialect == "postgresql":
                connection.execution_options(**postgres.READ_OPTIONS)
            with connection.begin():
                yield Repository(connection)

    @contextmanager
    def writing(self) -> Iterator[Repository]:
        """A transaction holding the database's write lock, committed at the end (rolled back on error)."""
        self._check_open()
        if not self.writable:
            raise ReadOnlyDatabaseError(f"{self.location} was opened for reading only")
        with self._translated(), self.engine.connect() as connection:
            if self.dialect == "postgresql":
                with connection.begin():
                    postgres.lock(
                        connection,
                        self.location,
                        timeout=self.lock_timeout,
                        notice_after=WAIT_NOTICE_SECONDS,
                        on_wait=self.on_wait,
                    )
                    yield Repository(connection)
                return
            self._lock(connection)
            with connection.begin():
                yield Repository(connection)

    def _lock(self, connection: Connection) -> None:
        """Begin the SQLite transaction holding the write lock, queueing behind other writers."""
        driver = connection.connection.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        started = time.monotonic()
        told = False
        driver.execute(f"PRAGMA busy_timeout = {LOCK_POLL_MS}")
        try:
            while True:
                try:
                    driver.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as error:
                    if "locked" not in str(error) and "busy" not in str(error):
                        raise
                waited = time.monotonic() - started
                if waited > self.lock_timeout:
                    raise DatabaseLockedError(
                        f"{self.location} stayed locked by another writer for {waited:.0f} s; try again when it is done"
                    )
                if not told and waited > WAIT_NOTICE_SECONDS and self.on_wait is not None:
                    self.on_wait(f"waiting for another ingest of {self.location} to commit its batch…")
                    told = True
        finally:
            driver.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """Turn database-engine errors users can meet into one-line :class:`SemdbError` messages."""
        try:
            yield
        except DBAPIError as error:
            translated = self._translate(error.orig)
            if translated is None:
                raise
            raise translated from None
        except sqlite3.Error as error:
            translated = self._translate(error)
            if translated is None:
                raise
            raise translated from None

    def _translate(self, error: BaseException | None) -> SemdbError | None:
        if self.dialect == "postgresql":
            return postgres.translate(error, self.location)
        message = str(error).lower()
        if "disk is full" in message or "database or disk is full" in message:
            return DiskFullError(
                f"no space left writing {self.location}; every batch committed before is kept: "
                "free some space and run the same command again"
            )
        if "readonly" in message or "read-only" in message:
            return ReadOnlyDatabaseError(
                f"{self.location} is read-only (check the permissions of the file and its folder, or the mount)"
            )
        if "malformed" in message or "not a database" in message or "disk i/o error" in message:
            return DatabaseDamagedError(self._damage_message(str(error)))
        if "database is locked" in message:
            return DatabaseLockedError(f"{self.location} is locked by another process; try again when it is done")
        if "unable to open database file" in message:
            return SemdbError(f"cannot open {self.location}: check that the file and its folder are accessible")
        # A value of the wrong type where semdb wrote another, e.g. text that is not UTF-8 in a code's place.
        if "no such table" in message or "no such column" in message or "could not decode to utf-8" in message:
            # sqlite3 quotes the undecodable bytes after "with text": garbage on the terminal, left out.
            what = _first_line(str(error)).split(" with text ", 1)[0]
            return DatabaseDamagedError(f"{self.location} is damaged: {what}; restore it from a backup")
        return None

    def _damage_message(self, fallback: str) -> str:
        verdict = _first_line(self.integrity_check(fallback))
        if verdict == "ok":
            # The file on disk is whole, yet this process read garbage: it was replaced (or restored)
            # under an open connection. Opening it afresh reads what is there now.
            return (
                f"{self.location} was replaced or changed by another program while this process had it open "
                f"(SQLite: {_first_line(fallback)}); run the command again (restart `semdb serve`)"
            )
        return (
            f"{self.location} is damaged: PRAGMA integrity_check says {verdict!r}; "
            "restore it from a backup (the image files themselves are untouched)"
        )

    # --- maintenance ----------------------------------------------------------------------------

    def integrity_check(self, fallback: str = "") -> str:
        """SQLite's ``PRAGMA integrity_check`` (``"ok"`` when healthy; ``"ok"`` elsewhere)."""
        if self.path is None:
            return "ok"
        try:
            connection = sqlite3.connect(f"file:{quote(os.fspath(self.path.absolute()))}?mode=ro", uri=True)
            try:
                rows = connection.execute("PRAGMA integrity_check").fetchall()
            finally:
                connection.close()
        except sqlite3.Error as error:
            return str(error) or fallback
        return "\n".join(str(row[0]) for row in rows)

    def size_bytes(self) -> int:
        """Bytes the database occupies on disk (with its write-ahead log); 0 where that is not known."""
        if self.dialect == "postgresql":
            with self.reading() as repository:
                return int(
                    repository.connection.exec_driver_sql("SELECT pg_database_size(current_database())").scalar() or 0
                )
        if self.path is None:
            return 0
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += self.path.with_name(self.path.name + suffix).stat().st_size
        return total

    def compact(self) -> bool:
        """Give free pages back to the file system (SQLite ``VACUUM``); False when another writer
        holds the lock (the space is then reused by later writes instead)."""
        if self.dialect != "sqlite" or not self.writable:
            return False
        self._check_open()
        with self._translated(), self.engine.connect() as connection:
            driver = connection.connection.driver_connection
            assert isinstance(driver, sqlite3.Connection)
            driver.execute(f"PRAGMA busy_timeout = {LOCK_POLL_MS}")
            try:
                driver.execute("VACUUM")
                driver.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError as error:
                if "locked" in str(error) or "busy" in str(error):
                    return False
                raise
            finally:
                driver.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return True

    def data_version(self) -> int | None:
        """A number that changes whenever a commit reaches the database file, from this process or
        another: SQLite's ``PRAGMA data_version`` (microseconds, no transaction), asked on a connection
        kept for nothing else, so that every commit is another connection's. None on PostgreSQL
        (no such counter: ask the store)."""
        if self.path is None:
            return None
        self._check_open()
        with self._version_lock, self._translated():
            if self._version_connection is None:
                self._version_connection = _connect_sqlite(self.path, read_only=True)
            row = self._version_connection.execute("PRAGMA data_version").fetchone()
            return int(row[0])

    def _check_open(self) -> None:
        # SQLAlchemy would quietly open new connections after dispose(): a closed store stays closed.
        if self.closed:
            raise InvalidArgumentError(f"database {self.location} is closed; open it again with semdb.connect()")

    def close(self) -> None:
        """Release the connections; the store answers nothing afterwards."""
        self.closed = True
        with self._version_lock:
            if self._version_connection is not None:
                self._version_connection.close()
                self._version_connection = None
        self.engine.dispose()


def _check_file(path: Path, display: str, *, write: bool, create: bool) -> bool:
    """Check the database file before SQLite opens it; True when it is to be created (missing or empty)."""
    if path.is_dir():
        raise NotASemdbDatabaseError(f"{display} is a folder, not a database file; give the path of a .semdb file")
    if not path.exists():
        if not create:
            raise DatabaseNotFoundError(
                f"database {display} does not exist; create it with `semdb ingest PATH --db {display}`"
            )
        if not path.parent.is_dir():
            raise InvalidArgumentError(f"folder {path.parent} does not exist; create it first")
        if not os.access(path.parent, os.W_OK):
            raise ReadOnlyDatabaseError(f"cannot create {display}: the folder {path.parent} is not writable")
        return True
    try:
        with open(path, "rb") as handle:
            header = handle.read(100)
    except OSError as error:
        raise SemdbError(f"cannot read {display}: {error.strerror or error}") from None
    if not header:
        if write and create:
            return True  # an empty file (e.g. from mktemp) is a new database
        raise NotReadyError(f"database {display} is an empty file; run `semdb ingest PATH --db {display}`")
    if not header.startswith(SQLITE_HEADER):
        raise NotASemdbDatabaseError(f"{display} is not a semdb database (not an SQLite file)")
    if len(header) < 100:
        raise DatabaseDamagedError(f"{display} is damaged: the file ends inside its SQLite header")
    if write and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)):
        raise ReadOnlyDatabaseError(
            f"{display} is read-only here (the file or its folder is not writable): "
            "ingest and migrate need to write it (search reads it as it is)"
        )
    return False


def _create_sqlite(path: Path) -> None:
    """Create a new semdb database at ``path`` atomically: readers and other creators see either no
    file or a complete schema, never an empty or half-made file."""
    descriptor, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".new", dir=path.parent)
    os.close(descriptor)
    try:
        engine = _sqlite_engine(Path(temporary), read_only=False)
        try:
            with engine.connect() as connection, connection.begin():
                migrate.upgrade(connection)
            with engine.connect() as connection:
                driver = connection.connection.driver_connection
                assert isinstance(driver, sqlite3.Connection)
                driver.execute("PRAGMA journal_mode = WAL")
        finally:
            engine.dispose()
        os.chmod(temporary, 0o666 & ~_umask())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process created it first: use theirs
        except OSError:
            # A file system without hard links: a rename is atomic too, with a narrow race between creators.
            if not path.exists():
                os.replace(temporary, path)
    finally:
        for leftover in (temporary, temporary + "-wal", temporary + "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
