"""MRCZ compression: the codec enum, blosc chunk headers, the frame-offset index.

MRCZ spec 0.5 (python-mrcz ``specification.rst``): MODE = mrc_mode + 1000 * codec; the
data section is NZ consecutive c-blosc chunks, one per frame, bitshuffle on. A c-blosc
1.x chunk starts with a 16-byte header (``README_HEADER.rst``): version, versionlz,
flags, typesize as uint8, then nbytes, blocksize, cbytes as little-endian uint32, where
cbytes is the whole chunk including its header. Walking cbytes from chunk to chunk
gives every frame's offset without decompressing anything.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Callable

import blosc
import blosc2
import numpy as np

from .findings import Finding, error, warning

#: MODE = base mode + MRCZ_MODE_FACTOR * codec (MRCZ spec, "Word 4").
MRCZ_MODE_FACTOR = 1000
#: c-blosc 1.x adds at most this to an incompressible buffer (its BLOSC_MAX_OVERHEAD)
BLOSC_MAX_OVERHEAD = 16
#: c-blosc 1.x refuses chunks larger than this (BLOSC_MAX_BUFFERSIZE).
BLOSC_MAX_CHUNK = 2**31 - 1 - BLOSC_MAX_OVERHEAD
#: Bytes per blosc block. On 4096^2 counting frames, zstd-1, 1 MiB blocks compress 4%
#: smaller with 21% less CPU than python-mrcz's 64 KiB (bench/bench_core.py); blosc
#: clamps the block to the frame for small frames.
BLOCKSIZE = 1 << 20


class Codec(IntEnum):
    """The MRCZ codec enumeration. The member name, lower-cased, is blosc's cname."""

    NONE = 0
    BLOSCLZ = 1
    LZ4 = 2
    LZ4HC = 3
    SNAPPY = 4
    ZLIB = 5
    ZSTD = 6

    @property
    def cname(self) -> str:
        return self.name.lower()

    @property
    def available(self) -> bool:
        """Whether this machine's blosc can compress with it (snappy left c-blosc 1.21)."""
        return self is Codec.NONE or self.cname in blosc.compressor_list()

    @classmethod
    def from_name(cls, name: str) -> "Codec":
        try:
            return CODEC_BY_NAME[name.lower()]
        except KeyError:
            raise ValueError(f"unknown codec {name!r}; known: {sorted(CODEC_BY_NAME)}") from None


CODEC_BY_NAME: dict[str, Codec] = {codec.cname: codec for codec in Codec}


def split_mode(raw_mode: int) -> tuple[int, int]:
    """(base MRC mode, codec id) of a possibly MRCZ MODE word."""
    return raw_mode % MRCZ_MODE_FACTOR, raw_mode // MRCZ_MODE_FACTOR


def join_mode(mode: int, codec: Codec) -> int:
    return mode + MRCZ_MODE_FACTOR * int(codec)


_CHUNK_HEADER = struct.Struct("<4B3I")
CHUNK_HEADER_SIZE = _CHUNK_HEADER.size
#: Byte 0 of a chunk: the c-blosc 1.x format version we read.
BLOSC1_FORMAT_VERSION = 2
BLOSC2_FORMAT_VERSION = 5


@dataclass(frozen=True)
class ChunkHeader:
    version: int
    versionlz: int
    flags: int
    typesize: int
    nbytes: int
    blocksize: int
    cbytes: int

    @classmethod
    def parse(cls, raw: bytes) -> "ChunkHeader":
        return cls(*_CHUNK_HEADER.unpack(raw[:CHUNK_HEADER_SIZE]))

    def refusal(self, frame_nbytes: int) -> str | None:
        """Why this chunk cannot be one frame of ``frame_nbytes`` (None if it can), told
        from its header alone, before any byte is decompressed: only c-blosc 1.x chunks
        are read, and one that claims another size is a decompression bomb."""
        if self.version == BLOSC2_FORMAT_VERSION:
            return ("blosc2-format chunk (version 5); only c-blosc 1.x chunks (version 2) "
                    "are supported")
        if self.version != BLOSC1_FORMAT_VERSION:
            return (f"not a blosc chunk (format version {self.version}, expected "
                    f"{BLOSC1_FORMAT_VERSION})")
        if self.nbytes != frame_nbytes:
            return (f"chunk claims {self.nbytes} uncompressed bytes but a frame is "
                    f"{frame_nbytes}; refusing to decompress it")
        return None


