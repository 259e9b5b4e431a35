"""Shared helpers for the API tests: an app on a temporary data folder, job polling."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.api import create_app
from service.config import Settings
from tests.conftest import clean_environment, free_port


def make_client(data_dir: Path, **settings):
    """A TestClient (httpx under the hood) on a fresh app; use it as a context manager."""
    from fastapi.testclient import TestClient

    settings.setdefault("workers", 2)
    return TestClient(create_app(Settings(data_dir=data_dir, **settings)))


def wait_job(client, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s")
        time.sleep(0.02)


def upload_and_wait(client, path: Path, name: str | None = None, **params) -> dict:
    """PUT a file, wait for its ingest, return the dataset detail."""
    response = client.put(f"/v1/uploads/{name or path.name}", content=path.read_bytes(),
                          params=params)
    assert response.status_code in (200, 201, 202), response.text
    body = response.json()
    if body["job"] is not None and body["job"]["state"] in ("queued", "running"):
        wait_job(client, body["job"]["id"])
    return client.get(f"/v1/datasets/{body['dataset']['id']}").json()


def files_under(folder: Path) -> list[Path]:
    """Every file below ``folder`` now. ``os.walk`` skips a directory that goes while it
    looks (``rglob`` raises): the service may be deleting the very objects a test waits
    on."""
    return sorted(Path(top, name) for top, _, names in os.walk(folder) for name in names)


def start_server(data_dir: Path, *args: str, timeout: float = 60.0, stderr=None,
                 env: dict[str, str] | None = None, nice: int = 0
                 ) -> tuple[subprocess.Popen, str]:
    """``mrc-ingest serve`` in its own process on a free loopback port, once /healthz
    answers; returns the process and the base URL. ``nice``: run it at that niceness."""
    port = free_port()
    prefix = ["nice", "-n", str(nice)] if nice else []
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "service.cli", "serve", "--port",
                             str(port), "--data-dir", str(data_dir), "--log-level",
                             "info" if stderr is not None else "warning", *args],
                            cwd=Path(__file__).resolve().parents[1], stderr=stderr,
                            env=clean_environment(env))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base}/healthz").status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("the server did not start")
        time.sleep(0.1)


def assert_consistent(data_dir: Path) -> None:
    """The catalog and the data folder agree: every object a dataset's row names exists,
    every dataset folder belongs to a dataset, a ready dataset has its frame sum and (in
    archive form) its archive and restore record, and nothing temporary or half-received
    is left."""
    from service.catalog import Catalog, DatasetQuery
    from service.config import Settings
    from service.storage import stored_form

    catalog = Catalog(Settings(data_dir=data_dir).catalog_url)
    try:
        rows, cursor = [], None
        while True:
            page, cursor = catalog.list_datasets(DatasetQuery(limit=1000, cursor=cursor))
            rows += page
            if cursor is None:
                break
        ids = {row["id"] for row in rows}
        for row in rows:
            full = catalog.get_dataset(row["id"])
            assert full["status"] not in ("receiving",), full["id"]
            form = stored_form(full, data_dir)
            for key in form.keys:
                assert (data_dir / key).is_file(), (full["id"], key)
            if form.registered_path:
                assert Path(form.registered_path).is_file()
            if full["status"] == "ready":
                assert form.sum_key is not None, full["id"]
                if form.form == "archive":
                    assert form.archive_key and form.record_key, full["id"]
        for folder in ("datasets", "conversions"):
            if (data_dir / folder).exists():
                for child in (data_dir / folder).iterdir():
                    assert child.name in ids, f"{folder}/{child.name} belongs to no dataset"
        assert list((data_dir / "incoming").iterdir()) == []
        assert [p for p in data_dir.rglob("*.part")] == []
    finally:
        catalog.close()


def run_recover(data_dir: Path, env: dict[str, str] | None = None,
                sweep_age: float = 0.0) -> str:
    """``mrc-ingest recover`` once, in its own process (every writer of an embedded
    catalog stopped: it refuses to run beside one); its JSON line of counts."""
    done = subprocess.run([sys.executable, "-m", "service.cli", "recover", "--data-dir",
                           str(data_dir), "--sweep-age", str(sweep_age)],
                          env=clean_environment(env), capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    return done.stdout


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary"
              ) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body of (field name, file name or None, content) parts."""
    out = bytearray()
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"'
                                                     if filename else "")
        out += (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + content + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), {"Content-Type": f"multipart/form-data; boundary={boundary}"}
