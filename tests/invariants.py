"""An invariant checker that does not ask the service what should exist.

It reads the catalog with plain SQL (sqlite3, or psycopg for PostgreSQL) and lists the
data folder or the bucket itself (os.walk, boto3), and knows what the client sent and
what it was told. It imports nothing from ``service``. What it checks
(ARCHITECTURE.md, "Invariants"):

- every movie a client was told is complete (a 201 to a PUT; a tus HEAD with
  ``Upload-Offset == Upload-Length``; a registration accepted) has exactly one live
  dataset with its SHA-256, and that dataset is ready (or rejected, for a file the
  client knew was invalid);
- every ``ready``/``rejected`` dataset's objects exist with the sizes its row records;
  its archive is read by ``mrcz`` (an independent reader) into the pixels that were
  sent; its bytes as received, fetched by a plain HTTP client, hash to its SHA-256;
- after one sweep, no object under ``datasets/`` is left that no row names, and no tus
  upload keeps bytes after its dataset was committed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np

LIVE = ("receiving", "queued", "processing", "ready")


@dataclass
class Place:
    """Where a deployment keeps things: its catalog URL and its store (a data folder, or
    a bucket and prefix with a boto3 client)."""

    catalog_url: str
    data_dir: Path | None = None
    bucket: str | None = None
    prefix: str = ""
    s3: Any = None  # a boto3 S3 client

    # -- the catalog, by plain SQL ------------------------------------------------------

    def rows(self, sql: str) -> list[dict[str, Any]]:
        if self.catalog_url.startswith("sqlite"):
            path = self.catalog_url.split("///", 1)[1]
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
                conn.row_factory = sqlite3.Row
                return [dict(r) for r in conn.execute(sql)]
        import psycopg
        from psycopg.rows import dict_row

        dsn = self.catalog_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn, row_factory=dict_row) as conn:
            return list(conn.execute(sql))

    def datasets(self) -> list[dict[str, Any]]:
        rows = self.rows("SELECT id, name, status, sha256, size_bytes, info FROM datasets")
        for row in rows:
            if isinstance(row["info"], str):
                row["info"] = json.loads(row["info"])
        return rows

    def tus_uploads(self) -> list[dict[str, Any]]:
        return self.rows("SELECT id, length, \"offset\", dataset_id, completed_at, "
                         "released_at FROM tus_uploads")

    # -- the store, listed by itself ----------------------------------------------------

    def objects(self, prefix: str) -> dict[str, int]:
        """key -> size of every object under ``prefix`` (temporaries included: a
        leftover ``.part`` is a leftover)."""
        if self.data_dir is not None:
            found = {}
            base = self.data_dir / prefix
            for folder, _, files in os.walk(base):
                for name in files:
                    path = Path(folder) / name
                    found[path.relative_to(self.data_dir).as_posix()] = path.stat().st_size
            return found
        found = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix):
            for item in page.get("Contents", ()):
                found[item["Key"][len(self.prefix):]] = item["Size"]
        return found

    def incomplete_multipart(self, prefix: str) -> list[str]:
        if self.s3 is None:
            return []
        answer = self.s3.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix + prefix)
        return [u["Key"] for u in answer.get("Uploads", ())]

    def read(self, key: str) -> bytes:
        if self.data_dir is not None:
            return (self.data_dir / key).read_bytes()
        return self.s3.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()


@dataclass
class Sent:
    """What one client sent and what it was told."""

    name: str
    sha256: str
    pixels: np.ndarray | None = None   # what mrcz must read back from the archive
    told_complete: bool = False
    valid: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check(place: Place, sent: list[Sent], base_url: str | None = None,
          swept: bool = True, headers: dict[str, str] | None = None) -> list[str]:
    """Every broken invariant, in words (an empty list: all hold)."""
    problems: list[str] = []
    rows = place.datasets()
    by_id = {row["id"]: row for row in rows}
    objects = place.objects("datasets/")
    named: set[str] = set()
    for row in rows:
        storage = (row["info"] or {}).get("storage") or {}
        keys, sizes = storage.get("keys", {}), storage.get("bytes", {})
        if row["status"] in ("ready", "rejected"):
            named |= set(keys.values())
            if not keys and storage.get("form") != "registered":
                problems.append(f"dataset {row['id']} is {row['status']} with no stored object")
            for role, key in keys.items():
                if key not in objects:
                    problems.append(f"dataset {row['id']} ({row['status']}) names {key}, "
                                    "which the store does not hold")
                elif role in sizes and objects[key] != sizes[role]:
                    problems.append(f"{key}: {objects[key]} bytes stored, "
                                    f"{sizes[role]} recorded")
        elif row["status"] in LIVE:
            named |= {k for k in objects if k.startswith(f"datasets/{row['id']}/")}
    if swept:
        for key in sorted(set(objects) - named):
            owner = key.split("/")[1]
            problems.append(f"{key}: no row names it (dataset {owner} is "
                            f"{by_id[owner]['status'] if owner in by_id else 'gone'})")
        problems += [f"incomplete multipart upload {k} left" for k in
                     place.incomplete_multipart("datasets/")]
    for movie in sent:
        live = [r for r in rows if r["sha256"] == movie.sha256 and r["status"] in LIVE]
        final = [r for r in rows if r["sha256"] == movie.sha256
                 and r["status"] in ("ready", "rejected")]
        if len(live) > 1:
            problems.append(f"{movie.name}: {len(live)} live datasets of the same bytes")
        if not movie.told_complete:
            continue
        wanted = "ready" if movie.valid else "rejected"
        done = [r for r in final if r["status"] == wanted]
        if not done:
            states = sorted(r["status"] for r in rows if r["sha256"] == movie.sha256)
            problems.append(f"{movie.name}: told complete, but no {wanted} dataset has its "
                            f"SHA-256 (datasets of it: {states or 'none'})")
            continue
        row = done[0]
        problems += _check_bytes(place, row, movie, base_url, headers)
    for upload in place.tus_uploads():
        if upload["offset"] == upload["length"] and upload["completed_at"] is None:
            problems.append(f"tus upload {upload['id']} holds every byte but its dataset "
                            "was never committed")
        if upload["completed_at"] is not None and upload["released_at"] is None and swept:
            problems.append(f"tus upload {upload['id']} is committed but keeps its bytes")
    return problems


def _check_bytes(place: Place, row: dict[str, Any], movie: Sent, base_url: str | None,
                 headers: dict[str, str] | None) -> list[str]:
    problems = []
    keys = row["info"]["storage"].get("keys", {})
    if movie.pixels is not None and "archive" in keys:
        import mrcz

        with tempfile.NamedTemporaryFile(suffix=".mrcz") as out:
            out.write(place.read(keys["archive"]))
            out.flush()
            values, _ = mrcz.readMRC(out.name)
        if not np.array_equal(np.asarray(values).reshape(movie.pixels.shape), movie.pixels):
            problems.append(f"{movie.name}: mrcz reads other pixels from {keys['archive']}")
    if base_url is not None:
        digest = hashlib.sha256()
        with httpx.stream("GET", f"{base_url}/v1/datasets/{row['id']}/download",
                          headers=headers or {}, timeout=60) as response:
            if response.status_code != 200:
                return problems + [f"{movie.name}: download answered {response.status_code}"]
            for chunk in response.iter_bytes():
                digest.update(chunk)
        if digest.hexdigest() != movie.sha256:
            problems.append(f"{movie.name}: the bytes as received rebuild to "
                            f"{digest.hexdigest()}, not {movie.sha256}")
    return problems


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.2)
