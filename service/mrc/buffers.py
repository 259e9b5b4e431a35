"""Frame-sized buffers, recycled.

Ingest handles every frame of a movie with a few frame-sized arrays (the received bytes,
the unpacked counts, the repacked proof). Fresh arrays of 10-50 MB each frame cost a page
fault and a zeroed page per 4 KiB every time (about a second of CPU per GiB of 4-bit
movie), and glibc's arenas keep freed ones around, which inflates the process' memory.
A pool hands the same few buffers round instead. A buffer goes back only once nothing
reads it any more: the caller that gives it back is responsible for that.
"""

from __future__ import annotations

import threading

import numpy as np


class BufferPool:
    """Flat uint8 buffers by size; at most ``keep`` idle ones are held."""

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._idle: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        """A flat uint8 array of ``nbytes`` (contents undefined)."""
        with self._lock:
            for i, buffer in enumerate(self._idle):
                if buffer.size == nbytes:
                    return self._idle.pop(i)
        return np.empty(nbytes, dtype=np.uint8)

    def clear(self) -> None:
        """Let the idle buffers go (the pass is over: an ingest pass is tied up in
        reference cycles, so without this its buffers wait for the cyclic garbage
        collector, and two movies' worth were measured alive at once)."""
        with self._lock:
            self._idle.clear()

    def give(self, buffer: np.ndarray) -> None:
        """Hand back a buffer from :meth:`take` that nothing reads any more."""
        flat = buffer if buffer.base is None else buffer.base
        if not isinstance(flat, np.ndarray) or flat.dtype != np.uint8 or flat.ndim != 1:
            return  # not one of ours (a view of something else): let it go
        with self._lock:
            if len(self._idle) < self.keep and all(b is not flat for b in self._idle):
                self._idle.append(flat)


def copy_into(target, at: int, source) -> None:
    """``target[at:at + len(source)] = source`` for writable byte buffers (bytearray,
    mmap, uint8 array), copied by numpy, which lets other threads run meanwhile: a
    ``bytearray`` or ``memoryview`` slice assignment keeps the GIL for the whole copy
    (279 ms for 256 MiB, measured), and in a ``serve`` the thread that waits is the
    event loop."""
    src = np.frombuffer(source, dtype=np.uint8)
    np.copyto(np.frombuffer(target, dtype=np.uint8, count=src.size, offset=at), src)
