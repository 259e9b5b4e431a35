"""A real PostgreSQL for the tests: a throwaway cluster made with ``initdb`` and run with
``pg_ctl`` on a free port (Unix socket in its own folder, fsync off), one fresh database
per test, stopped and removed afterwards. Debian's ``postgresql`` package provides the
binaries (``.ci/run`` installs it where missing); as root the cluster runs as the
``postgres`` user, which PostgreSQL requires.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import free_port

REQUIRE = bool(os.environ.get("MRC_TEST_REQUIRE_SERVERS"))


def pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


class Postgres:
    """One cluster: ``url(db)`` for SQLAlchemy, ``create_database()``, ``stop``/``start``
    (a test may take the server away for a while)."""

    def __init__(self, folder: Path, durable: bool = False):
        self.folder, self.durable = folder, durable
        self.data = folder / "pgdata"
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        command = list(argv)
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True)
        if check and done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n"
                               f"{done.stdout}{done.stderr}")
        return done

    def init(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run(pg_binary("initdb"), "-D", str(self.data), "-A", "trust", "--no-sync",
                  "-U", "postgres", "-E", "UTF8", "--locale", "C")

    def start(self) -> None:
        options = (f"-k {self.folder} -p {self.port} -c listen_addresses=127.0.0.1 "
                   "-c max_connections=200")
        if not self.durable:  # tests: a crash of this cluster loses nothing we need
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(pg_binary("pg_ctl"), "-D", str(self.data), "-o", options, "-w",
                  "-l", str(self.folder / "server.log"), "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(pg_binary("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop",
                  check=False)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; its SQLAlchemy URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres "
                             "dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


def start_postgres(folder: Path | None = None, durable: bool = False) -> Postgres:
    """A running cluster in ``folder`` (default: a new folder under /tmp, which the
    ``postgres`` user can reach; pytest's own temporary folders are private to root).
    ``durable``: fsync and synchronous commits on, as in production (benchmarks)."""
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="mrc-ingest-pg-"))
        folder.chmod(0o755)
    server = Postgres(folder, durable)
    server.init()
    server.start()
    return server


def available() -> bool:
    return pg_binary("initdb") is not None and pg_binary("pg_ctl") is not None


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    if not available():
        if REQUIRE:
            pytest.fail("PostgreSQL's initdb/pg_ctl are not installed (Debian: postgresql)")
        pytest.skip("PostgreSQL is not installed (Debian: postgresql)")
    started = time.monotonic()
    server = start_postgres()
    server.startup_seconds = time.monotonic() - started
    yield server
    server.remove()


@pytest.fixture
def pg_url(postgres) -> str:
    """A fresh database on the session's cluster, for one test."""
    return postgres.create_database()
