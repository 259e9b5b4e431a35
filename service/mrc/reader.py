"""Random and sequential frame access for MRC and MRCZ, one frame in memory at a time.

Plain MRC frames are read at ``1024 + NSYMBT + k * frame_bytes``; MRCZ frames by seeking
to the k-th blosc chunk, found by walking the chunk headers once
(:func:`codec.index_chunks`) or from an index stored earlier. The bytes come from a
:class:`~service.mrc.source.ByteSource`: a local file (``pread``), or anything else that
reads at an offset (an object store's ranged GET). No memory map: mapped pages count
towards the process's resident set, and a sequential pass over a 5 GB movie would
otherwise leave gigabytes of it resident.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import extended, header as hdr
from .codec import Codec, FrameIndex, decompress_into, index_chunks
from .errors import FormatError, MrcError
from .findings import Finding, error, has_errors, warning
from .modes import decode_stored, mode_spec
from .source import ByteSource, open_source


class FrameIndexError(MrcError, IndexError):
    """Frame number outside 0..NZ-1."""


class MrcFile:
    """A read-only MRC/MRCZ file.

    Opening checks everything that decides whether pixels can be read (header sanity,
    extended header extent, data size, every MRCZ chunk header) and raises
    :class:`FormatError` with findings when they cannot. Non-fatal findings are kept in
    :attr:`findings`.
    """

    def __init__(self, path: str | os.PathLike | ByteSource, *,
                 frame_index: FrameIndex | None = None, owns_source: bool = False):
        """``owns_source``: a :class:`ByteSource` passed in is closed with this file."""
        self._source, opened = open_source(path)
        self._owns_source = opened or owns_source
        self.path = Path(self._source.name)
        try:
            self._load(frame_index)
        except BaseException:
            self.close()
            raise

    # -- opening ------------------------------------------------------------------

    def _load(self, frame_index: FrameIndex | None) -> None:
        self.file_size = self._source.size
        raw = self._source.read_at(0, hdr.HEADER_SIZE)
        if len(raw) < hdr.HEADER_SIZE:
            raise FormatError([error("header", f"file is {len(raw)} bytes, shorter than the "
                                               f"{hdr.HEADER_SIZE}-byte MRC header")])
        byte_order, findings = hdr.detect_byte_order(raw)
        if byte_order is None:
            raise FormatError(findings)
        self.byte_order = byte_order
        self.header = hdr.parse(raw, byte_order)
        layout, more = hdr.derive_layout(self.header, byte_order)
        findings += more
        if layout is None:
            raise FormatError(findings, header=self.header)
        self.layout = layout
        nsymbt = layout.data_offset - hdr.HEADER_SIZE
        if layout.data_offset > self.file_size:
            findings.append(error("nsymbt", f"extended header of {nsymbt} bytes runs past the "
                                            f"end of the {self.file_size}-byte file"))
            raise FormatError(findings, header=self.header)
        ext_raw = self._source.read_at(hdr.HEADER_SIZE, nsymbt) if nsymbt else b""
        self.extended, more = extended.decode(
            ext_raw, bytes(self.header["exttyp"]), int(self.header["nint"]),
            int(self.header["nreal"]), byte_order, layout.nz)
        findings += more
        self.frame_index: FrameIndex | None = None
        if layout.codec is Codec.NONE:
            findings += self._check_data_size()
        else:
            findings += self._index_frames(frame_index)
        self.findings: list[Finding] = findings
        if has_errors(findings):
            raise FormatError(findings, header=self.header)

    def _check_data_size(self) -> list[Finding]:
        lay = self.layout
        expected = lay.data_offset + lay.data_nbytes
        if self.file_size < expected:
            available = self.file_size - lay.data_offset
            complete = available // lay.frame_nbytes if lay.frame_nbytes else 0
            return [error("data", f"file truncated: {lay.nz} frames of {lay.frame_nbytes} bytes "
                                  f"from byte {lay.data_offset} need {expected} bytes, the file "
                                  f"has {self.file_size}; only {complete} complete frames")]
        if self.file_size > expected:
            return [warning("data", f"{self.file_size - expected} bytes after the last frame "
                                    f"(ends at byte {expected}) are ignored")]
        return []

    def _index_frames(self, frame_index: FrameIndex | None) -> list[Finding]:
        lay = self.layout
        if not lay.codec.available:
            return [error("mode", f"MRCZ codec {lay.codec.cname!r} is not available in this "
                                  "blosc build; cannot decompress")]
        if lay.packing:
            return [error("mode", "4-bit packed data inside MRCZ chunks is not supported "
                                  "(mrcz refuses to write it); store it as mode 0")]
        if frame_index is not None:
            ends_inside = (len(frame_index.offsets) == lay.nz and lay.nz > 0 and
                           frame_index.offsets[-1] + frame_index.sizes[-1] <= self.file_size)
            if ends_inside:
                self.frame_index = frame_index
                return []
        index, findings = index_chunks(self._source.read_at, lay.data_offset, lay.nz,
                                       lay.frame_nbytes, self.file_size)
        self.frame_index = index
        packed = int(self.header["mrcz_packed_bytes"])
        if index is not None and packed not in (0, index.packed_bytes):
            findings.append(warning("mrcz_packed_bytes", f"header says {packed} compressed "
                                                         f"bytes, the chunks hold "
                                                         f"{index.packed_bytes}"))
        return findings

    # -- facts --------------------------------------------------------------------

    @property
    def mode(self) -> int:
        return self.layout.mode

    @property
    def shape(self) -> tuple[int, int, int]:
        """(frames, rows, columns)."""
        return self.layout.shape

    @property
    def n_frames(self) -> int:
        return self.layout.nz

    @property
    def dtype(self) -> np.dtype:
        """dtype of the frames :meth:`read_frame` returns (native byte order)."""
        return self.layout.dtype

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        return hdr.voxel_size(self.header)

    @property
    def origin(self) -> tuple[float, float, float]:
        return hdr.origin(self.header)

    @property
    def stored_data_nbytes(self) -> int:
        if self.frame_index is not None:
            return self.frame_index.packed_bytes
        return self.layout.data_nbytes

    # -- frames -------------------------------------------------------------------

    def read_frame(self, k: int, out: np.ndarray | None = None) -> np.ndarray:
        """Frame ``k`` (0-based; negative counts from the end) as a fresh ``(ny, nx)``
        array of :attr:`dtype`: 4-bit data unpacked, bytes in native order. ``out``: a
        flat uint8 buffer of the frame's stored size to read into instead (the result
        is then a view of it where the stored form allows; reuse it for the next frame
        only once done with this one)."""
        lay = self.layout
        if not -lay.nz <= k < lay.nz:
            raise FrameIndexError(f"frame {k} out of range: the file has {lay.nz} frames "
                                  f"(0..{lay.nz - 1})")
        k %= lay.nz
        if out is not None and out.size != lay.frame_nbytes:
            raise ValueError(f"out holds {out.size} bytes, a frame {lay.frame_nbytes}")
        buf = np.empty(lay.frame_nbytes, dtype=np.uint8) if out is None else out
        if self.frame_index is None:
            offset = lay.data_offset + k * lay.frame_nbytes
            if self._source.readinto_at(buf, offset) != lay.frame_nbytes:
                raise FormatError([error("data", f"frame {k}: file ends before byte "
                                                 f"{offset + lay.frame_nbytes} (changed since "
                                                 "it was opened?)")])
        else:
            offset, size = self.frame_index.offsets[k], self.frame_index.sizes[k]
            chunk = self._source.read_at(offset, size)
            try:
                decompress_into(chunk, buf)
            except (ValueError, RuntimeError) as exc:
                raise FormatError([error("data", f"frame {k} (byte {offset}): corrupt blosc "
                                                 f"chunk: {exc}")]) from None
        return self._decode(buf)

    def _decode(self, buf: np.ndarray) -> np.ndarray:
        lay = self.layout
        return decode_stored(buf, lay.ny, lay.nx, lay.stored_dtype, bool(lay.packing))

    def frames(self, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """Frames ``start`` to ``stop - 1`` in order, one at a time."""
        stop = self.layout.nz if stop is None else min(stop, self.layout.nz)
        for k in range(start, stop):
            yield self.read_frame(k)

    # -- description --------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts: what a person or a catalog wants to know about the file."""
        return {"path": str(self.path),
                **describe_source(self.header, self.layout, self.extended, self.file_size,
                                  self.stored_data_nbytes)}

    # -- lifetime -----------------------------------------------------------------

    def close(self) -> None:
        if self._owns_source:
            self._source.close()

    def __enter__(self) -> "MrcFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def describe_source(header: np.record, layout: hdr.Layout, ext: extended.ExtendedHeader,
                    file_size: int, stored_data_nbytes: int) -> dict[str, Any]:
    """JSON-ready facts about a file from its header (for :meth:`MrcFile.describe`, and
    for a stream described while it arrives)."""
    lay = layout
    return {
        "file_size": file_size,
        "byte_order": "little" if lay.byte_order == "<" else "big",
        "mode": lay.mode,
        "header_mode": int(header["mode"]) % 1000,
        "mode_name": mode_spec(lay.mode).name,
        "mode_description": mode_spec(lay.mode).note,
        "dtype": str(lay.dtype),
        "nx": lay.nx, "ny": lay.ny, "nz": lay.nz,
        "frames": lay.nz,
        "pixel_size_angstrom": list(hdr.voxel_size(header)),
        "origin_angstrom": list(hdr.origin(header)),
        "packing": lay.packing,
        "bytes_signed": lay.bytes_signed,
        "compression": None if lay.codec is Codec.NONE else {
            "codec": lay.codec.cname,
            "packed_bytes": stored_data_nbytes,
            "ratio": round(lay.data_nbytes / stored_data_nbytes, 4) if stored_data_nbytes
            else None,
        },
        "data_offset": lay.data_offset,
        "frame_nbytes": lay.frame_nbytes,
        "data_nbytes": lay.data_nbytes,
        "extended_header": ext.to_dict(max_records=3),
        "header": hdr.header_to_dict(header),
    }
