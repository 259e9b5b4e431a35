"""Nothing synchronous on the event loop: with the catalog held busy for 2 s (another
process holds SQLite's write lock) exactly while an upload does its bookkeeping after
the commit (attaching the .mdoc that arrived before it: a catalog write), `/healthz`
and a cached preview still answer in under 100 ms, and the upload answers once the
catalog is free. A real `mrc-ingest serve` (uvicorn), the moment chosen by a fault
point that pauses, not by a sleep."""

from __future__ import annotations

import sqlite3
import threading
import time

import httpx

from tests.api_helpers import start_server
from tests.invariants import wait_until
from tests.reference import counting_movie, write_raw_mrc
from tests.test_acquisition import MDOC


def test_a_busy_catalog_does_not_stall_the_event_loop(tmp_path):
    pause = tmp_path / "pause"
    pause.mkdir()
    first = write_raw_mrc(tmp_path / "a.mrc", counting_movie((3, 64, 96)), 101)
    second = write_raw_mrc(tmp_path / "b.mrc", counting_movie((4, 64, 96)), 101)
    data = tmp_path / "data"
    proc, base = start_server(data, env={"MRC_INGEST_FAULT":
                                         f"commit.after_release:pause={pause}"})
    try:
        # the first upload passes the pause point at once (its "go" is ready)
        (pause / "commit.after_release.go").touch()
        ready = httpx.put(f"{base}/v1/uploads/a.mrc", content=first.read_bytes(), timeout=60)
        assert ready.status_code == 201, ready.text
        preview = f"{base}/v1/datasets/{ready.json()['dataset']['id']}/frames/0.png"
        assert httpx.get(preview).status_code == 200  # now cached
        (pause / "commit.after_release.go").unlink()
        (pause / "commit.after_release.reached").unlink()
        early = httpx.put(f"{base}/v1/uploads/b.mrc.mdoc", content=MDOC.encode())
        assert early.status_code == 201 and early.json()["sidecar"]["dataset_id"] is None
        answer: dict = {}
        upload = threading.Thread(target=lambda: answer.update(response=httpx.put(
            f"{base}/v1/uploads/b.mrc", content=second.read_bytes(), timeout=60)))
        upload.start()
        wait_until(lambda: (pause / "commit.after_release.reached").exists(), 30,
                   "the second upload at its pause")
        catalog = sqlite3.connect(data / "catalog.sqlite3", timeout=5, isolation_level=None)
        catalog.execute("BEGIN EXCLUSIVE")  # the catalog is busy from here ...
        try:
            (pause / "commit.after_release.go").touch()  # ... while the upload answers
            latencies = {"healthz": [], "preview": []}
            until = time.monotonic() + 2.0
            while time.monotonic() < until:
                for name, url in (("healthz", f"{base}/healthz"), ("preview", preview)):
                    started = time.perf_counter()
                    response = httpx.get(url, timeout=10)
                    latencies[name].append(time.perf_counter() - started)
                    assert response.status_code in (200, 503), response.text
                time.sleep(0.05)
            assert upload.is_alive(), "the upload answered while the catalog was busy"
        finally:
            catalog.execute("ROLLBACK")
            catalog.close()
        upload.join(30)
        assert answer["response"].status_code == 201, answer["response"].text
        assert answer["response"].json()["dataset"]["voltage_kv"] == 300  # the .mdoc
        worst = {name: max(values) for name, values in latencies.items()}
        assert all(len(values) >= 10 for values in latencies.values()), latencies
        assert worst["healthz"] < 0.1 and worst["preview"] < 0.1, worst
    finally:
        proc.terminate()
        proc.wait(30)
