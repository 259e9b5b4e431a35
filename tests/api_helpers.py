"""Shared helpers for the API tests: an app on a temporary data folder, job polling."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.api import create_app
from service.config import Settings
from tests.conftest import clean_environment


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
    assert response.status_code in (200, 202), response.text
    body = response.json()
    if body["job"] is not None:
        wait_job(client, body["job"]["id"])
    return client.get(f"/v1/datasets/{body['dataset']['id']}").json()


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, *args: str, timeout: float = 60.0, stderr=None,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """``mrc-ingest serve`` in its own process on a free loopback port, once /healthz
    answers; returns the process and the base URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port),
                             "--data-dir", str(data_dir), "--log-level",
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
    """The catalog and the data folder agree: every dataset's files exist, every folder
    belongs to a dataset, nothing temporary or half-received is left."""
    from service.catalog import DatasetQuery, Catalog
    from service.config import Settings

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
            assert Path(full["path"]).is_file(), full
            if full["source"] == "upload":
                assert Path(full["path"]).parent == data_dir.resolve() / "datasets" / full["id"]
            if full["status"] == "ready":
                assert (data_dir / "datasets" / full["id"] / "sum.npy").is_file(), full["id"]
                if full["info"].get("archive"):
                    archives = list((data_dir / "datasets" / full["id"]).glob("archive.mrc*"))
                    assert len(archives) == 1, full["id"]
        for folder in ("datasets", "conversions"):
            for child in (data_dir / folder).iterdir():
                assert child.name in ids, f"{folder}/{child.name} belongs to no dataset"
        assert list((data_dir / "incoming").iterdir()) == []
        assert [p for p in data_dir.rglob("*.part")] == []
    finally:
        catalog.close()
