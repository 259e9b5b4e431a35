"""Suite-wide setup: every test starts from a clean set of ``MRC_INGEST_*`` settings.

pydantic-settings reads the environment for any field a test does not set, and the
server tests pass the environment on to the processes they start; a stray
``MRC_INGEST_WORKERS`` or ``MRC_INGEST_DATABASE_URL`` on a developer's machine would
otherwise change what the suite tests. Test switches use the ``MRC_TEST_`` prefix.
"""

from __future__ import annotations

import os
import socket

#: real servers the tests start: PostgreSQL (postgres, pg_url) and SeaweedFS (seaweedfs)
pytest_plugins = ["tests.postgres", "tests.servers"]

SETTINGS_PREFIX = "MRC_INGEST_"

for _name in [n for n in os.environ if n.startswith(SETTINGS_PREFIX)]:
    del os.environ[_name]


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a server process: no inherited settings, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SETTINGS_PREFIX)}
    env.update(extra or {})
    return env


import pytest  # noqa: E402


@pytest.fixture
def figures_at_once(monkeypatch):
    """Apps made in this test recompute a session's figures after every change, so the
    test compares them right after it (the service coalesces them, 1 s by default: that
    has its own tests, tests/test_session_refresher.py)."""
    monkeypatch.setenv(SETTINGS_PREFIX + "SESSION_REFRESH_SECONDS", "0")


@pytest.fixture
def failpoint():
    """Arm fault points in this process for one test (service/failpoints.py)."""
    from service import failpoints

    yield failpoints.arm
    failpoints.disarm()


@pytest.fixture
def shared(tmp_path):
    """An allowed root of shared storage, empty."""
    folder = tmp_path / "shared"
    folder.mkdir()
    return folder


@pytest.fixture
def client(tmp_path, shared):
    """A service (TestClient) on a fresh data folder, registering inside ``shared``."""
    from tests.api_helpers import make_client

    with make_client(tmp_path / "data", allowed_roots=[shared]) as c:
        yield c


@pytest.fixture
def memory_folder(tmp_path):
    """A fresh folder on a tmpfs (/dev/shm) where there is one, else under tmp_path:
    for tests whose subject is not durability, where fsync would be most of the time."""
    import shutil
    import tempfile
    from pathlib import Path

    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="mrc-test-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
