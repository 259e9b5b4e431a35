"""Streaming MRC/MRCZ writer: frames go out one at a time, exact statistics are
accumulated on the way, the header is written last, and the output appears only when
complete: a local file through :class:`~service.mrc.sink.AtomicFile` (temporary file,
fsync, rename, fsync folder), or any other :class:`~service.mrc.sink.Sink` (the service's
datastore). The 1024-byte header is a reserved head the sink takes at commit, so the
writer never seeks back.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from . import header as hdr
from .codec import Codec, FrameIndex, compress_frame, join_mode, thread_count
from .modes import mode_spec, pack_4bit
from .sink import AtomicFile, Sink
from .stats import Stats, StatsAccumulator

#: Called on the encoder thread after frame k is encoded: (k, stored pixels, the bytes
#: written for it). The service's ingest proves its restore there, frame by frame.
OnEncoded = Callable[[int, np.ndarray, bytes], None]

#: Most frames one writer compresses at once (each in flight with its chunk: memory)
MAX_ENCODERS = 4

#: Label 0 of an MRCZ file (MRCZ spec: ``MRCZ<version>`` at byte 224). python-mrcz reads
#: MZ as "slices" only from 0.5.0 on; we write the spec level we implement.
MRCZ_LABEL = "MRCZ0.5.0"
LABEL_SIZE = 80
MAX_LABELS = 10


def set_labels(h: np.record, labels: list[str]) -> None:
    """Write up to ten 80-character ASCII labels and NLABL (MRC2014 words 56-256).
    Like IMOD, keep the first nine and the newest when there are too many."""
    if len(labels) > MAX_LABELS:
        labels = labels[:MAX_LABELS - 1] + labels[-1:]
    h["nlabl"] = len(labels)
    for i in range(MAX_LABELS):
        text = labels[i] if i < len(labels) else ""
        h["label"][i] = text.encode("ascii", "replace")[:LABEL_SIZE].ljust(LABEL_SIZE, b" ") \
            if text else b""


class MrcWriter:
    """Write ``nz`` frames of ``(ny, nx)`` pixels in ``mode`` (MRCZ when ``codec`` is not
    NONE). ``template`` supplies the descriptive fields (cell, sampling, origin, ISPG,
    labels, MRCZ microscope words); the writer owns sizes, mode, stats, NSYMBT, MACHST,
    NVERSION, the IMOD stamp and flags.

    ``output`` is a path (written atomically) or a :class:`Sink` opened with
    ``reserve_head=1024``. Use as a context manager: a clean exit commits, an exception
    aborts and leaves nothing behind.

    Encoding (4-bit packing, byte swapping, blosc) and the write of frame k run on one
    background thread while the caller decodes frame k+1 and the statistics of frame k
    are taken; at most one frame is in flight, so memory stays bounded.

    A program that allows blosc more than one thread per chunk
    (:func:`~service.mrc.codec.set_threads`, e.g. a converter run alone) and has no
    ``on_encoded`` gets that many frames (at most :data:`MAX_ENCODERS`) compressed at
    once instead, one thread each, written in order by the caller, so that many frames
    and their chunks are in flight: blosc's threads within one chunk wait for each other
    at every block, so a statistics pass on the caller's thread stalled both (40 K2
    frames with exact statistics: 0.73x python-mrcz's speed that way, bench_core.py).
    """

    def __init__(self, output: str | os.PathLike | Sink, *, nx: int, ny: int, nz: int,
                 mode: int, codec: Codec = Codec.NONE, clevel: int = 1,
                 byte_order: str = "<", template: np.record | None = None,
                 extended_header: bytes = b"", exttyp: bytes = b"", nint: int = 0,
                 nreal: int = 0, known_stats: Stats | None = None,
                 collect_stats: bool = True, on_encoded: OnEncoded | None = None):
        if min(nx, ny, nz) <= 0:
            raise ValueError(f"dimensions must be positive, got {nx} x {ny} x {nz}")
        self.spec = mode_spec(mode)
        if codec is not Codec.NONE and self.spec.is_packed:
            raise ValueError("4-bit data cannot go into MRCZ chunks (python-mrcz cannot read "
                             "it back); write mode 0 instead")
        if codec is not Codec.NONE and not codec.available:
            raise ValueError(f"codec {codec.cname!r} is not available in this blosc build")
        self.nx, self.ny, self.nz = nx, ny, nz
        self.mode, self.codec, self.clevel = mode, codec, clevel
        self.byte_order = byte_order
        self.file_dtype = self.spec.dtype.newbyteorder(byte_order)
        self.header = self._initial_header(template, extended_header, exttyp, nint, nreal)
        self.stats = StatsAccumulator()
        #: exact statistics of the frames to be written, when the caller already has them
        #: (ingest computed them while validating; a lossless conversion keeps every
        #: value): the writer then skips its own pass, which costs as much CPU as zstd-1.
        self.known_stats = known_stats
        #: False: the caller takes the statistics itself and passes them to commit()
        self.collect_stats = collect_stats and known_stats is None
        self.frames_written = 0
        self.packed_bytes = 0
        #: bytes of each MRCZ chunk written so far, in frame order (the frame index)
        self.chunk_sizes: list[int] = []
        self.data_offset = hdr.HEADER_SIZE + len(extended_header)
        self.on_encoded = on_encoded
        #: frames compressed at once (one blosc thread each); 1: the encoder thread also
        #: writes, and on_encoded runs there
        self._encoders = min(thread_count(), MAX_ENCODERS) \
            if on_encoded is None and codec is not Codec.NONE else 1
        #: a frame failed to encode or write: nothing may be committed any more
        self._failed = False
        #: frames handed to the encoders, oldest first
        self._pending: deque[Future] = deque()
        if isinstance(output, (str, os.PathLike)):
            self.path: Path | None = Path(output)
            self._sink: Sink | None = AtomicFile(self.path, reserve_head=hdr.HEADER_SIZE)
        else:
            self.path, self._sink = None, output
        self._encoder = ThreadPoolExecutor(max_workers=self._encoders,
                                           thread_name_prefix="mrc-writer")
        try:
            if extended_header:
                self._sink.write(extended_header)
        except BaseException:
            self.abort()
            raise

    def _initial_header(self, template: np.record | None, extended_header: bytes,
                        exttyp: bytes, nint: int, nreal: int) -> np.record:
        h = hdr.new_header(self.byte_order)
        if template is not None:
            for name in ("nxstart", "nystart", "nzstart", "mx", "my", "mz", "cella", "cellb",
                         "ispg", "origin", "nlabl", "label", "mrcz_voltage", "mrcz_c3",
                         "mrcz_gain"):
                h[name] = template[name]
        spacing = hdr.voxel_size(template) if template is not None else (0.0, 0.0, 0.0)
        h["nx"], h["ny"], h["nz"] = self.nx, self.ny, self.nz
        h["mode"] = join_mode(self.mode, self.codec)
        # MRC2014: MX/MY are the sampling along X/Y; 0 would make the pixel size
        # CELLA/0. Keep a positive value from the template, else the image size.
        if h["mx"] <= 0:
            h["mx"] = self.nx
        if h["my"] <= 0:
            h["my"] = self.ny
        if self.codec is not Codec.NONE:
            # python-mrcz reads MZ as "slices per frame": 0 makes mrcz.readMRC return one
            # (nz, ny, nx) array; the true MZ travels in the JSON extended header.
            h["mz"] = 0
        elif h["mz"] <= 0:
            h["mz"] = 1 if int(h["ispg"]) == 0 else self.nz
        # Whatever M we settled on, CELLA keeps the spacing a reader derives.
        for axis, size, value in zip("xyz", (self.nx, self.ny, self.nz), spacing):
            m = int(h[f"m{axis}"])
            h["cella"][axis] = value * (m if m > 0 else size)
        if tuple(h["cellb"]) == (0.0, 0.0, 0.0):
            h["cellb"] = (90.0, 90.0, 90.0)
        h["nsymbt"] = len(extended_header)
        h["exttyp"] = exttyp if extended_header else b""
        h["nint"], h["nreal"] = (nint, nreal) if extended_header else (0, 0)
        flags = hdr.ImodFlag.SIGNED_BYTES if self.mode == 0 else 0
        h["imod_flags"] = int(flags)
        # IMOD: files using non-MRC2014 modes should carry NVERSION 0.
        h["nversion"] = hdr.NVERSION if self.spec.mrc2014 else 0
        return h

    # -- frames -------------------------------------------------------------------

    def write_frame(self, frame: np.ndarray, *, owned: bool = False) -> None:
        """Append one frame. Its dtype must be the mode's (any byte order); for mode 101,
        uint8 counts 0-15. Conversion and loss checks belong to the caller.

        The frame is encoded in the background, so the writer copies it unless
        ``owned=True`` promises that nobody modifies the array afterwards.
        """
        if self._sink is None:
            raise ValueError("writer is closed")
        if self.frames_written >= self.nz:
            raise ValueError(f"all {self.nz} frames were already written")
        if frame.shape != (self.ny, self.nx):
            raise ValueError(f"frame shape {frame.shape} != ({self.ny}, {self.nx})")
        if frame.dtype.newbyteorder("=") != self.spec.dtype.newbyteorder("="):
            raise TypeError(f"mode {self.mode} frames are {self.spec.dtype}, got {frame.dtype}")
        if not owned:
            frame = frame.copy()  # the encoder reads it later; the caller may reuse it
        self._wait(self._encoders - 1)
        k = self.frames_written
        self._pending.append(self._encoder.submit(self._encode_and_write, k, frame)
                             if self._encoders == 1 else
                             self._encoder.submit(self._encode, frame, 1))
        if self.collect_stats:
            self.stats.add(frame)
        self.frames_written += 1

    def _encode(self, frame: np.ndarray, threads: int | None = None
                ) -> tuple[np.ndarray, bytes | memoryview]:
        """A frame as stored (packed, in the file's byte order) and the bytes written
        for it."""
        if self.spec.is_packed:
            stored = pack_4bit(frame)
        else:
            stored = np.ascontiguousarray(frame, dtype=self.file_dtype)
        if self.codec is Codec.NONE:
            return stored, memoryview(stored).cast("B")
        return stored, compress_frame(stored, self.codec, self.clevel, threads)

    def _encode_and_write(self, k: int, frame: np.ndarray) -> None:
        self._write(k, *self._encode(frame))

    def _write(self, k: int, stored: np.ndarray, data: bytes | memoryview) -> None:
        """Frame k's bytes go out (frames in order)."""
        assert self._sink is not None
        if self.codec is not Codec.NONE:
            self.packed_bytes += len(data)
            self.chunk_sizes.append(len(data))
        if self.on_encoded is not None:
            self.on_encoded(k, stored, data)  # type: ignore[arg-type]
        self._sink.write(data)

    def flush(self) -> None:
        """Wait until every frame given so far is encoded and written; an error of the
        encoder thread surfaces here."""
        self._wait()

    def _wait(self, in_flight: int = 0) -> None:
        """Finish frames until at most ``in_flight`` remain; an error surfaces here."""
        while len(self._pending) > in_flight:
            pending = self._pending.popleft()
            try:
                outcome = pending.result()
                if outcome is not None:  # encoded only: this thread writes it, in order
                    self._write(self.frames_written - len(self._pending) - 1, *outcome)
            except BaseException:
                self._failed = True  # a frame is missing: the output must never appear
                raise

    # -- ending -------------------------------------------------------------------

    def commit(self, stats: Stats | None = None) -> int:
        """Write the final header and publish the output. Returns its size in bytes.
        ``stats``: the written values' statistics, when the caller took them."""
        if self._sink is None:
            raise ValueError("writer is closed")
        if stats is not None:
            self.known_stats = stats
        self._settle()
        if self.frames_written != self.nz:
            self.abort()
            raise ValueError(f"only {self.frames_written} of {self.nz} frames were written")
        h = self.header
        h["dmin"], h["dmax"], h["dmean"], h["rms"] = self.final_stats.as_tuple()
        if self.codec is not Codec.NONE:
            h["mrcz_packed_bytes"] = self.packed_bytes
        return self._publish(h.tobytes())

    def publish_written(self) -> int:
        """Publish the chunks written so far as they are, the reserved head left as
        zeros; their size in bytes. For a caller that reads frames back by their place
        (:meth:`frame_index`) to rebuild something else from them
        (:class:`~service.mrc.restore.Carrier`): never an MRC file to hand anyone, and
        never needed after a power loss (not made durable)."""
        if self._sink is None:
            raise ValueError("writer is closed")
        self._settle()
        return self._publish(None, durable=False)

    def _publish(self, head: bytes | None, durable: bool = True) -> int:
        """The output goes out under its name (every frame is written); its size."""
        assert self._sink is not None
        sink, self._sink = self._sink, None
        self._encoder.shutdown()
        self.size = sink.commit(head, durable=durable)  # the sink cleans up on error
        return self.size

    def _settle(self) -> None:
        """Every frame in flight is written; the output is dropped (and the error raised)
        if any frame failed."""
        try:
            self._wait()
        except BaseException:
            self.abort()
            raise
        if self._failed:
            self.abort()
            raise ValueError("a frame failed to encode or write earlier; nothing was "
                             "committed")

    def frame_index(self) -> FrameIndex:
        """Where each frame's chunk lies in the output (MRCZ)."""
        offsets = np.cumsum([self.data_offset] + self.chunk_sizes[:-1]).tolist() \
            if self.chunk_sizes else []
        return FrameIndex(tuple(int(o) for o in offsets), tuple(self.chunk_sizes))

    @property
    def final_stats(self) -> Stats:
        return self.known_stats if self.known_stats is not None else self.stats.result()

    def abort(self) -> None:
        """Drop the temporary file; nothing appears under the target name."""
        pending, self._pending = self._pending, deque()
        for frame in pending:  # already failing: the frames in flight go with the file
            try:
                frame.result()
            except BaseException:
                pass
        self._encoder.shutdown()
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.abort()

    def __enter__(self) -> "MrcWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
