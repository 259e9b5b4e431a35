"""Where a writer's bytes go: a sink takes them in order and makes them visible only on
commit. The format core writes to a local file through :class:`AtomicFile`; the service
hands its writers the datastore's sinks (an object-store multipart upload, say), which
speak the same three calls.

A sink may reserve its first bytes and take them at commit (``head``): the MRC header
holds totals known only at the end, and an object store cannot seek back to fill them.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import secrets
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from .buffers import copy_into
from .checksum import crc32

PART_SUFFIX = ".part"
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class Sink(Protocol):
    written: int

    def write(self, data: bytes | memoryview) -> None: ...

    def commit(self, head: bytes | None = None, *, durable: bool = True) -> int: ...

    def abort(self) -> None: ...


def fsync_directory(path: Path) -> None:
    """Make a rename durable: fsync the folder that holds the new name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> int:
    view = memoryview(data).cast("B")
    total = len(view)
    while view:
        view = view[os.write(fd, view):]
    return total


class DirectAppender:
    """Appends to a local file through ``O_DIRECT``: the bytes go from a staging buffer
    to the disk without being copied into the page cache. That copy into fresh page
    cache (the kernel's ``copy_folio_from_iter_atomic``) cost ~1.2 CPU-s per GiB on a
    2-core VM (bench/bench_cpu.py, perf), more than the SHA-256 of the same bytes.

    The bytes are staged in two page-aligned buffers taken in turn: a full one is
    written by a background thread while the next fills, so the caller does not wait
    for the disk (a direct write returns only once the device has the bytes). What is
    left below one aligned block goes out through the ordinary ``fd`` at :meth:`flush`,
    after which the file holds everything appended and later appends go through ``fd``.
    Should the filesystem refuse direct I/O on a write, that write and the rest go
    through ``fd``. :meth:`open` gives None where ``O_DIRECT`` cannot even be opened."""

    ALIGN = 4096
    STAGE = 4 << 20

    @classmethod
    def open(cls, path: str | os.PathLike, fd: int) -> "DirectAppender | None":
        if not hasattr(os, "O_DIRECT"):
            return None
        try:
            return cls(path, fd)
        except OSError:
            return None

    def __init__(self, path: str | os.PathLike, fd: int):
        self.fd = fd  # the caller's: fsync, reads, the tail
        self._direct: int | None = os.open(path, os.O_WRONLY | os.O_DIRECT)
        # anonymous mappings are page-aligned, as O_DIRECT needs; pages are touched
        # (and count in RSS) only as bytes are staged
        self._maps = [mmap.mmap(-1, self.STAGE), mmap.mmap(-1, self.STAGE)]
        self._views = [memoryview(m) for m in self._maps]
        self._current = 0
        self._staged = 0
        self._written = 0  # bytes handed to writes (a multiple of ALIGN while direct)
        self._pending: Future | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._refused = False   # a direct write was refused: the rest through ``fd``
        self._flushed = False   # after flush(): appends go straight through ``fd``

    def append(self, views: list[memoryview], offset: int) -> int:
        if offset != self._written + self._staged:
            raise ValueError(f"append at {offset}, the file ends at "
                             f"{self._written + self._staged}")
        if self._flushed:
            return os.pwritev(self.fd, views[:_IOV_MAX], offset)
        total = 0
        for view in views:
            pos, size = 0, len(view)
            while pos < size:
                n = min(size - pos, self.STAGE - self._staged)
                copy_into(self._maps[self._current], self._staged, view[pos:pos + n])
                self._staged += n
                pos += n
                if self._staged == self.STAGE:
                    self._send_full()
            total += size
        return total

    def _send_full(self) -> None:
        """The current buffer is full: write it in the background, stage into the other
        (once its own write is done)."""
        self._wait()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mrc-direct")
        self._pending = self._writer.submit(self._write, self._views[self._current],
                                            self.STAGE, self._written)
        self._written += self.STAGE
        self._current = 1 - self._current
        self._staged = 0

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write(self, view: memoryview, n: int, offset: int) -> None:
        done = 0
        while done < n:
            if not self._refused and self._direct is not None:
                try:
                    done += os.pwrite(self._direct, view[done:n], offset + done)
                    continue
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self._refused = True  # by this filesystem: through the page cache
            done += os.pwrite(self.fd, view[done:n], offset + done)

    def flush(self) -> None:
        """Everything appended is in the file (the last partial block through ``fd``);
        appends after this one go through ``fd``."""
        self._wait()
        if self._flushed:
            return
        stage = self._views[self._current]
        aligned = self._staged // self.ALIGN * self.ALIGN
        if aligned:
            self._write(stage, aligned, self._written)
        self._stop_direct()
        self._flushed = True
        done = aligned
        while done < self._staged:
            done += os.pwrite(self.fd, stage[done:self._staged], self._written + done)
        self._written += self._staged
        self._staged = 0

    def _stop_direct(self) -> None:
        direct, self._direct = self._direct, None
        if direct is not None:
            os.close(direct)

    def close(self) -> None:
        """Release the buffers, the thread and the direct descriptor (bytes not flushed
        are dropped: the caller is discarding the file)."""
        try:
            self._wait()
        except OSError:
            pass  # the file is being discarded; its write error does not matter now
        finally:
            if self._writer is not None:
                self._writer.shutdown()
                self._writer = None
            self._stop_direct()
            for view in self._views:
                view.release()
            for mapped in self._maps:
                if not mapped.closed:
                    mapped.close()


