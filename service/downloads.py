"""Downloads: the file exactly as received (rebuilt from the archive on the fly, with
byte ranges that decode only the frames they touch), lossless conversions (made once by
a job, kept in the datastore as a cache bounded in bytes), and a conversion job's result.

Everything here is HTTP-agnostic: a :class:`Download` says how big, what to call it, its
entity tag, and yields the bytes of any range; the router turns it into a response.
"""

from __future__ import annotations

import asyncio
import queue
import re
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePath
from typing import Any, Callable, Iterator

from . import mrc
from .auth import Scope
from .catalog import Catalog
from .errors import BadRequest, Conflict, RangeNotSatisfiable, from_body
from .jobs import JobQueue
from .pipeline import target_from_dict, target_to_dict
from .queries import Queries
from .readers import Readers
from .storage import FORM_ARCHIVE, Storage, conversion_key, read_blocks

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def download_name(name: str, target: mrc.Target) -> str:
    """File name for a converted download: ``movie.mode1.mrc``, ``movie.mrcz``."""
    stem = PurePath(name).stem
    mode = "" if target.mode is None else f".mode{target.mode}"
    endian = ".be" if target.byte_order == ">" else ""
    return f"{stem}{mode}{endian}.{'mrcz' if target.is_mrcz else 'mrc'}"


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``Range: bytes=a-b`` (or ``a-``, ``-n``) -> (start, stop exclusive); None for no
    range or one this server serves whole (several ranges: RFC 9110 lets it ignore
    them). A range past the end raises :class:`RangeNotSatisfiable`."""
    if header is None:
        return None
    header = header.strip()
    if "," in header:
        return None
    match = _RANGE.match(header)
    if match is None or match.group(1) == match.group(2) == "":
        raise BadRequest(f"Range {header!r} is not 'bytes=start-end', 'bytes=start-' or "
                         "'bytes=-suffix'")
    first, last = match.groups()
    if first == "":
        length = int(last)
        if length == 0:
            raise RangeNotSatisfiable(size, f"Range {header!r} asks for no bytes")
        return max(0, size - length), size
    start = int(first)
    stop = size if last == "" else min(int(last) + 1, size)
    if start >= size or stop <= start:
        raise RangeNotSatisfiable(size, f"Range {header!r} is outside the {size} bytes of "
                                        "the file")
    return start, stop


#: bytes decoded ahead of the client: about two K3 4-bit frames
READ_AHEAD_BYTES = 24 << 20


def read_ahead(pieces: Iterator[bytes], limit: int = READ_AHEAD_BYTES) -> Iterator[bytes]:
    """``pieces``, produced on a thread of their own up to ``limit`` bytes ahead of the
    consumer: the next frame is decompressed and repacked (or fetched from S3) while the
    previous one goes out over the socket. Closing this generator (a client that hung
    up) stops the producer; its errors surface here."""
    unit = 256 << 10
    most = max(1, limit // unit)
    ahead = threading.Semaphore(most)  # one permit per 256 KiB ahead

    def permits(piece: bytes) -> int:  # a piece larger than the limit takes them all
        return min(most, max(1, -(-len(piece) // unit)))
    out: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for piece in pieces:
                for _ in range(permits(piece)):
                    while not ahead.acquire(timeout=0.5):
                        if stop.is_set():
                            return
                out.put(piece)
                if stop.is_set():
                    return
            out.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            out.put(exc)
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()

    producer = threading.Thread(target=produce, name="mrc-read-ahead", daemon=True)
    producer.start()
    try:
        while True:
            item = out.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            for _ in range(permits(item)):
                ahead.release()
            yield item
    finally:
        # no join: this may run wherever the generator is collected (the event loop,
        # after a client hung up); the producer sees the flag within half a second or
        # after its current piece, and a read that fails once the source is closed
        # only ends it
        stop.set()


@dataclass
class Download:
    filename: str
    size: int
    etag: str
    read: Callable[[int, int], Iterator[bytes]]   # (start, stop) -> bytes in pieces
    close: Callable[[], None]
    local_path: Path | None = None                # a plain local file: sendfile


class Downloads:
    def __init__(self, catalog: Catalog, storage: Storage, readers: Readers,
                 queries: Queries, queue: JobQueue, submit_job: Callable[..., Any]):
        self.catalog, self.storage, self.readers = catalog, storage, readers
        self.queries, self.queue, self.submit_job = queries, queue, submit_job

    # -- as received --------------------------------------------------------------

    def as_received(self, dataset_id: str, scope: Scope = Scope.ALL) -> Download:
        dataset = self.queries.dataset(dataset_id, scope)
        if dataset["status"] not in ("ready", "rejected"):
            raise Conflict(f"dataset {dataset_id} is {dataset['status']}; try again when it "
                           "is ready")
        received = self.readers.as_received(dataset)
        return Download(filename=dataset["name"], size=received.size,
                        etag=f'"{dataset["sha256"]}"',
                        read=lambda start, stop: read_ahead(received.read(start, stop)),
                        close=received.close, local_path=received.local_path)

    # -- conversions --------------------------------------------------------------

    def stored_conversion(self, dataset: dict[str, Any], target: mrc.Target) -> str | None:
        """The key of an object that already is ``target``: the archive, or a cached
        conversion (marked used now)."""
        info = dataset["info"]
        archive = info.get("archive") or {}
        form = self.readers.form(dataset)
        if form.archive_key is not None and archive.get("codec") and \
                target.byte_order == "<" and archive["codec"] == target.codec.cname and \
                archive.get("clevel") == target.clevel and \
                (target.mode if target.mode is not None else info.get("default_mode")) \
                == archive.get("mode") and \
                (form.form == FORM_ARCHIVE or form.record_key is None):
            return form.archive_key
        key = conversion_key(dataset["id"], target)
        if self.catalog.conversion_exists(dataset["id"], key) and \
                self.storage.store.size(key) is not None:
            self.catalog.record_conversion(dataset["id"], key, 0)  # used now
            return key
        return None

    def request_conversion(self, dataset_id: str, target: mrc.Target,
                           scope: Scope = Scope.ALL) -> dict[str, Any]:
        """Queue a conversion job (it waits for the dataset's ingest if that is running).
        The same conversion asked for again while one is queued or running, on any
        replica, is that job."""
        dataset = self.queries.dataset(dataset_id, scope)
        if dataset["status"] in ("rejected", "failed"):
            raise Conflict(f"dataset {dataset_id} is {dataset['status']}; nothing to convert")
        return self.submit_job("convert", dataset_id, target_to_dict(target),
                               dedup_key=PurePath(conversion_key(dataset_id, target)).name)

    async def converted(self, dataset_id: str, target: mrc.Target,
                        scope: Scope = Scope.ALL) -> Download:
        """``target``, converting now (by a worker) if it is not stored yet."""
        dataset = await asyncio.to_thread(self.queries.ready_dataset, dataset_id, scope)
        key = await asyncio.to_thread(self.stored_conversion, dataset, target)
        if key is None:
            job = await asyncio.to_thread(self.request_conversion, dataset_id, target)
            await self.wait_for(job["id"])
            key = await asyncio.to_thread(self.stored_conversion, dataset, target)
            if key is None:  # evicted between conversion and now: cache far too small
                raise Conflict("the conversion was evicted before it could be served; "
                               "raise MRC_INGEST_CONVERSION_CACHE_BYTES")
        return self.object_download(key, download_name(dataset["name"], target),
                                    f'"{dataset["sha256"]}-{PurePath(key).name}"')

    async def wait_for(self, job_id: str, poll_seconds: float = 0.1) -> dict[str, Any]:
        """Until the job is done (a worker here or on another replica ran it): its row.
        A failed job raises its recorded error, typed, as the request's own."""
        finished_here = self.queue.finished_event(job_id)
        while True:
            job = await asyncio.to_thread(self.queries.job, job_id)
            if job["state"] == "done":
                return job
            if job["state"] in ("failed", "cancelled"):
                raise from_body(job["error"] or {"error": "conflict",
                                                 "detail": f"job {job_id} was cancelled"})
            await asyncio.to_thread(finished_here.wait, poll_seconds)

    def job_result(self, job_id: str, scope: Scope = Scope.ALL) -> Download:
        """The converted file of a finished conversion job."""
        job = self.queries.job(job_id, scope)
        if job["kind"] != "convert":
            raise BadRequest(f"job {job_id} is an {job['kind']} job; it has no file to "
                             "download (see its dataset)")
        if job["state"] != "done":
            raise Conflict({"message": f"job {job_id} is {job['state']}",
                            "error": job["error"]})
        dataset = self.queries.dataset(job["dataset_id"])
        target = target_from_dict(job["target"])
        key = self.stored_conversion(dataset, target)
        if key is None:
            raise Conflict(f"the result of job {job_id} was evicted from the conversion "
                           "cache; request the conversion again")
        return self.object_download(key, download_name(dataset["name"], target),
                                    f'"{dataset["sha256"]}-{PurePath(key).name}"')

    def object_download(self, key: str, filename: str, etag: str) -> Download:
        store = self.storage.store
        size = store.size(key)
        if size is None:
            raise Conflict(f"stored object {key!r} is missing")

        return Download(filename=filename, size=size, etag=etag,
                        read=lambda start, stop: read_blocks(
                            partial(store.read_range, key), start, stop),
                        close=lambda: None, local_path=store.local_path(key))
