"""The one writer every upload's bytes go through (raw PUT, multipart, tus PATCH, .cs
particle files): counted against the size limit, hashed (SHA-256) and, where they must
wait somewhere, appended to a file in the same pass, in arrival order.

A PUT or multipart upload's bytes are only counted and hashed here: its ingest pass
keeps them in its own objects (:mod:`service.arrival.ingest_pass`), so they never touch
a scratch file. For tus the file is the upload's own partial file, appended PATCH after
PATCH with the hash carried across them in memory; for a particle file, this replica's
scratch copy (``incoming/<random>.part``, flock-ed while alive), written with
``O_DIRECT`` where the filesystem allows it. The file holds every byte once
:meth:`Receiver.digest` has been taken.

The event-loop side (:func:`pump`) gathers network chunks into lists of about 4 MiB (never
joined or copied on the loop) and hands each list to a worker thread while the next one
fills, so the loop stays free and an upload is back-pressured, not buffered, when the
work behind it (hashing, compression) is slower than the network.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Protocol

import anyio

from .errors import DigestMismatch, TooLarge, disk_errors
from .mrc.sink import DirectAppender, LockedTempFile

if TYPE_CHECKING:
    from .datastore import DataStore

BLOCK = 4 << 20
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class Appender(Protocol):
    def append(self, views: list[memoryview], offset: int) -> int:
        """Write (a first part of) ``views`` at ``offset``; the bytes written."""


class FileAppender:
    """Appends to a local file with ``pwritev`` (the caller owns ``fd``)."""

    def __init__(self, fd: int):
        self.fd = fd

    def append(self, views: list[memoryview], offset: int) -> int:
        return os.pwritev(self.fd, views[:IOV_MAX], offset)


def scratch_appender(path: Path, fd: int) -> "DirectAppender | FileAppender":
    """A :class:`~service.mrc.sink.DirectAppender` where the filesystem takes
    ``O_DIRECT`` (a scratch copy is read once, when it is stored, so its bytes need not
    pass through the page cache), else a :class:`FileAppender`."""
    return DirectAppender.open(path, fd) or FileAppender(fd)


class Receiver:
    """Hash and append bytes through ``out`` from ``offset`` on (``out=None``: count and
    hash only)."""

    def __init__(self, out: Appender | None, offset: int = 0, max_bytes: int | None = None):
        self.out = out
        self.offset = offset
        self.max_bytes = max_bytes
        self.received = 0
        self._hash = hashlib.sha256()
        self.sha256 = ""
        #: another digest fed the same bytes (a tus PATCH's Upload-Checksum)
        self.side_digest: Any = None
        self._beside: ThreadPoolExecutor | None = None

    def check_size(self, total: int) -> None:
        """``total`` bytes have arrived (counted on the loop, ahead of the writes)."""
        if self.max_bytes is not None and total > self.max_bytes:
            raise TooLarge(f"upload exceeds the limit of {self.max_bytes} bytes")

    def write(self, chunks: list[bytes]) -> None:
        """On a worker thread: hash (hashlib releases the GIL) and append."""
        with disk_errors():
            for chunk in chunks:
                self._hash.update(chunk)
                if self.side_digest is not None:
                    self.side_digest.update(chunk)
            if self.out is None:
                self.received += sum(len(c) for c in chunks)
                return
            views = [memoryview(c).cast("B") for c in chunks if len(c)]
            while views:
                written = self.out.append(views, self.offset)
                self.offset += written
                self.received += written
                while views and written >= len(views[0]):
                    written -= len(views[0])
                    views.pop(0)
                if written:
                    views[0] = views[0][written:]

    def write_beside(self, chunks: list[bytes], work: Callable[[list[bytes]], None]) -> None:
        """:meth:`write` on this receiver's own thread while ``work`` (the frame
        processing of the same bytes) runs on the calling one: hashing (and any copy)
        then cost no time on the path of the frames."""
        if self._beside is None:
            self._beside = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mrc-receive")
        pending = self._beside.submit(self.write, chunks)
        try:
            work(chunks)
        finally:
            pending.result()

    def close(self) -> None:
        if self._beside is not None:
            self._beside.shutdown()
            self._beside = None

    def flush(self) -> None:
        """Everything written is in the file (an appender that stages bytes writes
        them out)."""
        flush = getattr(self.out, "flush", None)
        if flush is not None:
            with disk_errors():
                flush()

    def digest(self, expected: str | None = None) -> str:
        """The SHA-256 of everything written; a client's ``expected`` digest must match.
        All bytes are in: the file holds them all from here on."""
        self.flush()
        self.sha256 = self._hash.hexdigest()
        if expected and expected != self.sha256:
            raise DigestMismatch(f"the body's SHA-256 is {self.sha256}, the client said "
                                 f"{expected}; nothing was stored")
        return self.sha256


class ScratchCopy:
    """The scratch file behind a :class:`Receiver` for a one-request upload."""

    def __init__(self, folder: Path, max_bytes: int):
        self._temp = LockedTempFile(folder / "upload")
        self.path = self._temp.path
        try:
            self._out = scratch_appender(self.path, self._temp.fd)
        except BaseException:
            self._temp.discard()
            raise
        self.receiver = Receiver(self._out, 0, max_bytes)

    def keep_as(self, store: "DataStore", key: str) -> int:
        """Make the copy durable and move it into ``store`` under ``key``; its size. It
        stays locked (a sweep leaves it alone) until it has moved."""
        self.receiver.close()
        try:
            with disk_errors():
                self.receiver.flush()
                os.fsync(self._temp.fd)
                return store.put_file(key, self.path)
        finally:
            self.discard()  # what is left of it, and its lock

    def discard(self) -> None:
        self.receiver.close()
        try:
            self._temp.discard()
        finally:
            if isinstance(self._out, DirectAppender):
                self._out.close()


async def pump(chunks: AsyncIterator[bytes], receiver: Receiver,
               consume: Callable[[list[bytes]], None],
               first: Callable[[bytes], None] | None = None,
               keep_partial: bool = False) -> None:
    """Read ``chunks`` to the end. ``first(bytes)`` sees the first 1024 bytes on the loop
    before anything is written (the header check); then each ~4 MiB list goes to
    ``consume`` on a worker thread, one list in flight while the next fills.
    ``keep_partial``: when the body breaks off (the client went away), what arrived is
    still consumed before the error goes on (a tus upload resumes from there)."""
    pending: asyncio.Future | None = None
    batch: list[bytes] = []
    batched = 0
    total = receiver.received  # what earlier requests gave (tus), then this one's bytes
    checked = first is None
    try:
        async for chunk in _flushing(chunks, lambda: batch if keep_partial and checked
                                     else None, consume, lambda: pending):
            if not chunk:
                continue
            total += len(chunk)
            receiver.check_size(total)
            batch.append(chunk)
            batched += len(chunk)
            if not checked and batched >= 1024:
                first(b"".join(batch)[:1024])  # type: ignore[misc]
                checked = True
            if checked and batched >= BLOCK:
                if pending is not None:
                    await pending
                pending = asyncio.ensure_future(anyio.to_thread.run_sync(consume, batch))
                batch, batched = [], 0
        if pending is not None:
            await pending
            pending = None
        if not checked:
            first(b"".join(batch))  # type: ignore[misc]  # under 1024 bytes: refused
        if batch:
            await anyio.to_thread.run_sync(consume, batch)
    except BaseException:
        if pending is not None:
            await asyncio.gather(pending, return_exceptions=True)
        raise


async def _flushing(chunks: AsyncIterator[bytes], partial: Callable[[], list[bytes] | None],
                    consume: Callable[[list[bytes]], None],
                    pending: Callable[[], asyncio.Future | None]) -> AsyncIterator[bytes]:
    """``chunks``, but if reading them fails, the batch gathered so far (``partial()``)
    is consumed first, after the batch in flight."""
    iterator = chunks.__aiter__()
    while True:
        try:
            chunk = await iterator.__anext__()
        except StopAsyncIteration:
            return
        except BaseException:
            batch = partial()
            if batch:
                in_flight = pending()
                if in_flight is not None:
                    await asyncio.gather(in_flight, return_exceptions=True)
                await anyio.to_thread.run_sync(consume, list(batch))
                batch.clear()
            raise
        yield chunk
