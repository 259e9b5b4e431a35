"""Shared helpers for the API tests: an app on a temporary data folder, job polling."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi.testclient import TestClient

from service.api import create_app
from service.config import Settings


def make_client(data_dir: Path, **settings) -> TestClient:
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
