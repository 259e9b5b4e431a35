"""Where a writer's bytes go: a sink takes them in order and makes them visible only on
commit. The format core writes to a local file through :class:`AtomicFile`; the service
hands its writers the datastore's sinks (an object-store multipart upload, say), which
speak the same three calls.

A sink may reserve its first bytes and take them at commit (``head``): the MRC header
holds totals known only at the end, and an object store cannot seek back to fill them.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import zlib
from pathlib import Path
from typing import Protocol

PART_SUFFIX = ".part"


class Sink(Protocol):
    written: int

    def write(self, data: bytes | memoryview) -> None: ...

    def commit(self, head: bytes | None = None) -> int: ...

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

    def publish(self) -> None:
        """fsync, rename into place, fsync the folder; the lock goes with the close."""
        os.fsync(self.fd)
        os.replace(self.path, self.final)
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
    ``path`` on commit after fsync; on abort (or any error) nothing is left."""

    def __init__(self, path: str | os.PathLike, *, reserve_head: int = 0):
        self.path = Path(path)
        self._temp = LockedTempFile(self.path)
        self._reserve = reserve_head
        self.written = 0
        #: CRC-32 of the body (after the reserved head) and, after commit, of the head:
        #: what the file should hold when it is read back
        self.body_crc32 = 0
        self.head_crc32: int | None = None
        if reserve_head:
            try:
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
            self.written += write_all(self._temp.fd, data)
            self.body_crc32 = zlib.crc32(data, self.body_crc32)
        except BaseException:
            self.abort()
            raise

    def commit(self, head: bytes | None = None) -> int:
        try:
            if head is not None:
                if len(head) != self._reserve:
                    raise ValueError(f"head of {len(head)} bytes for a reserve of "
                                     f"{self._reserve}")
                os.pwrite(self._temp.fd, head, 0)
            self.head_crc32 = zlib.crc32(head if head is not None else bytes(self._reserve))
            self._temp.publish()
        except BaseException:
            self.abort()
            raise
        return self._reserve + self.written

    def abort(self) -> None:
        self._temp.discard()
