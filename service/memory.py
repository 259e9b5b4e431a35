"""glibc's allocator, set for a process that streams frame after frame, and handed
back what a finished movie no longer uses. Not glibc (another libc, another OS): every
call here does nothing."""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Any

log = logging.getLogger("mrc_ingest.memory")

#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def tune_malloc(mmap_threshold: int = 32 << 20, keep_free: int = 16 << 20,
                arenas: int = 1) -> None:
    """glibc's allocator, set for a process that streams frame after frame. Not glibc:
    no-op. Measured with bench/bench_cpu.py (1 GiB 4-bit K3 PUTs, per GiB received):

    - ``mmap_threshold``: blocks this large or larger get their own mapping. A K3
      frame's buffers (23.6 MB unpacked, python-blosc's output for each chunk) are
      below it and reuse heap pages: with a fresh mapping each, every page was faulted
      in again, frame after frame (200k minor faults per GiB -> 20k, 7.2 -> 6.6
      CPU-s/GiB). Larger frames (float32 K3: 94 MB) are still mapped and returned.
    - ``arenas``: one heap for every thread. With an arena per thread each kept its own
      freed frames, and peak RSS rose from 287 to 350-384 MiB; with one, 296-305 MiB,
      and 275-292 MiB once a pass also hands its buffers back at its end
      (:func:`give_back_free_memory`; the ingest's frame buffers are recycled by
      :class:`service.mrc.buffers.BufferPool` and the proof decompresses into the
      frame's own buffer). Threads contend for
      the arena's lock only when they allocate outside Python's small-object allocator,
      a few times per frame.
    - ``keep_free``: this much free memory may stay at the top of the heap instead of
      going back to the OS at once; at glibc's 128 KiB the request bodies' chunks (256
      KiB socket reads, freed on worker threads) faulted their pages in again on the
      event loop (its CPU 0.85 -> 0.57 s/GiB)."""
    libc = _glibc()
    if libc is None:
        return
    for name, parameter, value in (("arenas", _M_ARENA_MAX, arenas),
                                   ("mmap_threshold", _M_MMAP_THRESHOLD, mmap_threshold),
                                   ("keep_free", _M_TRIM_THRESHOLD, keep_free)):
        if libc.mallopt(parameter, value) != 1:  # glibc: 1 on success
            log.warning(f"malloc refused {name}={value}; its default stays")


def give_back_free_memory() -> None:
    """Return the heap's free pages to the OS (``malloc_trim``), wherever they lie: a
    movie's frame buffers, freed when its pass ends, would otherwise stay in RSS behind
    whatever was allocated above them, until the next movie reuses them. A movie of
    another frame size (int16 after 4-bit) found them no use: with one arena, peak RSS
    through the int16 PUTs was 386 MiB without this and 350-353 MiB with it (344 with
    an arena per thread; bench_cpu.py). Costs a few milliseconds, once per movie."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> Any:
    """The C library this process runs on, if it has glibc's mallopt and malloc_trim
    (the process's own symbols: no search for a library file)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return None
    return libc