class LockedTempFile:
    """A temporary ``.<name>.<random>.part`` beside ``final``, exclusively ``flock``-ed
    for as long as it is open, so that a sweep can tell a live writer's file from one a
    crashed process left (the kernel drops a dead process's locks)."""

    def __init__(self, final: Path):
        final.parent.mkdir(parents=True, exist_ok=True)
        self.final = final
        self.path = final.with_name(f".{final.name}.{secrets.token_hex(6)}{PART_SUFFIX}")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def publish(self, durable: bool = True) -> None:
        """fsync, rename into place, fsync the folder; the lock goes with the close.
        ``durable=False``: no fsync (a file that is read once and removed before
        anything depends on its surviving a power loss)."""
        if durable:
            os.fsync(self.fd)
        os.replace(self.path, self.final)
        if durable:
            fsync_directory(self.final.parent)
        self.close()

    def discard(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the flock
            self.fd = -1


class AtomicFile:
    """A :class:`Sink` for a local file: written under a temporary name, renamed over
    ``path`` on commit after fsync; on abort (or any error) nothing is left.

    The body goes through a :class:`DirectAppender` where the filesystem allows it
    (``direct=True``): an archive is written once and read back once, so the copy into
    the page cache is pure cost, and the fsync at commit has little left to do."""

    def __init__(self, path: str | os.PathLike, *, reserve_head: int = 0,
                 direct: bool = True):
        self.path = Path(path)
        self._temp = LockedTempFile(self.path)
        self._reserve = reserve_head
        self.written = 0
        #: CRC-32 of the body (after the reserved head) and, after commit, of the head:
        #: what the file should hold when it is read back
        self.body_crc32 = 0
        self.head_crc32: int | None = None
        self._direct = DirectAppender.open(self._temp.path, self._temp.fd) if direct \
            else None
        try:
            if self._direct is not None:
                if reserve_head:  # staged as zeros: direct writes start at offset 0
                    self._direct.append([memoryview(bytes(reserve_head))], 0)
            elif reserve_head:
                os.ftruncate(self._temp.fd, reserve_head)
                os.lseek(self._temp.fd, reserve_head, os.SEEK_SET)
        except BaseException:
            self.abort()
            raise

    @property
    def temp_path(self) -> Path:
        return self._temp.path

    def write(self, data: bytes | memoryview) -> None:
        try:
            if self._direct is not None:
                view = memoryview(data).cast("B")
                self.written += self._direct.append([view], self._reserve + self.written)
            else:
                self.written += write_all(self._temp.fd, data)
            self.body_crc32 = crc32(data, self.body_crc32)
        except BaseException:
            self.abort()
            raise

    def commit(self, head: bytes | None = None, *, durable: bool = True) -> int:
        try:
            if self._direct is not None:
                self._direct.flush()  # the last partial block, through the page cache
            if head is not None:
                if len(head) != self._reserve:
                    raise ValueError(f"head of {len(head)} bytes for a reserve of "
                                     f"{self._reserve}")
                os.pwrite(self._temp.fd, head, 0)
            self.head_crc32 = crc32(head if head is not None else bytes(self._reserve))
            self._temp.publish(durable)
        except BaseException:
            self.abort()
            raise
        finally:
            self._close_direct()
        return self._reserve + self.written

    def _close_direct(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None

    def abort(self) -> None:
        try:
            self._temp.discard()
        finally:
            self._close_direct()
