"""PostgreSQL behind the store: the engine, the write lock, read snapshots and one-line errors.

A database given as a URL (``postgresql+psycopg://user:password@host:port/name``) holds exactly the
tables an SQLite file holds, made by the same Alembic revisions; everything here is what differs:

* the write lock is a transaction-level advisory lock (``pg_advisory_xact_lock``) taken as the first
  statement of every write transaction — where SQLite takes ``BEGIN IMMEDIATE`` — so writers queue
  in the server's lock queue and every check a writer makes inside its transaction (READ COMMITTED:
  each statement sees every commit made before it) still holds at commit: the codec is trained once,
  contents and paths are never inserted twice;
* a read is one REPEATABLE READ, read-only transaction: one snapshot, never half a batch;
* connection and server errors become one-line :class:`~semdb.errors.SemdbError` messages (server
  unreachable, credentials refused, no such database, permission denied, disk full).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable

from sqlalchemy import Connection, Engine, create_engine, make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from semdb.errors import (
    DatabaseDamagedError,
    DatabaseLockedError,
    DatabaseNotFoundError,
    DiskFullError,
    InvalidArgumentError,
    ReadOnlyDatabaseError,
    SemdbError,
)

DRIVER = "postgresql+psycopg"
# One advisory-lock key for semdb's write lock (advisory locks are scoped to one database already);
# derived from a name so that it does not collide with small integers other applications pick.
WRITE_LOCK_KEY = int.from_bytes(hashlib.sha256(b"semdb write lock").digest()[:8], "big", signed=True)
CONNECT_TIMEOUT_SECONDS = 10
# What a reading transaction asks for: one snapshot for all its statements, and no writes.
READ_OPTIONS = {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
INSTALL_HINT = "install the PostgreSQL driver: pip install 'semdb[postgres]' (psycopg)"


def parse_url(location: str) -> URL:
    """The SQLAlchemy URL of ``location``, with psycopg as the driver of a plain ``postgresql://``.

    Only PostgreSQL is served by URL (SQLite databases are files); anything else is refused in one
    line naming the accepted forms.
    """
    try:
        url = make_url(location)
    except ValueError:  # SQLAlchemy reads the port as an int: "HOST:notaport"
        hidden = re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", location)
        raise InvalidArgumentError(
            f"{hidden}: the port is not a number; give postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE"
        ) from None
    except ArgumentError:
        raise InvalidArgumentError(
            f"{location!r} is neither a file path nor a database URL; "
            "give a .semdb file or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE"
        ) from None
    if url.port is not None and not 0 < url.port < 65536:
        raise InvalidArgumentError(f"{display_url(location)} names port {url.port}; a port is 1..65535")
    if url.drivername == "postgres":  # libpq's own spelling of the scheme
        url = url.set(drivername="postgresql")
    if url.get_backend_name() != "postgresql":
        raise InvalidArgumentError(
            f"semdb stores its data in SQLite files or in PostgreSQL, not {url.get_backend_name()}; "
            "give a .semdb file or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE"
        )
    if url.drivername == "postgresql":
        url = url.set(drivername=DRIVER)
    return url


def display_url(location: str) -> str:
    """``location`` as it may be printed: the password replaced by ``***``."""
    try:
        return make_url(location).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return location


def server_identity(location: str) -> str:
    """Host, port, database and user of a URL (no password): which server database it names."""
    url = parse_url(location)
    return f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}?user={url.username or ''}"


def create_server_engine(location: str) -> Engine:
    """An engine for the PostgreSQL database at ``location`` (nothing is connected yet)."""
    url = parse_url(location)
    try:
        return create_engine(
            url,
            # An unreachable host fails in seconds instead of the operating system's minutes.
            connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS, "application_name": "semdb"},
            pool_pre_ping=True,
        )
    except (ModuleNotFoundError, NoSuchModuleError):
        raise InvalidArgumentError(f"cannot open {display_url(location)}: {INSTALL_HINT}") from None


def lock(
    connection: Connection,
    location: str,
    *,
    timeout: float,
    notice_after: float,
    on_wait: Callable[[str], None] | None,
) -> None:
    """Take semdb's write lock in the transaction just begun on ``connection``, queueing behind other writers.

    The lock is released by the server when the transaction ends (commit, rollback or a lost
    connection: a killed writer never leaves it held). A writer still waiting after
    ``notice_after`` seconds is told so through ``on_wait``; after ``timeout`` seconds it gives up.
    """
    started = time.monotonic()
    waits = [notice_after, max(0.001, timeout - notice_after)] if on_wait is not None else [timeout]
    for number, wait in enumerate(waits):
        connection.exec_driver_sql(f"SET LOCAL lock_timeout = {max(1, int(wait * 1000))}")
        try:
            # A savepoint, so that a wait cut short by lock_timeout leaves the transaction usable.
            with connection.begin_nested():
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITE_LOCK_KEY})
        except DBAPIError as error:
            if getattr(error.orig, "sqlstate", None) != "55P03":  # lock_not_available
                raise
            if number == len(waits) - 1:
                raise DatabaseLockedError(
                    f"{location} stayed locked by another writer for {time.monotonic() - started:.0f} s; "
                    "try again when it is done"
                ) from None
            assert on_wait is not None
            on_wait(f"waiting for another ingest of {location} to commit its batch…")
            continue
        connection.exec_driver_sql("SET LOCAL lock_timeout = 0")
        return


def translate(error: BaseException | None, location: str) -> SemdbError | None:
    """A one-line error for what a user can meet on a PostgreSQL server; None for anything else (a bug)."""
    if error is None:
        return None
    message = str(error).strip()
    lower = message.lower()
    sqlstate = getattr(error, "sqlstate", None)
    detail = _first_line(message)
    refused = ("password authentication failed", "no pg_hba.conf", "password is required")
    unknown_role = 'role "' in lower and "does not exist" in lower
    if sqlstate in ("28P01", "28000") or unknown_role or any(part in lower for part in refused):
        return SemdbError(
            f"the PostgreSQL server refused the credentials for {location} ({_after_colon(detail)}); "
            "check the user name and password in the URL"
        )
    if sqlstate == "3D000" or ("database" in lower and "does not exist" in lower):
        name = _database_name(location)
        return DatabaseNotFoundError(
            f"database {name!r} does not exist on the server of {location}; create it (createdb {name}) "
            "and run `semdb ingest PATH --db URL`"
        )
    if sqlstate is None and (
        "connection failed" in lower
        or "connection refused" in lower
        or "could not translate host name" in lower
        or "timeout expired" in lower
        or "server closed the connection" in lower
        or "connection is lost" in lower
        or "no such file or directory" in lower
    ):
        return SemdbError(
            f"cannot reach the PostgreSQL server of {location} ({_after_colon(detail)}); "
            "check the host and port in the URL and that the server is running"
        )
    if sqlstate in ("57P01", "57P02", "57P03"):
        return SemdbError(f"the PostgreSQL server of {location} is not accepting work now ({detail}); try again")
    if sqlstate == "42501":
        return ReadOnlyDatabaseError(
            f"the PostgreSQL user of {location} may not do this ({detail}); grant it the rights or use another user"
        )
    if sqlstate == "25006":
        return ReadOnlyDatabaseError(f"{location} is read-only here ({detail})")
    if sqlstate in ("53100", "53200") or "no space left" in lower:
        return DiskFullError(
            f"the PostgreSQL server of {location} ran out of space ({detail}); every batch committed before "
            "is kept: free some space and run the same command again"
        )
    if sqlstate in ("42P01", "42703"):
        return DatabaseDamagedError(f"{location} is damaged: {detail}")
    if sqlstate == "55P03":
        return DatabaseLockedError(f"{location} is locked by another writer; try again when it is done")
    return None


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else text


def _after_colon(detail: str) -> str:
    """psycopg's 'connection failed: connection to server at "h", port 1 failed: Connection refused'
    → its last, telling part."""
    return detail.rsplit(": ", 1)[-1] if ": " in detail else detail


def _database_name(location: str) -> str:
    try:
        return make_url(location).database or ""
    except (ArgumentError, ValueError):
        return ""