@dataclass(frozen=True)
class FrameIndex:
    """Where each compressed frame lives: byte offset and length of its blosc chunk."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def packed_bytes(self) -> int:
        return sum(self.sizes)


def index_chunks(read_at: Callable[[int, int], bytes], start: int, n_frames: int,
                 frame_nbytes: int, file_size: int) -> tuple[FrameIndex | None, list[Finding]]:
    """Walk the chunk headers from ``start`` and index ``n_frames`` frames
    (``read_at(offset, n)`` reads the file).

    Each chunk must decompress to exactly ``frame_nbytes`` (what the MRC header implies);
    a chunk that claims otherwise is refused before any decompression, so a lying chunk
    cannot inflate past its frame (a decompression bomb). Returns ``None`` with error
    findings when the walk cannot complete.
    """
    findings: list[Finding] = []
    offsets: list[int] = []
    sizes: list[int] = []
    pos = start
    for k in range(n_frames):
        raw = read_at(pos, CHUNK_HEADER_SIZE)
        where = f"frame {k} (byte {pos})"
        if len(raw) < CHUNK_HEADER_SIZE:
            findings.append(error("data", f"{where}: file ends before its blosc chunk header; "
                                          f"{n_frames - k} of {n_frames} frames missing"))
            return None, findings
        chunk = ChunkHeader.parse(raw)
        if (refusal := chunk.refusal(frame_nbytes)) is not None:
            findings.append(error("data", f"{where}: {refusal}"))
            return None, findings
        if chunk.cbytes < CHUNK_HEADER_SIZE or pos + chunk.cbytes > file_size:
            findings.append(error("data", f"{where}: chunk of {chunk.cbytes} bytes runs past the "
                                          f"end of the file ({file_size} bytes); file truncated?"))
            return None, findings
        offsets.append(pos)
        sizes.append(chunk.cbytes)
        pos += chunk.cbytes
    if pos < file_size:
        findings.append(warning("data", f"{file_size - pos} bytes after the last chunk "
                                        f"(ends at byte {pos}) are ignored"))
    return FrameIndex(tuple(offsets), tuple(sizes)), findings


def compress_frame(frame: np.ndarray, codec: Codec, clevel: int,
                   threads: int | None = None) -> bytes:
    """One frame -> one blosc chunk, bitshuffled with the pixel size as typesize.
    ``threads``: blosc threads for this chunk (default: :func:`set_threads`'s)."""
    frame = np.ascontiguousarray(frame)
    if frame.nbytes > BLOSC_MAX_CHUNK:
        raise ValueError(f"a frame of {frame.nbytes} bytes exceeds blosc's 2 GiB chunk limit")
    # blosc keeps the blocksize and thread count process-wide and other code
    # (python-mrcz, for one) changes them; set ours on every call so the output does not
    # depend on who ran last. Releasing the GIL lets the writer compress on one thread
    # while the caller decodes and takes statistics of the next frame on another.
    blosc.set_blocksize(BLOCKSIZE)
    blosc.set_releasegil(True)
    blosc.set_nthreads(threads or _threads)
    return blosc.compress_ptr(frame.ctypes.data, frame.size, frame.dtype.itemsize,
                              clevel=clevel, shuffle=blosc.BITSHUFFLE, cname=codec.cname)


def decompress_into(chunk: bytes | memoryview | np.ndarray, out: np.ndarray) -> None:
    """Decompress a chunk into ``out`` (C-contiguous, exactly the frame's size).

    The caller has checked the chunk's nbytes against the frame size (``index_chunks``);
    this re-checks so that a chunk changed on disk since indexing cannot overflow ``out``.

    The chunk is a c-blosc 1.x chunk (what MRCZ holds and python-mrcz reads); it is
    decompressed by c-blosc2, which reads that format too, gives the same bytes and
    takes about half the CPU of c-blosc 1.x on bitshuffled zstd chunks (DESIGN.md §12;
    bench/bench_cpu.py measures both). Only reading changes: chunks are still written
    by c-blosc 1.x (:func:`compress_frame`), which ``mrcz`` needs.
    """
    if not out.flags.c_contiguous:
        raise ValueError("decompress_into needs a C-contiguous output array")
    header = ChunkHeader.parse(bytes(memoryview(chunk)[:CHUNK_HEADER_SIZE]))
    if header.nbytes != out.nbytes or len(chunk) != header.cbytes:
        raise ValueError(f"chunk holds {header.nbytes} bytes in {header.cbytes}, expected "
                         f"{out.nbytes} bytes in {len(chunk)}")
    if header.version != BLOSC1_FORMAT_VERSION:
        # c-blosc2 would read its own format too; MRCZ holds c-blosc 1.x chunks only
        raise ValueError(f"not a c-blosc 1.x chunk (format version {header.version})")
    blosc2.set_releasegil(True)
    try:
        blosc2.decompress2(chunk, dst=out.reshape(-1).view(np.uint8), nthreads=_threads)
    except Exception as exc:  # blosc2 raises RuntimeError/ValueError for bad payloads
        raise ValueError(f"blosc could not decompress the chunk: {exc}") from None


#: blosc threads per chunk compressed or decompressed. One, with the GIL released: with
#: more, c-blosc 1.x and c-blosc2 keep the calling thread's GIL for the whole call, and
#: every other thread waits -- measured on a 23.6 MB K3 frame, 4.4 ms per compress and
#: 4.2 ms per decompress during which the service's event loop could not answer
#: anything, for the same CPU-seconds. The service gets its parallelism from its
#: pipeline instead (one frame compressed while the next is measured). A program that
#: only compresses (a converter run alone, a benchmark) may take more: set_threads.
_threads = 1


def thread_count() -> int:
    """The blosc threads per chunk now (:func:`set_threads`)."""
    return _threads


def set_threads(n: int) -> int:
    """Set the blosc threads per chunk (this process); returns the previous value."""
    global _threads
    previous, _threads = _threads, max(1, n)
    return previous
