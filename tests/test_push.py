"""mrc-ingest push / ls / status against a real server: movies and sidecars go up
resumably, what the server has is skipped by SHA-256, an interrupted push resumes from
the server's offset, --watch sends a movie once it is complete, errors are one line."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import threading
import time

import httpx
import pytest
from tusclient import client as tus_client
from tusclient.uploader import Uploader

from service.client import Pusher, Server, collect, state_file
from tests.api_helpers import start_server, wait_job
from tests.reference import counting_movie, write_raw_mrc
from tests.test_acquisition import MDOC


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    proc, base = start_server(tmp_path / "data")
    yield base
    proc.terminate()
    proc.wait()


@pytest.fixture
def folder(tmp_path):
    scope = tmp_path / "scope"
    scope.mkdir()
    for i in range(2):
        write_raw_mrc(scope / f"movie{i}.mrc", counting_movie((8, 128, 128), seed=i), 101)
    (scope / "movie0.mrc.mdoc").write_text(MDOC)
    (scope / "notes.txt").write_text("not a movie")
    return scope


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_push_a_folder_then_skip_what_is_there(server, folder):
    out = io.StringIO()
    pusher = Pusher(Server(server), chunk=64 << 10, out=out)
    for path in collect([folder]):
        pusher.push(path)
    with httpx.Client(base_url=server) as c:
        items = c.get("/v1/datasets").json()["items"]
        assert sorted(d["name"] for d in items) == ["movie0.mrc", "movie1.mrc"]
        by_name = {d["name"]: d for d in items}
        assert by_name["movie0.mrc"]["sha256"] == sha(folder / "movie0.mrc")
        job = c.get(f"/v1/datasets/{by_name['movie0.mrc']['id']}").json()["jobs"][0]
        wait_job(c, job["id"])
        detail = c.get(f"/v1/datasets/{by_name['movie0.mrc']['id']}").json()
        assert detail["acquisition"]["voltage_kv"] == 300  # the .mdoc went along
    again = io.StringIO()
    Pusher(Server(server), out=again).push(folder / "movie1.mrc")
    assert "already on the server" in again.getvalue()


def test_interrupted_push_resumes_from_the_server_offset(server, folder, monkeypatch):
    movie = folder / "movie1.mrc"
    digest = sha(movie)
    # A previous run got half-way: the server holds part, the client remembers the URL.
    uploader = tus_client.TusClient(f"{server}/v1/tus/").uploader(
        str(movie), chunk_size=16 << 10, metadata={"filename": movie.name})
    uploader.upload(stop_at=movie.stat().st_size // 2)
    state_file().parent.mkdir(parents=True, exist_ok=True)
    state_file().write_text(f'{{"{digest}": "{uploader.url}"}}')
    patches = []
    real_upload_chunk = Uploader.upload_chunk

    def counting(self):
        patches.append(self.offset)
        return real_upload_chunk(self)
    monkeypatch.setattr(Uploader, "upload_chunk", counting)
    dataset = Pusher(Server(server), chunk=16 << 10, out=io.StringIO()).push(movie)
    assert patches[0] >= movie.stat().st_size // 2  # resumed, not restarted
    assert dataset["sha256"] == digest
    assert state_file().read_text() == "{}"  # forgotten once done


def test_watch_sends_a_movie_once_it_is_complete(server, tmp_path):
    watched = tmp_path / "incoming"
    watched.mkdir()
    stop = threading.Event()
    out = io.StringIO()
    pusher = Pusher(Server(server), out=out)
    thread = threading.Thread(target=pusher.watch, args=([watched], 0.2, stop.is_set))
    thread.start()
    try:
        source = write_raw_mrc(tmp_path / "m.mrc", counting_movie((4, 64, 64)), 101)
        raw = source.read_bytes()
        growing = watched / "late.mrc"
        with open(growing, "wb") as f:  # written in pieces, like a camera does
            for i in range(0, len(raw), 4096):
                f.write(raw[i:i + 4096])
                f.flush()
                time.sleep(0.01)
        deadline = time.monotonic() + 20
        while "late.mrc: uploaded" not in out.getvalue():
            assert time.monotonic() < deadline, out.getvalue()
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join()
    with httpx.Client(base_url=server) as c:
        items = c.get("/v1/datasets").json()["items"]
    assert [d["sha256"] for d in items] == [hashlib.sha256(raw).hexdigest()]


def test_cli_ls_status_and_one_line_errors(server, folder, tmp_path):
    env_cmd = [sys.executable, "-m", "service.cli"]
    push = subprocess.run(env_cmd + ["push", str(folder / "movie0.mrc"), "--server", server],
                          capture_output=True, text=True)
    assert push.returncode == 0, push.stderr
    ls = subprocess.run(env_cmd + ["ls", "--server", server], capture_output=True, text=True)
    assert ls.returncode == 0 and "movie0.mrc" in ls.stdout
    dataset_id = ls.stdout.split()[0]
    status = subprocess.run(env_cmd + ["status", dataset_id, "--server", server],
                            capture_output=True, text=True)
    assert status.returncode == 0 and f'"id": "{dataset_id}"' in status.stdout
    missing = subprocess.run(env_cmd + ["status", "nope", "--server", server],
                             capture_output=True, text=True)
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "HTTP 404" in missing.stderr
    down = subprocess.run(env_cmd + ["ls", "--server", "http://127.0.0.1:9"],
                          capture_output=True, text=True)
    assert down.returncode == 1 and down.stderr.startswith("mrc-ingest: error: cannot reach")
    nothing = subprocess.run(env_cmd + ["push", str(tmp_path / "none"), "--server", server],
                             capture_output=True, text=True)
    assert nothing.returncode == 1 and "no such file or folder" in nothing.stderr
