"""mrc-ingest push / ls / status against a real server: movies and sidecars go up
resumably, what the server has ready is skipped by SHA-256 (a failed dataset's bytes go
up again, a rejected one's are that verdict, one in flight is waited for), each movie is
followed to its final state and reported in one line, the exit status is 1 unless every
file ended ready, an interrupted push resumes from the server's offset, --watch sends a
movie once it is complete, errors are one line."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import pytest
from tusclient import client as tus_client
from tusclient.uploader import Uploader

from service.auth import hash_token
from service.client import Outcome, Pusher, Server, collect, state_file
from tests.api_helpers import start_server, wait_job
from tests.reference import counting_movie, synthetic, write_raw_mrc
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


def push_cli(server, *args, env=None):
    return subprocess.run([sys.executable, "-m", "service.cli", "push", *map(str, args),
                           "--server", server], capture_output=True, text=True, env=env)


def truncated_movie(path):
    full = write_raw_mrc(path.with_name("full.mrc"), synthetic(2, (4, 32, 32)), 2)
    path.write_bytes(full.read_bytes()[:-1000])
    full.unlink()
    return path


def set_status(data_dir, dataset_id, status, error=None):
    """What a dataset becomes on the server, written straight into its catalog row."""
    with sqlite3.connect(data_dir / "catalog.sqlite3") as db:
        db.execute("UPDATE datasets SET status = ? WHERE id = ?", (status, dataset_id))
        if error is not None:
            db.execute("UPDATE datasets SET info = json_set(info, '$.error', json(?)) "
                       "WHERE id = ?", (json.dumps(error), dataset_id))
    db.close()


def datasets(server):
    with httpx.Client(base_url=server) as c:
        return c.get("/v1/datasets").json()["items"]


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
    lines = out.getvalue().splitlines()
    assert f"movie0.mrc: ready as dataset {by_name['movie0.mrc']['id']}" in lines
    assert f"movie1.mrc: ready as dataset {by_name['movie1.mrc']['id']}" in lines
    assert f"movie0.mrc.mdoc: sidecar stored with dataset {by_name['movie0.mrc']['id']}" \
        in lines
    again = io.StringIO()
    outcome = Pusher(Server(server), out=again).push(folder / "movie1.mrc")
    assert again.getvalue() == (f"movie1.mrc: ready as dataset {by_name['movie1.mrc']['id']}"
                                "; already on the server, not sent again\n")
    assert outcome.state == "ready" and not outcome.sent
    assert len(datasets(server)) == 2


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
    outcome = Pusher(Server(server), chunk=16 << 10, out=io.StringIO()).push(movie)
    assert patches[0] >= movie.stat().st_size // 2  # resumed, not restarted
    assert outcome.state == "ready" and outcome.sent
    assert outcome.dataset["sha256"] == digest
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
        while "late.mrc: ready as dataset" not in out.getvalue():
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


def test_a_ready_dataset_is_skipped_by_the_cli(server, folder):
    first = push_cli(server, folder / "movie0.mrc")
    assert first.returncode == 0, first.stderr
    [dataset] = datasets(server)
    assert first.stderr.splitlines() == [f"movie0.mrc: ready as dataset {dataset['id']}",
                                         "push: 1 ready, 0 rejected, 0 failed"]
    again = push_cli(server, folder / "movie0.mrc")
    assert again.returncode == 0, again.stderr
    assert again.stderr.splitlines() == [
        f"movie0.mrc: ready as dataset {dataset['id']}; already on the server, not sent "
        "again", "push: 1 ready, 0 rejected, 0 failed"]
    assert [d["id"] for d in datasets(server)] == [dataset["id"]]


def test_a_failed_dataset_is_sent_again_and_ends_ready(server, folder, tmp_path):
    movie = folder / "movie0.mrc"
    first = Pusher(Server(server), out=io.StringIO()).push(movie)
    set_status(tmp_path / "data", first.dataset_id, "failed",
               {"error": "internal_error", "detail": "the disk went away"})
    out = io.StringIO()
    again = Pusher(Server(server), out=out).push(movie)
    assert again.state == "ready" and again.sent and again.dataset_id != first.dataset_id
    assert out.getvalue() == f"movie0.mrc: ready as dataset {again.dataset_id}\n"
    assert sorted((d["id"], d["status"]) for d in datasets(server)) == sorted(
        [(first.dataset_id, "failed"), (again.dataset_id, "ready")])
    assert again.dataset["sha256"] == sha(movie)


def test_a_dataset_that_ends_failed_is_reported_with_its_error(server, folder, tmp_path):
    sent = Pusher(Server(server), out=io.StringIO()).push(folder / "movie0.mrc")
    # The server took the bytes and then failed them (full disk, a bug): seen while
    # the push follows the dataset it sent.
    set_status(tmp_path / "data", sent.dataset_id, "failed",
               {"error": "insufficient_storage", "detail": "no space left"})
    out = io.StringIO()
    pusher = Pusher(Server(server), out=out)
    following = Outcome(folder / "movie0.mrc", "processing", sent.dataset, sent=True,
                        deadline=time.monotonic() + 60)
    assert pusher.follow([following]) == []
    assert out.getvalue() == (f"movie0.mrc: failed (insufficient_storage: no space left) "
                              f"as dataset {sent.dataset_id}\n")
    assert not pusher.all_ready
    assert pusher.summary() == "push: 0 ready, 0 rejected, 1 failed"


def test_a_dataset_in_flight_is_waited_for_not_sent_twice(server, folder, tmp_path):
    movie = folder / "movie0.mrc"
    data = tmp_path / "data"
    first = Pusher(Server(server), out=io.StringIO()).push(movie)
    for ending in ("ready", "failed"):
        set_status(data, first.dataset_id, "processing")
        result = {}
        thread = threading.Thread(target=lambda: result.update(
            outcome=Pusher(Server(server), out=io.StringIO()).push(movie)))
        thread.start()
        time.sleep(1.0)
        assert thread.is_alive()  # waiting for the dataset that has these bytes
        set_status(data, first.dataset_id, ending, {"error": "internal_error",
                                                    "detail": "boom"}
                   if ending == "failed" else None)
        thread.join(60)
        outcome = result["outcome"]
        assert outcome.state == "ready"
        if ending == "ready":  # the twin became ready: nothing sent
            assert not outcome.sent and outcome.dataset_id == first.dataset_id
            assert len(datasets(server)) == 1
        else:  # the twin failed: ours went up
            assert outcome.sent and outcome.dataset_id != first.dataset_id
            assert len(datasets(server)) == 2
    # A dataset that stays in flight is given up on after --timeout: exit status 1.
    set_status(data, outcome.dataset_id, "processing")
    stuck = push_cli(server, movie, "--timeout", "1")
    assert stuck.returncode == 1
    assert stuck.stderr.splitlines() == [
        f"movie0.mrc: still processing (gave up waiting after 1 s) as dataset "
        f"{outcome.dataset_id}", "push: 0 ready, 0 rejected, 0 failed, 1 not finished"]


def test_an_invalid_movie_ends_rejected_with_its_first_finding(server, tmp_path):
    cut = truncated_movie(tmp_path / "cut.mrc")
    push = push_cli(server, cut)
    assert push.returncode == 1
    [dataset] = datasets(server)
    assert dataset["status"] == "rejected"
    line, summary = push.stderr.splitlines()
    assert re.fullmatch(rf"cut\.mrc: rejected \(data: .*truncated.*\) as dataset "
                        rf"{dataset['id']}", line), line
    assert summary == "push: 0 ready, 1 rejected, 0 failed"
    # The same bytes get the same verdict: reported, not sent again.
    again = push_cli(server, cut)
    assert again.returncode == 1
    assert again.stderr.splitlines() == [
        f"{line}; the same bytes were rejected before, not sent again", summary]
    assert len(datasets(server)) == 1


def test_a_mix_of_good_and_bad_files_exits_1_with_a_line_each(server, folder):
    truncated_movie(folder / "broken.mrc")
    push = push_cli(server, folder)
    assert push.returncode == 1
    by_name = {d["name"]: d for d in datasets(server)}
    assert {n: d["status"] for n, d in by_name.items()} == {
        "movie0.mrc": "ready", "movie1.mrc": "ready", "broken.mrc": "rejected"}
    *lines, summary = push.stderr.splitlines()
    [rejected] = [line for line in lines if line.startswith("broken.mrc: ")]
    assert re.fullmatch(rf"broken\.mrc: rejected \(data: .*truncated.*\) as dataset "
                        rf"{by_name['broken.mrc']['id']}", rejected), rejected
    assert sorted(lines) == sorted([
        rejected, f"movie0.mrc: ready as dataset {by_name['movie0.mrc']['id']}",
        f"movie0.mrc.mdoc: sidecar stored with dataset {by_name['movie0.mrc']['id']}",
        f"movie1.mrc: ready as dataset {by_name['movie1.mrc']['id']}"])
    assert summary == "push: 2 ready, 1 rejected, 0 failed, 1 sidecar stored"


def test_push_with_a_token(tmp_path, folder, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    token = "mrci_scope-secret"
    tokens = [{"name": "scope1", "role": "write", "sha256": hash_token(token)},
              {"name": "viewer", "role": "read", "sha256": hash_token("mrci_read-secret")}]
    proc, base = start_server(tmp_path / "data",
                              env={"MRC_INGEST_TOKENS": json.dumps(tokens)})
    try:
        movie = folder / "movie0.mrc"
        anonymous = push_cli(base, movie)
        assert anonymous.returncode == 1
        assert anonymous.stderr.startswith("mrc-ingest: error: movie0.mrc: GET /v1/datasets:"
                                           " HTTP 401")
        assert anonymous.stderr.splitlines()[-1] == "push: 0 ready, 0 rejected, 0 failed, " \
                                                    "1 error"
        reader = push_cli(base, movie, "--token", "mrci_read-secret")
        assert reader.returncode == 1
        assert "movie0.mrc: upload failed at byte 0: HTTP 403" in reader.stderr
        pushed = push_cli(base, movie, "--token", token)
        assert pushed.returncode == 0, pushed.stderr
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as c:
            [dataset] = c.get("/v1/datasets").json()["items"]
        assert dataset["status"] == "ready" and dataset["sha256"] == sha(movie)
        assert pushed.stderr.splitlines()[0] == f"movie0.mrc: ready as dataset {dataset['id']}"
        # the token from the environment, as on a microscope PC
        env = {**os.environ, "MRC_INGEST_TOKEN": token}
        again = push_cli(base, movie, env=env)
        assert again.returncode == 0, again.stderr
        assert "already on the server, not sent again" in again.stderr
    finally:
        proc.terminate()
        proc.wait()
