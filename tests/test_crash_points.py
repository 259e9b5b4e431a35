"""The crash-point table (ARCHITECTURE.md, "Crash points"), run for real.

For each way a movie arrives (a PUT, the last tus PATCH, a registration) and each named
fault point of the commit protocol, a real ``mrc-ingest serve`` is started with that
point armed to ``kill`` (SIGKILL at exactly that step, no timing involved), the arrival
is driven until the process dies, the service is started again, and the client does what
its protocol does (a PUT is sent again; a tus client asks HEAD and sends what is missing;
a registration was accepted and is not sent again). Then, with every writer stopped, one
``mrc-ingest recover`` sweeps, and :mod:`tests.invariants` -- plain SQL and the store's
own listing, no service code -- checks that nothing the client was told is complete is
lost, nothing is duplicated, and nothing is left that no row names. On SQLite + a data
folder, and on PostgreSQL + SeaweedFS; there also with the catalog stopped, and the store
failing, at a step boundary.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.api_helpers import run_recover, start_server
from tests.invariants import Place, Sent, check, sha256_of, wait_until
from tests.reference import counting_movie, write_raw_mrc

TUS = {"Tus-Resumable": "1.0.0"}
COMMIT_POINTS = ("commit.before_store", "commit.after_store", "commit.after_commit",
                 "commit.after_release")
CASES = [(path, point) for path in ("put", "tus", "registration") for point in COMMIT_POINTS] \
    + [("tus", "tus.after_settle"), ("put", "commit.answer_lost")]
#: on PostgreSQL + SeaweedFS every point once, each arrival at least once (the whole
#: table there would double the suite's time for the same code paths)
REMOTE_CASES = [("tus", "commit.before_store"), ("put", "commit.after_store"),
                ("tus", "commit.after_commit"), ("registration", "commit.after_release"),
                ("tus", "tus.after_settle"), ("tus", "commit.answer_lost")]
MATRIX = [("sqlite+folder", *case) for case in CASES] + \
    [("postgres+s3", *case) for case in REMOTE_CASES]
SHAPE = (6, 256, 384)  # 4-bit: 6 frames of 48 KiB, 288 KiB in all


class Deployment:
    """One deployment's settings, started and killed as whole processes."""

    def __init__(self, root: Path, env: dict[str, str], place: Place):
        self.root, self.env, self.place = root, env, place
        self.shared = root / "shared"
        self.shared.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def start(self, fault: str | None = None) -> str:
        env = {**self.env, **({"MRC_INGEST_FAULT": fault} if fault else {})}
        self.proc, base = start_server(self.root / "data", env=env)
        return base

    def died(self, timeout: float = 30.0) -> bool:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout) == -signal.SIGKILL
        except subprocess.TimeoutExpired:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None

    def recover(self) -> str:
        """``mrc-ingest recover`` once, every writer stopped: sweep at age 0."""
        return run_recover(self.root / "data", self.env)


def local_deployment(root: Path) -> Deployment:
    env = {"MRC_INGEST_ALLOWED_ROOTS": f'["{root / "shared"}"]',
           "MRC_INGEST_RECOVERY_SECONDS": "1", "MRC_INGEST_WORKERS": "2"}
    data = root / "data"
    return Deployment(root, env, Place(f"sqlite:///{data.resolve() / 'catalog.sqlite3'}",
                                       data_dir=data))


def remote_deployment(root: Path, postgres, seaweedfs) -> Deployment:
    prefix = f"c{os.urandom(4).hex()}"
    database = postgres.create_database()
    env = {"MRC_INGEST_DATABASE_URL": database,
           "MRC_INGEST_STORAGE_URL": seaweedfs.url(prefix),
           "MRC_INGEST_S3_ENDPOINT_URL": seaweedfs.endpoint_url,
           "MRC_INGEST_S3_PART_BYTES": str(5 << 20),
           "MRC_INGEST_ALLOWED_ROOTS": f'["{root / "shared"}"]',
           "MRC_INGEST_RECOVERY_SECONDS": "1", "MRC_INGEST_WORKERS": "2", **seaweedfs.env}
    return Deployment(root, env, Place(database, bucket=seaweedfs.bucket, prefix=prefix + "/",
                                       s3=seaweedfs.client()))


@pytest.fixture
def deployment(request, tmp_path):
    if request.param == "sqlite+folder":
        chosen = local_deployment(tmp_path)
    else:
        chosen = remote_deployment(tmp_path, request.getfixturevalue("postgres"),
                                   request.getfixturevalue("seaweedfs"))
    yield chosen
    chosen.stop()


def a_movie(folder: Path, seed: int) -> tuple[Path, Sent]:
    data = counting_movie(SHAPE)
    data[0, 0, :8] = seed % 16  # each case its own bytes
    path = write_raw_mrc(folder / f"movie{seed}.mrc", data, 101)
    return path, Sent(path.name, sha256_of(path.read_bytes()), pixels=data)


# -- the arrivals, as their clients drive them --------------------------------------------

def put(base: str, path: Path) -> httpx.Response | None:
    """One PUT; None when the server died under it."""
    try:
        return httpx.put(f"{base}/v1/uploads/{path.name}", content=path.read_bytes(),
                         timeout=60)
    except httpx.TransportError:
        return None


def tus_create(base: str, path: Path) -> str:
    created = httpx.post(f"{base}/v1/tus/", headers={
        **TUS, "Upload-Length": str(path.stat().st_size),
        "Upload-Metadata": "filename " + base64.b64encode(path.name.encode()).decode()})
    assert created.status_code == 201, created.text
    return created.headers["location"]


