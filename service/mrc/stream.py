"""Cut an MRC or MRCZ byte stream into its parts while it arrives.

After the 1024-byte header and NSYMBT bytes of extended header the layout is fixed
(MRC2014: the 1024-byte header and NSYMBT bytes of extended header come first): frame k of a plain file is bytes ``1024 + NSYMBT + k * frame_nbytes``
onwards, so frames can be cut as the body streams. An MRCZ stream is cut at its c-blosc
chunk headers (16 bytes each; ``cbytes`` gives the chunk's length, MRCZ spec 0.5). Each
piece goes to whoever processes frames (:mod:`service.mrc.archiver`) the moment it is
complete, so a movie is validated and compressed while it is still being received.

Nothing here raises for bad content after the header: a chunk that lies about its size,
a stream that ends inside a frame, or bytes after the last frame are findings, and the
bytes concerned are handed on as ``tail`` so that the file as received can still be kept
and rebuilt exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal

import numpy as np

from . import header as hdr
from .buffers import BufferPool
from .codec import BLOSC_MAX_OVERHEAD, CHUNK_HEADER_SIZE, Codec, ChunkHeader
from .errors import FormatError
from .findings import Finding, error, warning
from .validate import FrameLimits, check_frame_limits, check_header_bytes

#: A frame is held whole in memory while it is processed; a header declaring larger
#: frames (or a chunk claiming to decompress past this) is refused as such.
MAX_FRAME_BYTES = 1 << 30
#: The extended header is kept verbatim in memory (it goes into the restore record).
MAX_EXTENDED_BYTES = 64 << 20

PieceKind = Literal["header", "extended", "frame", "tail"]


class HeaderRefused(FormatError):
    """The first 1024 bytes are not an MRC/MRCZ header."""


class HeaderOverLimit(FormatError):
    """A header that declares more frames, or more tiny frames, than the limits given
    (:class:`~service.mrc.validate.FrameLimits`): refused as it arrives, before any piece
    is handed on, so nothing of it is stored. ``findings`` name the field and limit."""

    def __str__(self) -> str:
        return ("the header declares more frames than this service takes on; nothing was "
                f"stored: {super().__str__()}")


@dataclass
class Piece:
    kind: PieceKind
    data: np.ndarray          # uint8; a frame's array is the consumer's to keep
    index: int = 0            # frame number (frames only)


@dataclass
class StreamCutter:
    """Feed the stream in order with :meth:`feed`; each call returns the pieces it
    completed. :meth:`finish` at the end returns what is left (as ``tail``)."""

    received: int = 0
    layout: hdr.Layout | None = None
    header: np.record | None = None
    header_findings: list[Finding] = field(default_factory=list)
    #: problems with the data section found while cutting (truncation, bad chunks)
    findings: list[Finding] = field(default_factory=list)
    frames: int = 0
    extended_complete: bool = False
    tail_bytes: int = 0

    #: where frame buffers come from (the archiver gives them back once proven)
    pool: BufferPool | None = None
    #: a header over these is refused (:class:`HeaderOverLimit`) as soon as it is in
    limits: FrameLimits | None = None

    def __post_init__(self) -> None:
        self._pending = bytearray()       # header / extended header / chunk header bytes
        self._frame: np.ndarray | None = None
        self._filled = 0
        self._in_tail = False
        self._chunk_bytes = 0             # MRCZ: length of the chunk being filled
        self._chunk_offset = 0            # MRCZ: stream offset of the next chunk

    # -- feeding ------------------------------------------------------------------

    def feed(self, data: bytes | memoryview) -> Iterator[Piece]:
        """The pieces ``data`` completes, each yielded as soon as it is complete: the
        consumer is done with a frame (and has given its buffer back to the pool) before
        the next frame's buffer is taken. Iterate to the end."""
        view = memoryview(data).cast("B")
        self.received += len(view)
        pieces: list[Piece] = []
        while len(view):
            view = self._step(view, pieces)
            yield from pieces
            pieces.clear()

    def _step(self, view: memoryview, pieces: list[Piece]) -> memoryview:
        if self.layout is None:
            take = hdr.HEADER_SIZE - len(self._pending)
            self._pending += view[:take]
            if len(self._pending) == hdr.HEADER_SIZE:
                self._accept_header(pieces)
            return view[take:]
        if not self.extended_complete:
            want = self.layout.data_offset - hdr.HEADER_SIZE
            take = want - len(self._pending)
            self._pending += view[:take]
            if len(self._pending) == want:
                pieces.append(Piece("extended", np.frombuffer(bytes(self._pending),
                                                              dtype=np.uint8)))
                self._pending = bytearray()
                self.extended_complete = True
            return view[take:]
        if self._in_tail or self.frames >= self.layout.nz:
            self._in_tail = True
            self._tail(bytes(view), pieces)
            return view[len(view):]
        if self.layout.codec is Codec.NONE:
            return self._fill_frame(view, self.layout.frame_nbytes, pieces)
        if self._frame is None:
            take = CHUNK_HEADER_SIZE - len(self._pending)
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) == CHUNK_HEADER_SIZE:
                self._start_chunk(pieces)
            return view
        return self._fill_frame(view, self._chunk_bytes, pieces)

    def _accept_header(self, pieces: list[Piece]) -> None:
        raw = bytes(self._pending)
        layout, findings = check_header_bytes(raw)
        if layout is None:
            raise HeaderRefused(findings)
        over = check_frame_limits(layout, self.limits)
        if over:
            raise HeaderOverLimit(over, hdr.parse(raw, layout.byte_order))
        self.layout, self.header_findings = layout, findings
        self.header = hdr.parse(raw, layout.byte_order)
        pieces.append(Piece("header", np.frombuffer(raw, dtype=np.uint8)))
        self._pending = bytearray()
        nsymbt = layout.data_offset - hdr.HEADER_SIZE
        if nsymbt > MAX_EXTENDED_BYTES:
            self.findings.append(error("nsymbt", f"extended header of {nsymbt} bytes is over "
                                                 f"the {MAX_EXTENDED_BYTES}-byte limit"))
            self.extended_complete = self._in_tail = True
        elif layout.frame_nbytes > MAX_FRAME_BYTES:
            self.findings.append(error("nx", f"frames of {layout.frame_nbytes} bytes are "
                                             f"over the {MAX_FRAME_BYTES}-byte limit of "
                                             "frame-by-frame processing"))
            self._in_tail = True
        self._chunk_offset = layout.data_offset
        if nsymbt == 0:
            self.extended_complete = True
            pieces.append(Piece("extended", np.empty(0, dtype=np.uint8)))

    def _start_chunk(self, pieces: list[Piece]) -> None:
        """An MRCZ chunk header is in: check it before a byte of it is decompressed (a
        chunk that lies about its size is a decompression bomb)."""
        assert self.layout is not None
        raw = bytes(self._pending)
        self._pending = bytearray()
        chunk = ChunkHeader.parse(raw)
        where = f"frame {self.frames} (byte {self._chunk_offset})"
        problem = chunk.refusal(self.layout.frame_nbytes)
        if problem is None and \
                not CHUNK_HEADER_SIZE <= chunk.cbytes <= chunk.nbytes + BLOSC_MAX_OVERHEAD:
            problem = f"chunk length {chunk.cbytes} is impossible for {chunk.nbytes} bytes"
        if problem is not None:
            self.findings.append(error("data", f"{where}: {problem}"))
            self._in_tail = True
            self._tail(raw, pieces)
            return
        self._chunk_bytes = chunk.cbytes
        self._chunk_offset += chunk.cbytes
        self._frame = np.empty(chunk.cbytes, dtype=np.uint8)
        self._frame[:CHUNK_HEADER_SIZE] = np.frombuffer(raw, dtype=np.uint8)
        self._filled = CHUNK_HEADER_SIZE

    def _tail(self, data: bytes, pieces: list[Piece]) -> None:
        self.tail_bytes += len(data)
        pieces.append(Piece("tail", np.frombuffer(data, dtype=np.uint8)))

    def _fill_frame(self, view: memoryview, size: int, pieces: list[Piece]) -> memoryview:
        if self._frame is None:
            self._frame = self.pool.take(size) if self.pool is not None \
                else np.empty(size, dtype=np.uint8)
            self._filled = 0
        take = min(size - self._filled, len(view))
        self._frame[self._filled:self._filled + take] = np.frombuffer(view[:take],
                                                                       dtype=np.uint8)
        self._filled += take
        if self._filled == size:
            pieces.append(Piece("frame", self._frame, self.frames))
            self.frames += 1
            self._frame = None
        return view[take:]

    # -- the end ------------------------------------------------------------------

    def finish(self) -> list[Piece]:
        """The stream ended: whatever is partial becomes tail, with the finding that says
        what is missing. Raises :class:`HeaderRefused` if the header never completed."""
        if self.layout is None:
            _, findings = check_header_bytes(bytes(self._pending))
            raise HeaderRefused(findings)
        pieces: list[Piece] = []
        lay = self.layout
        leftover = bytes(self._pending)
        if self._frame is not None:
            leftover = self._frame[:self._filled].tobytes() + leftover
            self._frame = None
        if not self.extended_complete:
            self.findings.append(error("nsymbt", f"the stream ends inside the extended "
                                                 f"header ({len(leftover)} of "
                                                 f"{lay.data_offset - hdr.HEADER_SIZE} "
                                                 "bytes)"))
        elif self.frames < lay.nz and not self._in_tail:
            self.findings.append(error("data", f"file truncated: {self.frames} of {lay.nz} "
                                               f"frames complete, then {len(leftover)} "
                                               "bytes of the next"))
        if leftover:
            self._tail(leftover, pieces)
        if self.frames == lay.nz and self.tail_bytes:
            end = lay.data_offset + (lay.data_nbytes if lay.codec is Codec.NONE
                                     else self._chunk_offset - lay.data_offset)
            self.findings.append(warning("data", f"{self.tail_bytes} bytes after the last "
                                                 f"frame (ends at byte {end}) are kept as "
                                                 "received but are not image data"))
        self._pending = bytearray()
        return pieces
