"""The restore record: what an MRCZ archive alone cannot give back of the file as it was
received, and the rebuild of those bytes (whole, or any byte range) from archive + record.

An archive rewrites the header (mode, MZ, labels, statistics, byte order), may change the
mode (4-bit counts become mode-0 bytes, IMOD's unsigned bytes become mode 6) and holds
every pixel value. What it cannot hold, the record keeps (ARCHITECTURE.md, "The write path"):

- the original 1024-byte header and the NSYMBT bytes of extended header, verbatim;
- the source layout: mode, byte order, 4-bit packing (mode 101 or IMOD's half-width
  mode 0), sizes, where the data starts;
- for 4-bit data with odd ``nx``, the value of the padding nibble that ends every row
  (IMOD ``mrc_format.txt``: rows are ``(nx + 1) // 2`` bytes; writers need not zero it);
- the length of the bytes after the archive's last frame (the bytes themselves are kept
  as their own object, the tail, since they can be large): what a writer left after the
  last frame, or -- in a record that only carries a one-request upload's bytes to their
  rebuild as the file received (:class:`Carrier`) -- every byte from the first frame the
  archive could not prove.

Float data are never converted on the way (the archive keeps the source's float mode and
only the byte order changes, which moves bytes, not values), so NaN payloads and -0.0
survive bit for bit.

The record is one small ``.npz`` (numpy's own container, loaded with
``allow_pickle=False``): the verbatim bytes and padding as uint8 arrays, the frame index
of the archive as int64 arrays, and the rest as JSON.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
from numpy.lib.format import descr_to_dtype, dtype_to_descr

from . import header as hdr
from .codec import FrameIndex, decompress_into
from .modes import cast_to, decode_stored, pack_4bit

RECORD_VERSION = 1


@dataclass(frozen=True)
class SourceLayout:
    """How the received file stored its pixels (the parts of :class:`header.Layout` a
    rebuild needs, in JSON-ready form)."""

    byte_order: str            # "<" or ">"
    mode: int                  # 101 for any 4-bit packing
    packing: str | None        # header.PACKED_MODE_101, PACKED_HALF_WIDTH or None
    nx: int                    # pixels per row
    ny: int
    nz: int
    data_offset: int           # 1024 + NSYMBT
    frame_nbytes: int          # stored bytes of one frame
    stored_dtype: Any          # numpy descr of a stored pixel, file byte order ("|u1" for 4-bit)

    @classmethod
    def of(cls, layout: hdr.Layout) -> "SourceLayout":
        return cls(byte_order=layout.byte_order, mode=layout.mode, packing=layout.packing,
                   nx=layout.nx, ny=layout.ny, nz=layout.nz, data_offset=layout.data_offset,
                   frame_nbytes=layout.frame_nbytes,
                   stored_dtype=dtype_to_descr(layout.stored_dtype))

    @property
    def dtype(self) -> np.dtype:
        """The stored pixel dtype (structured for complex int16, mode 3)."""
        descr = self.stored_dtype
        if isinstance(descr, list):  # JSON turned the descr's tuples into lists
            descr = [tuple(item) for item in descr]
        return descr_to_dtype(descr)

    @property
    def row_nbytes(self) -> int:
        return self.frame_nbytes // self.ny

    @property
    def odd_4bit(self) -> bool:
        return self.packing is not None and self.nx % 2 == 1


@dataclass
class RestoreRecord:
    """Everything needed, with the archive, to give back the received bytes exactly."""

    size: int                          # bytes received
    sha256: str                        # of the bytes received
    header: bytes                      # the first 1024 bytes, verbatim
    extended: bytes                    # NSYMBT bytes after them, verbatim
    source: SourceLayout
    archive_mode: int                  # the mode the archive holds the pixels in
    frame_index: FrameIndex            # where each frame's chunk lies in the archive
    archive_data_offset: int           # 1024 + the archive's own NSYMBT
    padding: np.ndarray | None = None  # (nz, ny) uint8 nibble values, odd-nx 4-bit only
    tail_size: int = 0                 # bytes after the archive's frames (an object)
    notes: list[str] = field(default_factory=list)

    @property
    def frames(self) -> int:
        """Frames the archive gives back (``source.nz`` but in a :class:`Carrier`'s)."""
        return len(self.frame_index.offsets)

    @property
    def tail_offset(self) -> int:
        """Where the tail's bytes begin in the file as received."""
        return self.source.data_offset + self.frames * self.source.frame_nbytes

    # -- serialization ------------------------------------------------------------

    def to_bytes(self) -> bytes:
        meta = {"version": RECORD_VERSION, "size": self.size, "sha256": self.sha256,
                "source": asdict(self.source), "archive_mode": self.archive_mode,
                "archive_data_offset": self.archive_data_offset,
                "tail_size": self.tail_size, "notes": self.notes}
        arrays = {
            "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            "header": np.frombuffer(self.header, dtype=np.uint8),
            "extended": np.frombuffer(self.extended, dtype=np.uint8),
            "chunk_offsets": np.asarray(self.frame_index.offsets, dtype=np.int64),
            "chunk_sizes": np.asarray(self.frame_index.sizes, dtype=np.int64),
        }
        if self.padding is not None:
            arrays["padding"] = self.padding
        out = io.BytesIO()
        np.savez_compressed(out, **arrays)  # padding nibbles are mostly zero: tiny
        return out.getvalue()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "RestoreRecord":
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            if meta.get("version") != RECORD_VERSION:
                raise ValueError(f"restore record version {meta.get('version')} unknown")
            return cls(size=meta["size"], sha256=meta["sha256"], header=z["header"].tobytes(),
                       extended=z["extended"].tobytes(),
                       source=SourceLayout(**meta["source"]),
                       archive_mode=meta["archive_mode"],
                       frame_index=FrameIndex(tuple(int(v) for v in z["chunk_offsets"]),
                                              tuple(int(v) for v in z["chunk_sizes"])),
                       archive_data_offset=meta["archive_data_offset"],
                       padding=z["padding"] if "padding" in z.files else None,
                       tail_size=meta["tail_size"], notes=meta["notes"])


# -- one frame, both ways ------------------------------------------------------------


def padding_nibbles(raw_frame: np.ndarray, source: SourceLayout) -> np.ndarray:
    """The padding nibble (high half of the last byte) of every row of an odd-``nx``
    4-bit frame, as read from its stored bytes."""
    rows = raw_frame.reshape(source.ny, source.row_nbytes)
    return rows[:, -1] >> 4


def restore_frame(values: np.ndarray, source: SourceLayout,
                  padding: np.ndarray | None = None,
                  out: np.ndarray | None = None) -> np.ndarray:
    """A frame as the source stored it (a flat uint8 array of ``frame_nbytes``), from
    its values as the archive holds them; ``padding``: the frame's row-padding nibbles
    (odd-``nx`` 4-bit data); ``out``: a buffer for the packed bytes of 4-bit data."""
    if source.packing is not None:
        counts = values.view(np.uint8) if values.dtype.itemsize == 1 \
            else values.astype(np.uint8)
        return pack_4bit(counts, padding, out).reshape(-1)
    stored = source.dtype
    if values.dtype == stored:
        return values.reshape(-1).view(np.uint8)
    # Same values in the source's type (float32 -> float16 and complex64 -> complex int16
    # are exact for values that came from those types), then its byte order (astype
    # between byte orders of one type only moves bytes, so bit patterns survive).
    native = cast_to(values, stored.newbyteorder("="))
    return native.astype(stored).reshape(-1).view(np.uint8)


def decode_frame(raw_frame: np.ndarray, source: SourceLayout,
                 out: np.ndarray | None = None) -> np.ndarray:
    """The pixel values of one stored frame (4-bit unpacked, native byte order);
    ``out``: a buffer of ``ny * 2 * row_nbytes`` for 4-bit counts (see ``unpack_4bit``)."""
    return decode_stored(raw_frame, source.ny, source.nx, source.dtype,
                         source.packing is not None, out)


# -- the stream as received ----------------------------------------------------------


class AsReceived:
    """The received byte stream rebuilt from the archive: its size, and any byte range.

    ``archive_frame(k, out)`` gives frame k's values as the archive holds them (one
    chunk decompressed, into the flat buffer ``out`` of the archive's frame size);
    ``read_tail(offset, n)`` reads the bytes kept after the last frame. A range touches
    only the frames it overlaps, one at a time, so memory stays at one frame and a range
    inside frame 37 decompresses frame 37 alone. The same two frame buffers serve every
    frame: the bytes handed out are copies."""

    def __init__(self, record: RestoreRecord,
                 archive_frame: Callable[[int, np.ndarray], np.ndarray],
                 read_tail: Callable[[int, int], bytes] | None = None,
                 archive_frame_nbytes: int | None = None):
        self.record = record
        self.size = record.size
        self._archive_frame = archive_frame
        self._read_tail = read_tail
        self._archive_nbytes = archive_frame_nbytes
        self._values: np.ndarray | None = None
        self._packed: np.ndarray | None = None

    def frame_bytes(self, k: int) -> np.ndarray:
        """Frame k as received; valid until the next call."""
        source = self.record.source
        padding = self.record.padding[k] if self.record.padding is not None else None
        if self._archive_nbytes is None:
            return restore_frame(self._archive_frame(k, None), source, padding)
        if self._values is None:
            self._values = np.empty(self._archive_nbytes, dtype=np.uint8)
            if source.packing is not None:
                self._packed = np.empty(source.frame_nbytes, dtype=np.uint8)
        return restore_frame(self._archive_frame(k, self._values), source, padding,
                             self._packed)

    def iter_range(self, start: int = 0, stop: int | None = None,
                   block: int = 512 << 10) -> Iterator[bytes]:
        """Bytes ``start`` .. ``stop - 1`` in pieces of at most about ``block`` (512 KiB:
        below the mmap threshold the service sets, so the copies come from the heap
        rather than fresh pages)."""
        stop = self.size if stop is None else min(stop, self.size)
        record, source = self.record, self.record.source
        prefix = record.header + record.extended
        pos = start
        while pos < stop:
            if pos < source.data_offset:  # header + extended header (up to 64 MiB)
                end = min(stop, source.data_offset, pos + block)
                yield prefix[pos:end]
            elif pos < record.tail_offset:
                k = (pos - source.data_offset) // source.frame_nbytes
                frame_start = source.data_offset + k * source.frame_nbytes
                end = min(stop, frame_start + source.frame_nbytes)
                data = memoryview(self.frame_bytes(k))[pos - frame_start:end - frame_start]
                for i in range(0, len(data), block):
                    yield bytes(data[i:i + block])
            else:
                end = min(stop, pos + block)
                if self._read_tail is None:
                    raise ValueError("the record has a tail but no reader was given")
                yield self._read_tail(pos - record.tail_offset, end - pos)
            pos = end


@dataclass
class Carrier:
    """A one-request upload's bytes on their way to being stored as received, when the
    archive is not their stored form (a proof failed, the file is invalid or truncated,
    the archive would not be smaller): the archive's chunks of the frames it proved (a
    published object, but never an MRC file: its header was not written) and the tail
    with every byte after them. :meth:`as_received` rebuilds the file from the two, so
    the upload needed no other copy of its bytes while it streamed (ARCHITECTURE.md)."""

    record: RestoreRecord
    values_dtype: np.dtype        # a chunk's values as the archive holds them
    frame_shape: tuple[int, int]  # (ny, nx)

    def as_received(self, read_archive: Callable[[int, int], bytes],
                    read_tail: Callable[[int, int], bytes] | None) -> AsReceived:
        """The file as received; ``read_archive(offset, n)`` and ``read_tail(offset, n)``
        read the two objects."""
        index, nbytes = self.record.frame_index, \
            self.frame_shape[0] * self.frame_shape[1] * self.values_dtype.itemsize

        def archive_frame(k: int, out: np.ndarray) -> np.ndarray:
            chunk = read_archive(index.offsets[k], index.sizes[k])
            decompress_into(chunk, out)
            return out.view(self.values_dtype).reshape(self.frame_shape)
        return AsReceived(self.record, archive_frame, read_tail, archive_frame_nbytes=nbytes)