def tus_send(base: str, location: str, raw: bytes, step: int = 120_000) -> bool:
    """What a tus client does: HEAD for the offset, PATCH from there in pieces, until the
    server says every byte is in. False when the server died under it."""
    try:
        offset = int(httpx.head(f"{base}{location}", headers=TUS).headers["upload-offset"])
        while offset < len(raw):
            response = httpx.patch(f"{base}{location}", content=raw[offset:offset + step],
                                   headers={**TUS, "Upload-Offset": str(offset),
                                            "Content-Type": "application/offset+octet-stream"},
                                   timeout=60)
            if response.status_code != 204:
                return False
            offset = int(response.headers["upload-offset"])
        return True
    except httpx.TransportError:
        return False


def tus_told_complete(base: str, location: str, length: int) -> bool:
    head = httpx.head(f"{base}{location}", headers=TUS)
    return head.status_code == 200 and int(head.headers["upload-offset"]) == length


def dataset_of(place: Place, sha: str) -> dict | None:
    rows = [r for r in place.datasets() if r["sha256"] == sha]
    return rows[0] if rows else None


@pytest.mark.parametrize("deployment,path_kind,point", MATRIX, indirect=["deployment"],
                         ids=[f"{d}-{p}-{q}" for d, p, q in MATRIX])
def test_kill_at_a_step_boundary_loses_nothing(deployment, path_kind, point):
    seed = [(p, q) for _, p, q in MATRIX].index((path_kind, point))  # its own bytes
    movie, sent = a_movie(deployment.shared if path_kind == "registration"
                          else deployment.root, seed)
    raw = movie.read_bytes()
    base = deployment.start(fault=f"{point}:kill")
    location = None
    if path_kind == "put":
        assert put(base, movie) is None, "the server answered instead of dying"
    elif path_kind == "tus":
        location = tus_create(base, movie)
        assert not tus_send(base, location, raw), "the server answered instead of dying"
    else:
        accepted = httpx.post(f"{base}/v1/registrations", json={"path": str(movie)})
        assert accepted.status_code == 202, accepted.text
        sent.told_complete = True  # accepted: the service now owes a dataset
    assert deployment.died(), f"the server did not die at {point}"

    base = deployment.start()  # no fault: as after a real crash and restart
    if path_kind == "put":  # a client that got no answer sends again
        again = put(base, movie)
        assert again is not None and again.status_code in (200, 201), again and again.text
        sent.told_complete = True
    elif path_kind == "tus":
        assert tus_send(base, location, raw)
        sent.told_complete = tus_told_complete(base, location, len(raw))
        assert sent.told_complete
    wait_until(lambda: (dataset_of(deployment.place, sent.sha256) or {}).get("status")
               == "ready", 60, f"a ready dataset after {path_kind} killed at {point}")
    deployment.stop()
    deployment.recover()
    base = deployment.start()
    assert check(deployment.place, [sent], base_url=base) == []


def test_every_case_of_the_table_is_a_real_point():
    from service.failpoints import POINTS

    assert {point for _, point in CASES} == set(POINTS)
    assert {point for _, point in REMOTE_CASES} == set(POINTS)


# -- the catalog and the store away at a step boundary (PostgreSQL + SeaweedFS) ------------

@pytest.fixture
def remote(tmp_path, postgres, seaweedfs):
    chosen = remote_deployment(tmp_path, postgres, seaweedfs)
    yield chosen
    chosen.stop()


def test_catalog_away_between_stored_and_committed(remote, postgres, tmp_path):
    """PostgreSQL stops while the last PATCH's pass has stored and read back its objects:
    the commit cannot happen, the client gets an error, every byte stays; once the
    catalog is back, recovery commits the upload's dataset without the client doing
    more than HEAD."""
    pause = tmp_path / "pause"
    pause.mkdir()
    movie, sent = a_movie(remote.root, 101)
    raw = movie.read_bytes()
    base = remote.start(fault=f"commit.after_store:pause={pause}")
    location = tus_create(base, movie)
    import threading
    result: dict = {}
    client = threading.Thread(target=lambda: result.update(ok=tus_send(base, location, raw)))
    client.start()
    wait_until(lambda: (pause / "commit.after_store.reached").exists(), 60, "the pause")
    postgres.stop()
    try:
        (pause / "commit.after_store.go").touch()
        client.join(90)
        assert result.get("ok") is False  # the last PATCH was answered with an error
    finally:
        postgres.start()
    wait_until(lambda: tus_told_complete(base, location, len(raw)), 60, "HEAD after")
    sent.told_complete = True
    wait_until(lambda: (dataset_of(remote.place, sent.sha256) or {}).get("status") == "ready",
               60, "recovery once the catalog is back")
    remote.stop()
    remote.recover()
    base = remote.start()
    assert check(remote.place, [sent], base_url=base) == []


def test_store_failing_between_proof_and_stored(remote):
    """The store refuses at the first write of the stored step (an injected outage: the
    named point raises what an unreachable store raises): a PUT gets 503 and nothing is
    kept; the same PUT once the store answers is ready and whole."""
    movie, sent = a_movie(remote.root, 102)
    base = remote.start(fault="commit.before_store:unavailable@once")
    refused = put(base, movie)
    assert refused is not None and refused.status_code == 503, refused and refused.text
    again = put(base, movie)
    assert again is not None and again.status_code == 201, again.text
    sent.told_complete = True
    remote.stop()
    remote.recover()
    base = remote.start()
    assert check(remote.place, [sent], base_url=base) == []
