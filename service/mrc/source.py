"""Where the bytes of a file come from: positional reads of a local file, of bytes in
memory, or (outside the format core) of an object in a store.

The reader needs only two things of its input: its size and "give me ``n`` bytes at
``offset``". Keeping that behind one small protocol lets the same :class:`MrcFile` read a
movie on local disk with ``pread`` and an archive in an object store with ranged GETs,
with no knowledge of which.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .buffers import copy_into


@runtime_checkable
class ByteSource(Protocol):
    """Random-access bytes. ``read_at`` returns fewer than ``n`` bytes only at the end."""

    name: str
    size: int

    def read_at(self, offset: int, n: int) -> bytes: ...

    def readinto_at(self, buffer: np.ndarray, offset: int) -> int: ...

    def close(self) -> None: ...


class FileSource:
    """A local file read with ``pread`` (no shared file position, so threads may share
    one source)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = str(self.path)
        self._fd = os.open(self.path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size

    @classmethod
    def from_fd(cls, fd: int, path: str | os.PathLike) -> "FileSource":
        """A source over a descriptor already opened (and checked) by the caller; it
        owns the descriptor from now on."""
        source = cls.__new__(cls)
        source.path, source.name, source._fd = Path(path), str(path), fd
        source.size = os.fstat(fd).st_size
        return source

    def read_at(self, offset: int, n: int) -> bytes:
        return os.pread(self._fd, n, offset)

    def readinto_at(self, buffer: np.ndarray, offset: int) -> int:
        """Fill ``buffer`` from ``offset``; loops because one ``preadv`` returns at most
        ~2 GiB on Linux. Returns the bytes read."""
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()


class BytesSource:
    """Bytes already in memory (small files, tests)."""

    def __init__(self, data: bytes, name: str = "<bytes>"):
        self._data = memoryview(data)
        self.name = name
        self.size = len(data)

    def read_at(self, offset: int, n: int) -> bytes:
        return bytes(self._data[offset:offset + n])

    def readinto_at(self, buffer: np.ndarray, offset: int) -> int:
        chunk = self._data[offset:offset + buffer.nbytes]
        copy_into(buffer, 0, chunk)
        return len(chunk)

    def close(self) -> None:
        pass


def open_source(where: str | os.PathLike | ByteSource) -> tuple[ByteSource, bool]:
    """A source for ``where`` and whether the caller opened it (and must close it)."""
    if isinstance(where, (str, os.PathLike)):
        return FileSource(where), True
    return where, False
