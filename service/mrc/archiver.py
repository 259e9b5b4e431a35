"""One pass over a movie as it arrives: validate, take exact statistics (whole movie and
per frame), sum the frames for a preview, and write the MRCZ archive with its restore
record, proving frame by frame that the two give back the bytes received.

The pieces come from :class:`~service.mrc.stream.StreamCutter` in stream order (an
upload while it streams, a registered file read once). For each frame::

    stored bytes -> values (4-bit unpacked, native byte order) -> statistics, frame sum
                 -> archive mode -> blosc chunk -> written
                                  \\-> chunk decompressed -> restored to the source's
                                      stored bytes -> compared with what was received

The compression, the proof and the write of frame k run on the writer's encoder thread
while frame k+1 is decoded and measured here, one frame in flight. If any frame fails the
proof, or the archive would not be smaller than the file, or the file is invalid, the
archive is dropped and the file as received is the stored form; nothing is decided
before the last byte.

Where the archiver is the only keeper of the bytes (``open_original``: a one-request
upload, which nothing else holds while it streams), no byte it receives is ever without
a stored place: the file as received goes to its own sink from the first byte when no
archive will be made (an MRCZ upload, no archive codec, a header whose extended header
never completes) or when the policy keeps the original as well; otherwise every frame
from the first one whose proof failed, and every byte after the last frame, go to the
tail, so the proven chunks and the tail always rebuild the file
(:class:`~service.mrc.restore.Carrier`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import extended as ext_mod
from . import header as hdr
from .buffers import BufferPool
from .codec import Codec, FrameIndex, decompress_into
from .convert import OutputPlan, Target, default_mode, plan_output
from .findings import Finding, error, has_errors
from .modes import mode_spec
from .preview import BinnedSum
from .reader import describe_source
from .restore import (Carrier, RestoreRecord, SourceLayout, decode_frame,
                      padding_nibbles, restore_frame)
from .sink import Sink
from .stats import FrameStats, Stats, StatsAccumulator, frame_series
from .stream import MAX_FRAME_BYTES, Piece
from .validate import check_stats

#: stored forms of a dataset
FORM_ARCHIVE = "archive"     # the MRCZ archive + restore record (+ tail) give back the file
FORM_ORIGINAL = "original"   # the file as received is kept as it is


@dataclass(frozen=True)
class ArchivePolicy:
    codec: Codec = Codec.ZSTD    # Codec.NONE: keep no archive
    clevel: int = 1
    normalize: bool = True       # 4-bit -> mode 0 (and IMOD unsigned bytes -> mode 6)
    sum_side: int = 1024         # longest side of the frame sum kept for previews
    keep_original: bool = False  # the file as received is kept beside the archive


#: Modes python-mrcz cannot read inside MRCZ, and the mode that holds their values
#: exactly instead (float16 in float32, complex int16 in complex64): the archive stays
#: readable by the reference reader, and the restore casts back.
MRCZ_READABLE = {12: 2, 3: 4}


def archive_target(source_mode: int, source_dtype: np.dtype, default: int, codec: Codec,
                   clevel: int, normalize: bool) -> Target:
    """The archive's form. ``normalize`` picks the natural lossless mode (4-bit -> mode
    0); without it the source mode stays unless MRCZ cannot hold it (4-bit, and IMOD's
    unsigned bytes, which MRCZ readers would take as signed). Modes python-mrcz cannot
    read in MRCZ go into the mode that holds them exactly (:data:`MRCZ_READABLE`)."""
    keeps_mode = source_mode != 101 and source_dtype == mode_spec(source_mode).dtype
    mode = source_mode if keeps_mode and not normalize else default
    return Target(mode=MRCZ_READABLE.get(mode, mode), codec=codec, clevel=clevel)


@dataclass
class StreamSource:
    """A movie known by its header while its frames are still arriving: enough for
    :func:`~service.mrc.convert.plan_output` and for describing the file."""

    header: np.record
    layout: hdr.Layout
    extended: ext_mod.ExtendedHeader

    @property
    def mode(self) -> int:
        return self.layout.mode

    @property
    def dtype(self) -> np.dtype:
        return self.layout.dtype


@dataclass
class ArchiveOutcome:
    """What one pass found and kept."""

    form: str                                  # FORM_ARCHIVE or FORM_ORIGINAL
    valid: bool                                # no error findings
    findings: list[Finding]
    described: dict[str, Any] | None           # the file's facts (header, layout, ...)
    default_mode: int | None
    stats: Stats | None
    frame_stats: dict[str, list] | None        # per-frame series
    frame_sum: BinnedSum | None
    restorable: bool                           # archive + record give the bytes back
    reason: str | None                         # why the original is the stored form
    archive: dict[str, Any] | None             # mode, codec, clevel, bytes, ...
    record: bytes | None                       # the serialized RestoreRecord
    tail_bytes: int                            # bytes after the last complete frame
    timings: dict[str, float] = field(default_factory=dict)
    #: the archiver's own copy of the file as received was committed (``open_original``)
    original: bool = False
    #: what rebuilds the file as received when the archive is not the stored form and
    #: the archiver kept the bytes (``open_original``) in its chunks and tail
    carrier: Carrier | None = None


#: bytes compared at a time: a frame-sized boolean temporary would cost as much memory
#: as the frame (47 MB for a 16-bit K3 frame)
_COMPARE_BLOCK = 256 << 10


def first_difference(a: np.ndarray, b: np.ndarray) -> int | None:
    """The first index where two flat uint8 arrays differ (None if they are equal)."""
    if a.size != b.size:
        return min(a.size, b.size)
    for start in range(0, a.size, _COMPARE_BLOCK):
        x, y = a[start:start + _COMPARE_BLOCK], b[start:start + _COMPARE_BLOCK]
        if not np.array_equal(x, y):
            return start + int(np.flatnonzero(x != y)[0])
    return None


class Archiver:
    """Feed :meth:`add` the pieces of one file in order, then :meth:`finish` with the
    received size and SHA-256 (or :meth:`abort`). ``open_archive()`` gives the sink for
    the archive (opened with a 1024-byte reserved head) and ``open_tail()`` the sink for
    bytes after the archive's last frame; both are called only when needed.
    ``open_original()``: the archiver is the bytes' only keeper, and this gives the sink
    for the file as received whenever it must be kept whole (see the module's text)."""

    def __init__(self, policy: ArchivePolicy, open_archive: Callable[[], Sink] | None,
                 open_tail: Callable[[], Sink] | None = None,
                 on_frame: Callable[[int, int], None] | None = None,
                 open_original: Callable[[], Sink] | None = None):
        if open_original is not None and open_archive is not None and open_tail is None:
            raise ValueError("an archiver that keeps the bytes needs a tail for those the "
                             "archive does not prove")
        self.policy = policy
        self._open_archive, self._open_tail = open_archive, open_tail
        self._open_original = open_original
        #: the file as received, from its first byte (opened by _start_original)
        self._original: Sink | None = None
        #: the first frame kept raw in the tail (its proof failed), when the archiver
        #: keeps the bytes
        self._raw_from: int | None = None
        self._on_frame = on_frame
        self.source: StreamSource | None = None
        self.header_raw = b""
        self.ext_raw = b""
        self.findings: list[Finding] = []
        self.stats = StatsAccumulator()
        self.per_frame: list[FrameStats] = []
        self.frame_sum: BinnedSum | None = None
        self.frames_done = 0
        self._broken = False                     # a frame could not be decoded
        self._plan: OutputPlan | None = None
        self._writer = None
        #: odd-nx 4-bit: each frame's row-padding nibbles, as the frames arrive (the
        #: header's sizes are not trusted for an allocation up front)
        self._padding: list[np.ndarray] | None = None
        #: frame buffers handed round: the cutter's received frames and the unpacked
        #: counts come back here once their frame is proven
        self.pool = BufferPool()
        #: frame k -> (its received bytes, its pooled unpacked counts or None)
        self._in_flight: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self._pack_buffer: np.ndarray | None = None
        self._lock = threading.Lock()
        self._unproven: str | None = None
        self._tail: Sink | None = None
        self.tail_bytes = 0       # the stream's bytes after its last frame
        self._tail_size = 0       # bytes written to the tail object
        self._chunk_buffer: np.ndarray | None = None
        self._proof_buffer: np.ndarray | None = None
        self._started = time.perf_counter()
        self._proof_seconds = 0.0

    # -- pieces -------------------------------------------------------------------

    def add(self, piece: Piece) -> None:
        if piece.kind == "header":
            self.header_raw = piece.data.tobytes()
        elif piece.kind == "extended":
            self._begin(piece.data.tobytes())
        elif piece.kind == "frame":
            self._frame(piece.index, piece.data)
        else:
            self._add_tail(piece.data)

    def _begin(self, ext_raw: bytes) -> None:
        layout, _ = hdr.derive_layout(hdr.parse(self.header_raw, self._byte_order()),
                                      self._byte_order())
        assert layout is not None  # the cutter accepted this header
        header = hdr.parse(self.header_raw, layout.byte_order)
        decoded, findings = ext_mod.decode(ext_raw, bytes(header["exttyp"]),
                                           int(header["nint"]), int(header["nreal"]),
                                           layout.byte_order, layout.nz)
        self.findings += findings
        self.ext_raw = ext_raw
        self.source = src = StreamSource(header, layout, decoded)
        self._source_layout = SourceLayout.of(layout)
        self.frame_sum = BinnedSum(layout.ny, layout.nx, self.policy.sum_side)
        if layout.codec is not Codec.NONE:  # already compressed: kept as received,
            if not layout.codec.available:   # its frames only measured
                self._fail("mode", f"MRCZ codec {layout.codec.cname!r} is not available in "
                                   "this blosc build; cannot decompress")
            elif layout.packing:
                self._fail("mode", "4-bit packed data inside MRCZ chunks is not supported "
                                   "(mrcz refuses to write it); store it as mode 0")
        elif self.policy.codec is not Codec.NONE and self._open_archive is not None and \
                layout.frame_nbytes <= MAX_FRAME_BYTES:  # larger: all tail (the cutter)
            target = archive_target(src.mode, src.dtype, default_mode(src),
                                    self.policy.codec, self.policy.clevel,
                                    self.policy.normalize)
            self._plan = plan_output(src, target)
            if self._source_layout.odd_4bit:
                self._padding = []
            self._writer = self._plan.writer(self._open_archive(), layout,
                                             collect_stats=False, on_encoded=self._prove)
        if self._writer is None or self.policy.keep_original:
            self._start_original()

    def _start_original(self) -> None:
        """The file as received goes to its own sink from here on, starting with the
        bytes that came before (the header and extended header, held in memory)."""
        if self._open_original is None or self._original is not None:
            return
        self._original = self._open_original()
        self._original.write(self.header_raw)
        self._original.write(self.ext_raw)

    @property
    def _keeps_raw(self) -> bool:
        """Whether unproven frames and trailing bytes go to the tail: the archiver keeps
        the bytes, and no sink has them whole."""
        return self._open_original is not None and self._open_tail is not None \
            and self._original is None and self._writer is not None

    def _byte_order(self) -> str:
        order, _ = hdr.detect_byte_order(self.header_raw)
        assert order is not None
        return order

    def _frame(self, k: int, raw: np.ndarray) -> None:
        assert self.source is not None
        if self._original is not None:
            self._original.write(memoryview(raw))
        if self._broken:
            return
        layout = self.source.layout
        unpacked: np.ndarray | None = None
        if layout.codec is not Codec.NONE:
            values = self._decompress_source_chunk(k, raw)
            if values is None:
                return
        else:
            if self._source_layout.packing is not None:
                unpacked = self.pool.take(layout.ny * 2 * self._source_layout.row_nbytes)
            values = decode_frame(raw, self._source_layout, unpacked)
            if unpacked is not None and not np.shares_memory(values, unpacked):
                self.pool.give(unpacked)  # odd nx: the counts are a trimmed copy
                unpacked = None
        measured = self.stats.add(values)
        self.per_frame.append(measured)
        assert self.frame_sum is not None
        # 8-bit counts (4-bit movies): the frame sum takes its faster path when it knows
        # every value lies in 0..max, which the statistics just found
        small = values.dtype.itemsize == 1 and values.dtype.kind in "iu" and \
            measured.dmin is not None and measured.dmin >= 0 and measured.dmax is not None
        self.frame_sum.add(values, counts_max=int(measured.dmax) if small else None)
        if self._writer is not None and self._unproven is None:
            if self._padding is not None:
                self._padding.append(padding_nibbles(raw, self._source_layout))
            with self._lock:
                self._in_flight[k] = (raw, unpacked)
            self._writer.write_frame(self._plan.convert_frame(k, values), owned=True)
        else:
            if self._keeps_raw:  # a proof failed: from there on the frames go raw
                self._writer.flush()  # after those still in flight (they go on proving)
                self._keep_raw(k, raw)
            if layout.codec is Codec.NONE:
                self._recycle(raw, unpacked)
        self.frames_done += 1
        if self._on_frame is not None:
            self._on_frame(self.frames_done, layout.nz)

    def _decompress_source_chunk(self, k: int, chunk: np.ndarray) -> np.ndarray | None:
        layout = self.source.layout
        if self._chunk_buffer is None:
            self._chunk_buffer = np.empty(layout.frame_nbytes, dtype=np.uint8)
        try:
            decompress_into(chunk, self._chunk_buffer)
        except ValueError as exc:
            self._fail("data", f"frame {k}: corrupt blosc chunk: {exc}")
            self._broken = True
            return None
        return decode_frame(self._chunk_buffer, self._source_layout)

    def _prove(self, k: int, stored: np.ndarray, chunk: bytes) -> None:
        """On the encoder thread: decompress the chunk just made, restore the source's
        bytes from it and compare them with the bytes received for frame k."""
        started = time.perf_counter()
        with self._lock:
            raw, unpacked = self._in_flight.pop(k)
        try:
            if self._unproven is None:
                self._compare(k, stored, chunk, raw, unpacked)
            if self._unproven is not None and self._keeps_raw:
                self._keep_raw(k, raw)
        finally:
            # the encoder is done with the frame and nothing else holds it: its buffers
            # can carry a later frame
            self._recycle(raw, unpacked)
        self._proof_seconds += time.perf_counter() - started

    def _recycle(self, raw: np.ndarray, unpacked: np.ndarray | None) -> None:
        self.pool.give(raw)
        if unpacked is not None:
            self.pool.give(unpacked)

    def _compare(self, k: int, stored: np.ndarray, chunk: bytes, raw: np.ndarray,
                 unpacked: np.ndarray | None) -> None:
        if unpacked is not None and unpacked.nbytes >= stored.nbytes:
            # 4-bit: the frame's unpacked counts were measured, summed and compressed,
            # and nothing reads them again; the chunk decompresses into their buffer
            # (a second frame-sized buffer was 23.6 MB of a K3 pass's peak RSS)
            target = unpacked.reshape(-1)[:stored.nbytes]
        else:
            if self._proof_buffer is None or self._proof_buffer.nbytes != stored.nbytes:
                self._proof_buffer = np.empty(stored.nbytes, dtype=np.uint8)
            target = self._proof_buffer
        # A decompression that wrote nothing must not pass for one that restored the
        # frame (the target may still hold these very values): its ends are spoiled
        # first, so only a chunk that really gives them back can match.
        np.invert(target[:1], out=target[:1])
        if target.size > 1:
            np.invert(target[-1:], out=target[-1:])
        try:
            decompress_into(chunk, target)
        except ValueError as exc:
            self._unproven = f"frame {k}: the archive chunk does not decompress ({exc})"
            return
        values = target.view(stored.dtype.newbyteorder("=")).reshape(stored.shape)
        padding = self._padding[k] if self._padding is not None else None
        if self._source_layout.packing is not None and self._pack_buffer is None:
            self._pack_buffer = np.empty(raw.size, dtype=np.uint8)
        rebuilt = restore_frame(values, self._source_layout, padding, self._pack_buffer)
        first = first_difference(rebuilt, raw)
        if first is not None:
            self._unproven = (f"frame {k}: the bytes restored from the archive differ from "
                              f"those received at byte {first} of the frame")

    def _keep_raw(self, k: int, raw: np.ndarray) -> None:
        """Frame k as received goes to the tail (frames in order): the archive proves
        frames before the first of these only."""
        if self._raw_from is None:
            self._raw_from = k
        self._write_tail(raw)

    def _add_tail(self, data: np.ndarray) -> None:
        self.tail_bytes += data.size
        if self.source is None:  # the extended header never completed: nor will frames
            self._start_original()
        if self._original is not None:
            self._original.write(memoryview(data))
        if self._writer is None:
            return
        if self._open_tail is None:  # the archive could not give these bytes back
            self._unproven = self._unproven or "the bytes after the last frame have no sink"
            return
        if self._keeps_raw:
            self._writer.flush()  # raw frames still in flight go to the tail first
        self._write_tail(data)

    def _write_tail(self, data: np.ndarray) -> None:
        if self._tail is None:
            assert self._open_tail is not None
            self._tail = self._open_tail()
        self._tail.write(memoryview(data))
        self._tail_size += data.size

    def _fail(self, field_name: str, message: str) -> None:
        self.findings.append(error(field_name, message))

    # -- the end ------------------------------------------------------------------

    def finish(self, size: int, sha256: str, stream_findings: list[Finding]
               ) -> ArchiveOutcome:
        """Decide the stored form and commit (or drop) the archive. ``stream_findings``:
        the cutter's (header checks, truncation, bad chunks, trailing bytes)."""
        findings = list(stream_findings) + self.findings
        src = self.source
        if src is None:  # a header alone (its extended header never came) is kept too
            self._start_original()
        stats = self.stats.result() if src is not None and self.frames_done == src.layout.nz \
            and not self._broken else None
        if stats is not None:
            findings += check_stats(src.header, stats)
        valid = src is not None and not has_errors(findings)
        reason, archive, record = None, None, None
        if self._writer is not None:
            self._writer.flush()  # the frame in flight is written and proven (or raises)
        self._release_buffers()
        if src is None:
            reason = "the extended header never arrived"
        elif src.layout.codec is not Codec.NONE:
            reason = "the file as received is already an MRCZ archive"
        elif not valid:
            reason = "the file did not pass validation; it is kept as received"
        elif self._writer is None:
            reason = "no archive codec is configured (MRC_INGEST_ARCHIVE_CODEC=none)"
        elif self._unproven is not None:
            reason = f"restore not proven: {self._unproven}"
        elif stats is None:
            reason = "restore not proven: not every frame was measured"
        if reason is None:
            record, archive, reason = self._commit(size, sha256, stats)
        carrier = None
        if archive is None:
            if self._keeps_raw:
                carrier = self._publish_carrier(size, sha256)
            else:
                self._drop()
        original = self._original is not None
        if original:
            self._original.commit()
            self._original = None
        form = FORM_ARCHIVE if archive is not None else FORM_ORIGINAL
        described = None
        if src is not None:
            stored_data = src.layout.data_nbytes if src.layout.codec is Codec.NONE else \
                max(0, size - src.layout.data_offset - self.tail_bytes)
            described = describe_source(src.header, src.layout, src.extended, size,
                                        stored_data)
        self.timings = {"pass_s": round(time.perf_counter() - self._started, 3),
                        "proof_s": round(self._proof_seconds, 3)}
        return ArchiveOutcome(
            form=form, valid=valid, findings=findings, described=described,
            default_mode=default_mode(src) if src is not None else None, stats=stats,
            frame_stats=frame_series(self.per_frame) if stats is not None else None,
            frame_sum=self.frame_sum if stats is not None else None,
            restorable=archive is not None, reason=reason, archive=archive, record=record,
            tail_bytes=self.tail_bytes, timings=self.timings, original=original,
            carrier=carrier)

    def _commit(self, size: int, sha256: str, stats: Stats | None
                ) -> tuple[bytes | None, dict[str, Any] | None, str | None]:
        writer, plan = self._writer, self._plan
        assert writer is not None and plan is not None and stats is not None
        record = self._record(size, sha256, writer.frames_written).to_bytes()
        archive_bytes = writer.data_offset + writer.packed_bytes
        kept = archive_bytes + len(record) + self.tail_bytes
        if kept >= size:
            return None, None, (f"the archive ({archive_bytes} bytes with its record and "
                                f"tail: {kept}) would not be smaller than the file as "
                                f"received ({size} bytes)")
        self._writer = None
        writer.commit(stats)
        if self._tail is not None:
            self._tail.commit()
            self._tail = None
        return record, {"mode": plan.mode, "codec": plan.target.codec.cname,
                        "clevel": plan.target.clevel, "bytes": archive_bytes,
                        "record_bytes": len(record), "tail_bytes": self.tail_bytes,
                        "notes": [plan.note] if plan.note else []}, None

    def _record(self, size: int, sha256: str, frames: int) -> RestoreRecord:
        """The restore record of the archive's first ``frames`` chunks and the tail."""
        writer, plan = self._writer, self._plan
        assert writer is not None and plan is not None
        index = writer.frame_index()
        record = RestoreRecord(
            size=size, sha256=sha256, header=self.header_raw, extended=self.ext_raw,
            source=self._source_layout, archive_mode=plan.mode,
            frame_index=FrameIndex(index.offsets[:frames], index.sizes[:frames]),
            archive_data_offset=writer.data_offset,
            padding=np.stack(self._padding[:frames]) if self._padding and frames else None,
            tail_size=self._tail_size)
        if record.tail_offset + record.tail_size != size:  # every byte has one place
            raise ValueError(f"the archive's {frames} frames and the tail's "
                             f"{record.tail_size} bytes do not add up to the {size} bytes "
                             "received")
        return record

    def _publish_carrier(self, size: int, sha256: str) -> Carrier:
        """The archive is not the stored form, and the archiver holds the bytes: its
        proven chunks and the tail are published as they are, for the caller to rebuild
        the file as received from (then to drop them)."""
        writer = self._writer
        assert writer is not None
        frames = self._raw_from if self._raw_from is not None else writer.frames_written
        record = self._record(size, sha256, frames)
        self._writer = None
        writer.publish_written()
        if self._tail is not None:
            self._tail.commit(durable=False)  # read once for the rebuild, then removed
            self._tail = None
        return Carrier(record, writer.file_dtype, (writer.ny, writer.nx))

    def _drop(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.abort()
        tail, self._tail = self._tail, None
        if tail is not None:
            tail.abort()

    def _release_buffers(self) -> None:
        """No frame comes any more: the frame-sized buffers go now rather than when the
        cyclic garbage collector finds this pass (the writer's callback and the pass's
        sink factories make cycles), so one movie's buffers are not still held while
        the next movie arrives."""
        self.pool.clear()
        self._proof_buffer = self._pack_buffer = self._chunk_buffer = None
        if self.frame_sum is not None:
            self.frame_sum.drop_scratch()

    def abort(self) -> None:
        """Drop everything written (the upload failed)."""
        self._drop()
        original, self._original = self._original, None
        if original is not None:
            original.abort()
        self._release_buffers()
