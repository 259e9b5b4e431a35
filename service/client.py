"""The client side: ``mrc-ingest push | ls | status`` for microscope PCs and people.

``push`` hashes each movie (SHA-256) and asks the server what it has of those bytes: a
``ready`` dataset is skipped, a ``rejected`` one is the verdict on the same bytes (not
sent again), one still in flight is waited for, a ``failed`` one (or none) means the
movie goes up. Uploads are resumable with the tus client (tuspy), one progress bar per
file; a push cut off by a network failure or Ctrl-C resumes where the server's offset
says, also from a later run (the upload URL is remembered per SHA-256). Sidecars
(``.mdoc``, ``_info.txt``) go after their movie. Every movie sent is then followed until
its dataset is final (ready, rejected, failed), and one line per file says which.
``--watch`` keeps looking for new movies and sends each once it is complete: its size
stayed the same for one interval, or its ``.mdoc`` was written.
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
#: seconds a sent movie is followed until its dataset is final (``--timeout``)
TIMEOUT = 900.0
FINAL = ("ready", "rejected", "failed")
IN_FLIGHT = ("receiving", "queued", "processing")


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
        """The dataset that decides what a push of these bytes does: a ready one, else
        one in flight, else a rejected one (newest first in each); None when there is
        none or every one failed."""
        items = self.get("/v1/datasets", sha256=sha, limit=100)["items"]
        for states in (("ready",), IN_FLIGHT, ("rejected",)):
            for item in items:
                if item["status"] in states:
                    return item
        return None

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        return self.get(f"/v1/datasets/{dataset_id}")

    def put_sidecar(self, path: Path, placement: dict[str, str] | None = None
                    ) -> dict[str, Any]:
        """A sidecar, with its movie's placement (``?session=&project=``: the server
        attaches it to a movie of that project only)."""
        return self._json(self.http.put(f"/v1/uploads/{path.name}", content=path.read_bytes(),
                                        params=placement or {}))


def first_finding(dataset: dict[str, Any]) -> str:
    """A rejected dataset's first error finding (its first finding if none is an
    error), as ``field: message``."""
    findings = dataset.get("findings") or []
    first = next((f for f in findings if f.get("severity") == "error"),
                 findings[0] if findings else None)
    return f"{first.get('field')}: {first.get('message')}" if first else "no findings"


def failure(dataset: dict[str, Any]) -> str:
    """A failed dataset's error, as ``code: detail``."""
    error = dataset.get("error") or {}
    detail = error.get("detail")
    if not isinstance(detail, str):
        detail = json.dumps(detail)
    return f"{error.get('error', 'unknown')}: {detail}"[:300] if error else "no error given"


@dataclass
class Outcome:
    """What became of one file. ``state``: ready | rejected | failed, sidecar (stored),
    error (not sent, or not followed: ``reason`` says why), or the dataset's in-flight
    status while it is followed (and after ``timeout`` or Ctrl-C: not finished)."""

    path: Path
    state: str
    dataset: dict[str, Any] | None = None
    reason: str = ""
    #: this run uploaded the bytes (False: the server had them)
    sent: bool = False
    #: time.monotonic() after which the dataset is no longer waited for
    deadline: float = 0.0

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def dataset_id(self) -> str | None:
        return self.dataset["id"] if self.dataset else None

    @property
    def finished(self) -> bool:
        return self.state not in IN_FLIGHT

    @property
    def ok(self) -> bool:
        return self.state in ("ready", "sidecar")

    def line(self) -> str:
        if self.state == "sidecar":
            return (f"{self.name}: sidecar stored" + (f" with dataset {self.dataset_id}"
                    if self.dataset_id else " (movie not there yet)"))
        if self.state == "error":
            return f"mrc-ingest: error: {self.name}: {self.reason}"
        verdict = {"ready": "ready", "rejected": f"rejected ({self.reason})",
                   "failed": f"failed ({self.reason})"}.get(
            self.state, f"still {self.state} ({self.reason})")
        line = f"{self.name}: {verdict} as dataset {self.dataset_id}"
        if not self.sent and self.state == "ready":
            line += "; already on the server, not sent again"
        elif not self.sent and self.state == "rejected":
            line += "; the same bytes were rejected before, not sent again"
        return line


