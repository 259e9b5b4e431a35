"""The client side: ``mrc-ingest push | ls | status`` for microscope PCs and people.

``push`` hashes each movie (SHA-256), skips what the server already has, and uploads the
rest resumably with the tus client (tuspy), one progress bar per file; a push cut off by
a network failure or Ctrl-C resumes where the server's offset says, also from a later
run (the upload URL is remembered per SHA-256). Sidecars (``.mdoc``, ``_info.txt``) go
after their movie. ``--watch`` keeps looking for new movies and sends each once it is
complete: its size stayed the same for one interval, or its ``.mdoc`` was written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import httpx

from .sidecars import MOVIE_SUFFIXES, SIDECAR_SUFFIXES
from .storage import sha256_file

CHUNK = 64 << 20


class ClientError(Exception):
    """A one-line reason for the command line."""


def state_file() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "mrc-ingest" / "tus-uploads.json"


def is_movie(path: Path) -> bool:
    return path.suffix.lower() in MOVIE_SUFFIXES and not path.name.startswith(".")


def is_sidecar(path: Path) -> bool:
    return path.name.lower().endswith(SIDECAR_SUFFIXES)


def collect(paths: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file()
                            and (is_movie(p) or is_sidecar(p)))
        elif path.is_file():
            files.append(path)
        else:
            raise ClientError(f"{path}: no such file or folder")
    return files


@dataclass
class Server:
    url: str
    token: str | None = None
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        return self._json(self.http.get(path, params=params))

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            try:
                body = response.json()
                reason = f"{body['error']}: {body['detail']}"
            except (ValueError, KeyError, TypeError):
                reason = response.text[:200]
            raise ClientError(f"{response.request.method} {response.request.url.path}: "
                              f"HTTP {response.status_code} {reason}")
        return response.json()

    def find_sha256(self, sha: str) -> dict[str, Any] | None:
        items = self.get("/v1/datasets", sha256=sha, limit=1)["items"]
        return items[0] if items else None

    def put_sidecar(self, path: Path) -> dict[str, Any]:
        return self._json(self.http.put(f"/v1/uploads/{path.name}", content=path.read_bytes()))


class Pusher:
    def __init__(self, server: Server, chunk: int = CHUNK, out=sys.stderr,
                 bars: bool | None = None):
        self.server, self.chunk, self.out = server, chunk, out
        self.bars = out.isatty() if bars is None else bars
        self.urls = self._load_urls()

    def _load_urls(self) -> dict[str, str]:
        try:
            return json.loads(state_file().read_text())
        except (OSError, ValueError):
            return {}

    def _save_urls(self) -> None:
        path = state_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(".tmp")
        temp.write_text(json.dumps(self.urls))
        os.replace(temp, path)

    def say(self, message: str) -> None:
        print(message, file=self.out)

    def push(self, path: Path) -> dict[str, Any] | None:
        """Send one file; returns the dataset (or sidecar) record the server keeps."""
        if is_sidecar(path):
            result = self.server.put_sidecar(path)
            self.say(f"{path.name}: sidecar stored"
                     + (f" with dataset {result['sidecar']['dataset_id']}"
                        if result["sidecar"]["dataset_id"] else " (movie not there yet)"))
            return result
        size = path.stat().st_size
        sha = sha256_file(path)
        existing = self.server.find_sha256(sha)
        if existing is not None:
            self.say(f"{path.name}: already on the server as dataset {existing['id']} "
                     f"({existing['status']}); skipped")
            return existing
        dataset = self._upload(path, size, sha)
        self.say(f"{path.name}: uploaded as dataset {dataset['id']}")
        return dataset

    def _upload(self, path: Path, size: int, sha: str) -> dict[str, Any]:
        from tqdm import tqdm
        from tusclient import client as tus_client
        from tusclient.exceptions import TusCommunicationError

        tus = tus_client.TusClient(f"{self.server.url}/v1/tus/",
                                   headers=dict(self.server.http.headers.items()))
        url = self.urls.get(sha)
        try:
            uploader = tus.uploader(str(path), chunk_size=self.chunk, url=url,
                                    metadata={"filename": path.name}, upload_checksum=True)
        except TusCommunicationError:  # the remembered upload expired or was removed
            uploader = tus.uploader(str(path), chunk_size=self.chunk,
                                    metadata={"filename": path.name}, upload_checksum=True)
        bar = tqdm(total=size, initial=uploader.offset, unit="B", unit_scale=True,
                   unit_divisor=1024, desc=path.name, file=self.out, disable=not self.bars)
        try:
            while uploader.offset < size:
                before = uploader.offset
                try:
                    uploader.upload_chunk()
                except TusCommunicationError as exc:
                    raise ClientError(f"{path.name}: upload failed at byte {before}: "
                                      f"HTTP {exc.status_code} "
                                      f"{(exc.response_content or b'')[:200]!r}") from None
                if uploader.url and self.urls.get(sha) != uploader.url:
                    self.urls[sha] = uploader.url
                    self._save_urls()
                bar.update(uploader.offset - before)
        finally:
            bar.close()
        head = self.server.http.head(uploader.url, headers={"Tus-Resumable": "1.0.0"})
        location = head.headers.get("mrc-ingest-dataset")
        if location is None:
            raise ClientError(f"{path.name}: the server did not report a dataset")
        self.urls.pop(sha, None)
        self._save_urls()
        return self.server.get(location)

    def watch(self, roots: list[Path], interval: float, stop: Callable[[], bool]) -> None:
        """Push files as they become complete, until ``stop()``."""
        seen_sizes: dict[Path, int] = {}
        done: set[Path] = set()
        while not stop():
            for path in collect(roots):
                if path in done:
                    continue
                size = path.stat().st_size
                mdoc_written = any(path.with_name(n).exists()
                                   for n in (f"{path.name}.mdoc", f"{path.stem}.mdoc"))
                stable = seen_sizes.get(path) == size
                seen_sizes[path] = size
                if is_sidecar(path) or stable or mdoc_written:
                    try:
                        self.push(path)
                    except ClientError as exc:  # the next scan tries again
                        self.say(f"mrc-ingest: error: {exc}")
                        continue
                    done.add(path)
            time.sleep(interval)
