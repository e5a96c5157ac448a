"""Real servers for the tests: a PostgreSQL cluster and a local Ray cluster, each started once per session.

PostgreSQL: ``$SEMDB_TEST_POSTGRES_URL`` (a server URL whose user may create databases) when set;
otherwise the project starts its own throw-away cluster with Debian's ``initdb``/``pg_ctl`` into a
temporary folder, on a free localhost port (as the ``postgres`` user when the tests run as root:
PostgreSQL refuses to run as root), and stops it at the end. Each test gets a new, empty database.

When a server cannot be started the tests that need it fail and say why: CI must never pass by
skipping them. On a developer machine without PostgreSQL or Ray, ``SEMDB_TEST_ALLOW_NO_SERVERS=1``
turns those failures into skips (off by default).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

POSTGRES_URL_ENV = "SEMDB_TEST_POSTGRES_URL"
ALLOW_NO_SERVERS_ENV = "SEMDB_TEST_ALLOW_NO_SERVERS"
BACKENDS = ["sqlite", "postgresql"]
PASSWORD = "semdb-test"


def _unavailable(what: str, why: str) -> None:
    """Fail (or, when the developer allowed it, skip) a test whose server cannot be had."""
    message = f"{what} is not available: {why}"
    if os.environ.get(ALLOW_NO_SERVERS_ENV) == "1":
        pytest.skip(message)
    pytest.fail(f"{message} (set {ALLOW_NO_SERVERS_ENV}=1 to skip these tests on a machine without it)")


def _postgres_bin(name: str) -> str | None:
    """Path of a PostgreSQL server program: on PATH, else Debian's /usr/lib/postgresql/VERSION/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """A PostgreSQL server the tests may create databases on."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")

    def url_of(self, name: str) -> str:
        """The URL of database ``name`` on this server."""
        return f"{self.base_url}/{name}"

    def create_database(self) -> str:
        """A new, empty database; returns its URL."""
        name = f"semdb_test_{uuid.uuid4().hex[:12]}"
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url_of(name)

    def execute(self, statement: str, database: str = "postgres") -> None:
        """Run one statement outside a transaction (CREATE DATABASE cannot run inside one)."""
        import psycopg

        from semdb.store.postgres import parse_url

        url = parse_url(self.url_of(database))
        with psycopg.connect(
            host=url.host, port=url.port, user=url.username, password=url.password, dbname=url.database, autocommit=True
        ) as connection:
            connection.execute(statement)  # type: ignore[arg-type]


@contextlib.contextmanager
def own_postgres() -> Iterator[PostgresServer]:
    """Start a throw-away cluster (see the module docstring); stop and delete it afterwards."""
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise RuntimeError("initdb/pg_ctl not found (install Debian's postgresql package: apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="semdb-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root and there is no postgres user to run the server as") from None
        os.chown(folder, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()
    # No fsync: a test cluster's durability does not matter, its start-up and commits get faster.
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"

    def run(*command: str) -> None:
        result = subprocess.run([*run_as, *command], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = (folder / "log").read_text(errors="replace")[-2000:] if (folder / "log").exists() else ""
            raise RuntimeError(
                f"{' '.join(command[:2])} failed: {result.stderr.strip() or result.stdout.strip()} {log}"
            )

    try:
        # Password authentication over TCP, as a real server has: wrong credentials can be tested.
        password_file = folder / "password"
        password_file.write_text(PASSWORD + "\n")
        if run_as:
            os.chown(password_file, user.pw_uid, user.pw_gid)
        auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={password_file}"]
        run(initdb, "-D", str(data), *auth, "-U", "postgres", "-E", "UTF8", "--no-sync")
        run(pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "-t", "60", "start")
        try:
            yield PostgresServer(f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:{port}")
        finally:
            run(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer | str]:
    """The session's PostgreSQL server, or the reason there is none (reported by ``postgres_url``)."""
    given = os.environ.get(POSTGRES_URL_ENV)
    if given:
        yield PostgresServer(given)
        return
    try:
        import psycopg  # noqa: F401
    except ImportError:
        yield "psycopg is not installed (pip install -e '.[dev]')"
        return
    try:
        with own_postgres() as server:
            yield server
    except RuntimeError as error:
        yield str(error)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer | str) -> str:
    """The URL of a new, empty PostgreSQL database."""
    if isinstance(postgres_server, str):
        _unavailable("PostgreSQL", postgres_server)
    assert isinstance(postgres_server, PostgresServer)
    return postgres_server.create_database()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend in turn: ``sqlite`` and ``postgresql``."""
    return str(request.param)


@pytest.fixture
def database_location(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """Where a new database goes on ``backend``: a file path, or the URL of a new, empty PostgreSQL database."""
    if backend == "sqlite":
        return str(tmp_path / "db.semdb")
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A local Ray cluster with 2 CPUs, started once per session; workers import this checkout and tests/."""
    try:
        import ray
    except ImportError:
        yield None
        return
    tests = Path(__file__).resolve().parent
    path = os.pathsep.join([str(tests.parent), str(tests), *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}},
    )
    try:
        yield None
    finally:
        ray.shutdown()


@pytest.fixture
def ray_local(ray_cluster: None) -> None:
    """The session's Ray cluster (a failure saying why when Ray is not installed)."""
    try:
        import ray
    except ImportError:
        _unavailable("Ray", "ray is not installed (pip install -e '.[dev]')")
        return
    if not ray.is_initialized():
        _unavailable("Ray", "the local cluster did not start")