def summary(outcomes: Iterable[Outcome]) -> str:
    """``push: 3 ready, 1 rejected, 0 failed`` and the other kinds there were."""
    counts: dict[str, int] = {}
    for outcome in outcomes:
        kind = outcome.state if outcome.finished else "not finished"
        counts[kind] = counts.get(kind, 0) + 1
    parts = [f"{counts.get(s, 0)} {s}" for s in FINAL]
    if counts.get("not finished"):
        parts.append(f"{counts['not finished']} not finished")
    if counts.get("error"):
        parts.append(f"{counts['error']} error" + ("s" if counts["error"] > 1 else ""))
    if counts.get("sidecar"):
        parts.append(f"{counts['sidecar']} sidecar" + ("s" if counts["sidecar"] > 1 else "")
                     + " stored")
    return "push: " + ", ".join(parts)


class Pusher:
    def __init__(self, server: Server, chunk: int = CHUNK, out=sys.stderr,
                 bars: bool | None = None, timeout: float = TIMEOUT,
                 session: str | None = None, project: str | None = None,
                 folders: Iterable[Path] = ()):
        self.server, self.chunk, self.out, self.timeout = server, chunk, out, timeout
        #: where the movies go: the session (default: the name of the folder pushed that
        #: holds the file, else of the folder the file is in) and its project (default:
        #: the server's: 'default', or the token's only project)
        self.session, self.project = session, project
        #: the folders given to push (EPU nests its movies a few folders down in one
        #: folder per session: Images-Disc1/GridSquare_*/Data/)
        self.folders = [Path(f) for f in folders]
        self.bars = out.isatty() if bars is None else bars
        self.urls = self._load_urls()
        #: every file's final outcome, in the order they were known
        self.outcomes: list[Outcome] = []

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

    @property
    def all_ready(self) -> bool:
        """Every file so far ended ready (a sidecar: stored)."""
        return all(o.ok for o in self.outcomes)

    def summary(self) -> str:
        return summary(self.outcomes)

    # -- one-shot ----------------------------------------------------------------

    def push(self, path: Path) -> Outcome:
        """Send one file and follow it until its dataset is final (or the timeout)."""
        return self.push_all([path])[0]

    def push_all(self, paths: Iterable[Path]) -> list[Outcome]:
        """Send each file, then follow the movies sent until their datasets are final;
        one line per file as its outcome is known. An upload does not wait for the
        server to finish the movies before it. Returns the outcomes in file order."""
        paths = list(paths)
        start = len(self.outcomes)
        pending: list[Outcome] = []
        for path in paths:
            outcome = self.send(path)
            if outcome.finished:
                self._record(outcome)
            else:
                pending.append(outcome)
                pending = self.follow(pending, eager=False)
        delay = 0.1
        while pending:
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)
            pending = self.follow(pending)
        rank = {path: i for i, path in enumerate(paths)}
        return sorted(self.outcomes[start:], key=lambda o: rank[o.path])

    # -- --watch ---------------------------------------------------------------------

    def watch(self, roots: list[Path], interval: float, stop: Callable[[], bool]) -> None:
        """Push files as they become complete, until ``stop()`` (or Ctrl-C), and follow
        each movie sent until its dataset is final, while looking for the next ones. A
        file that could not be sent (network, server away) is tried again at the next
        scan; one whose dataset ended rejected or failed is reported once and not sent
        again by this watch (the next push or watch sends a failed one again)."""
        self.folders = [*self.folders, *roots]
        seen_sizes: dict[Path, int] = {}
        done: set[Path] = set()
        errors: dict[Path, Outcome] = {}
        pending: list[Outcome] = []
        try:
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
                        outcome = self.send(path)
                        if outcome.state == "error":  # the next scan tries again
                            errors[path] = outcome
                            self.say(outcome.line())
                            continue
                        errors.pop(path, None)
                        done.add(path)
                        if outcome.finished:
                            self._record(outcome)
                        else:
                            pending.append(outcome)
                pending = self.follow(pending)
                time.sleep(interval)
        finally:
            self.follow(pending, stopping=True)
            self.outcomes += errors.values()  # each was said when it happened

    # -- the steps -----------------------------------------------------------------

    def send(self, path: Path) -> Outcome:
        """Upload one file unless the server has its bytes; a ClientError becomes an
        outcome ``error``. The outcome may still be in flight (see :meth:`follow`)."""
        try:
            if is_sidecar(path):
                result = self.server.put_sidecar(path, self.placement(path))
                movie = result["sidecar"]["dataset_id"]
                return Outcome(path, "sidecar", {"id": movie} if movie else None)
            size = path.stat().st_size
            sha = sha256_file(path)
            existing = self.server.find_sha256(sha)
            if existing is not None and existing["status"] != "rejected":
                return self._outcome(path, existing, sent=False)
            if existing is not None:  # the same bytes get the same verdict
                return self._outcome(path, self.server.dataset(existing["id"]), sent=False)
            return self._outcome(path, self._upload(path, size, sha), sent=True)
        except ClientError as exc:
            return Outcome(path, "error", reason=str(exc))
        except httpx.TransportError as exc:
            return Outcome(path, "error", reason=f"cannot reach {self.server.url}: {exc}")
        except OSError as exc:  # the file, or tuspy's requests
            return Outcome(path, "error", reason=f"{exc.strerror or exc}")

    def _outcome(self, path: Path, dataset: dict[str, Any], sent: bool) -> Outcome:
        status = dataset["status"]
        reason = (first_finding(dataset) if status == "rejected" else
                  failure(dataset) if status == "failed" else "")
        return Outcome(path, status, dataset, reason, sent,
                       deadline=time.monotonic() + self.timeout)

    def follow(self, pending: list[Outcome], eager: bool = True,
               stopping: bool = False) -> list[Outcome]:
        """Look at each dataset still in flight once; record the final ones (and those
        past their deadline) and return the rest. A twin (the bytes another push sent)
        that failed is replaced by an upload of ours. ``eager`` False: stop at the first
        one still in flight (the cheap check between uploads). ``stopping``: record
        every one, finished or not."""
        still: list[Outcome] = []
        for index, outcome in enumerate(pending):
            if not eager and still:
                still += pending[index:]
                break
            try:
                now = self._outcome(outcome.path, self.server.dataset(outcome.dataset_id),
                                    outcome.sent)
            except httpx.TransportError:  # the server away for a moment: ask again
                now = Outcome(outcome.path, outcome.state, outcome.dataset, outcome.reason,
                              outcome.sent)
            except ClientError as exc:
                self._record(Outcome(outcome.path, "error", outcome.dataset, str(exc),
                                     outcome.sent))
                continue
            now.deadline = outcome.deadline
            if now.state == "failed" and not now.sent and not stopping:
                now = self.send(outcome.path)
            if now.finished:
                self._record(now)
            elif stopping:
                now.reason = "stopped waiting"
                self._record(now)
            elif time.monotonic() > now.deadline:
                now.reason = f"gave up waiting after {self.timeout:g} s"
                self._record(now)
            else:
                still.append(now)
        return still

    def _record(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.say(outcome.line())

    def placement(self, path: Path) -> dict[str, str]:
        """The tus metadata that places a movie: its session (the --session given, else
        the name of the folder pushed that holds it, else of the folder it is in) and
        its project (only when given)."""
        real = path.resolve()
        holders = [f for f in (f.resolve() for f in self.folders) if f in real.parents]
        session = self.session or max(holders or [real.parent],
                                      key=lambda f: len(f.parts)).name
        return {"session": session, **({"project": self.project} if self.project else {})}

    def _upload(self, path: Path, size: int, sha: str) -> dict[str, Any]:
        from tqdm import tqdm
        from tusclient import client as tus_client
        from tusclient.exceptions import TusCommunicationError

        tus = tus_client.TusClient(f"{self.server.url}/v1/tus/",
                                   headers=dict(self.server.http.headers.items()))
        url = self.urls.get(sha)
        metadata = {"filename": path.name, **self.placement(path)}
        try:  # (with no URL, tuspy creates the upload at the first chunk)
            uploader = tus.uploader(str(path), chunk_size=self.chunk, url=url,
                                    metadata=metadata, upload_checksum=True)
        except TusCommunicationError:  # the remembered upload expired or was removed
            uploader = tus.uploader(str(path), chunk_size=self.chunk,
                                    metadata=metadata, upload_checksum=True)
        bar = tqdm(total=size, initial=uploader.offset, unit="B", unit_scale=True,
                   unit_divisor=1024, desc=path.name, file=self.out, disable=not self.bars)
        try:
            while uploader.offset < size:
                before = uploader.offset
                try:
                    uploader.upload_chunk()
                except TusCommunicationError as exc:
                    why = (f"HTTP {exc.status_code} {(exc.response_content or b'')[:200]!r}"
                           if exc.status_code else str(exc))
                    raise ClientError(f"upload failed at byte {before}: {why}") from None
                if uploader.url and self.urls.get(sha) != uploader.url:
                    self.urls[sha] = uploader.url
                    self._save_urls()
                bar.update(uploader.offset - before)
        finally:
            bar.close()
        head = self.server.http.head(uploader.url, headers={"Tus-Resumable": "1.0.0"})
        location = head.headers.get("mrc-ingest-dataset")
        if location is None:
            raise ClientError("the server did not report a dataset")
        self.urls.pop(sha, None)
        self._save_urls()
        return self.server.get(location)
