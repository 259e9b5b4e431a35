"""Lossless conversion between MRC modes and to/from MRCZ, streamed frame by frame.

The rules (MRC2014 mode table; IMOD mrc_format.txt for mode 101): 4-bit counts 0-15 fit exactly in modes 0, 1, 2 and 6, so
mode 101 converts to any of them with the raw values, never shifted or scaled (IMOD
``newstack`` shifts by -127 or scales by 2184). A target that cannot hold every possible
source value (float32 -> int8, say) is allowed only when this file's values survive
the round trip exactly; the first frame that does not stops the conversion, the partial
output is removed, and the error lists the modes that are always lossless.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from . import header as hdr
from .codec import Codec
from .errors import ConversionError, LossyConversionError
from .modes import (MODES, UINT4_MAX, always_lossless, cast_to, differences,
                    lossless_targets, mode_spec)
from .extended import ExtendedHeader
from .reader import MrcFile
from .sink import Sink
from .stats import Stats
from .writer import MRCZ_LABEL, MrcWriter, OnEncoded, set_labels

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Target:
    """What to produce. Frozen and hashable, so it can key a cache of conversions.

    ``mode=None`` means the source's natural lossless mode (:func:`default_mode`).
    ``codec`` other than NONE means MRCZ.
    """

    mode: int | None = None
    codec: Codec = Codec.NONE
    clevel: int = 1
    byte_order: str = "<"

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise ConversionError(f"unknown target mode {self.mode}; known: {sorted(MODES)}")
        if not 0 <= self.clevel <= 9:
            raise ConversionError(f"clevel must be 0-9, got {self.clevel}")
        if not self.codec.available:
            raise ConversionError(f"codec {self.codec.cname!r} is not available in this blosc "
                                  f"build; available: {available_codecs()}")
        if self.byte_order not in ("<", ">"):
            raise ConversionError(f"byte order must be '<' or '>', got {self.byte_order!r}")

    @property
    def is_mrcz(self) -> bool:
        return self.codec is not Codec.NONE


def available_codecs() -> list[str]:
    return [c.cname for c in Codec if c is not Codec.NONE and c.available]


def default_mode(source: "SourceView") -> int:
    """4-bit -> mode 0 (the normalization), IMOD-unsigned bytes -> mode 6, else unchanged."""
    if source.mode == 101:
        return 0
    if source.mode == 0 and source.dtype == np.dtype("u1"):
        return 6
    return source.mode


@dataclass
class ConversionReport:
    source: str
    output: str
    source_mode: int
    target_mode: int
    codec: str | None
    clevel: int | None
    frames: int
    lossless: str                   # "by type" or "verified on every frame"
    stats: dict[str, float]
    data_bytes_in: int
    file_bytes_out: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _changed_pixels(original: np.ndarray, converted: np.ndarray, mode: int) -> np.ndarray:
    """Mask of pixels the conversion would not keep: the round trip back to the source
    dtype differs, or (4-bit target) the value does not fit in 0-15."""
    bad = differences(cast_to(converted, original.dtype), original)
    if mode_spec(mode).is_packed:
        bad |= converted > UINT4_MAX
    return bad


def _describe_first(bad: np.ndarray, original: np.ndarray) -> str:
    """Where and what the first unrepresentable value is, for the error message."""
    row, col = (int(i) for i in np.argwhere(bad)[0])
    value = original[row, col]
    value = value.item() if hasattr(value, "item") else value
    return f"row {row}, column {col} holds {value!r}"


def _extended_for(source: "SourceView", target: Target) -> tuple[bytes, bytes, int, int, str | None]:
    """Extended header to carry: (bytes, exttyp, nint, nreal, note if dropped)."""
    raw, exttyp = source.extended.raw, bytes(source.header["exttyp"])
    nint, nreal = int(source.header["nint"]), int(source.header["nreal"])
    if not raw:
        return b"", b"", 0, 0, None
    if exttyp == b"json" and not target.is_mrcz:
        # mrcfile and MRC2014 readers do not know EXTTYP json; its content is MRCZ's own.
        return b"", b"", 0, 0, "MRCZ JSON extended header not carried into plain MRC"
    if source.layout.byte_order == target.byte_order or exttyp in (b"json", b"CCP4", b"MRCO"):
        return raw, exttyp, nint, nreal, None
    if exttyp == b"SERI":
        # Every SERI item is a 16-bit short, so swapping shorts swaps the whole header.
        swapped = np.frombuffer(raw[: len(raw) // 2 * 2], dtype=f"{source.layout.byte_order}i2")
        return swapped.astype(f"{target.byte_order}i2").tobytes(), exttyp, nint, nreal, None
    return b"", b"", 0, 0, (f"{source.extended.kind} extended header ({len(raw)} bytes) not "
                            "carried: changing its byte order needs its full record layout")


def _labels_for(source: "SourceView", target: Target, mode: int) -> list[str]:
    kept = [t for t in hdr.labels(source.header) if not t.startswith("MRCZ")]
    what = f"mode {source.mode} -> {mode}"
    if target.is_mrcz:
        what += f" MRCZ {target.codec.cname}-{target.clevel}"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    ours = f"mrc-ingest: {what}, lossless  {stamp}"
    return ([MRCZ_LABEL] if target.is_mrcz else []) + kept + [ours]


def convert(source: str | os.PathLike | MrcFile, output: str | os.PathLike | Sink,
            target: Target = Target(), *, progress: Progress | None = None,
            known_stats: Stats | None = None) -> ConversionReport:
    """Convert ``source`` into ``output`` (a path, or a :class:`Sink` opened with a
    1024-byte reserved head) as ``target`` says. The output appears only when complete;
    on any error nothing is left behind and the source is untouched.

    ``known_stats``: the source's exact statistics, if already computed (every
    conversion here keeps the values, so they are the output's too)."""
    started = time.perf_counter()
    src_path = source.path if isinstance(source, MrcFile) else Path(source)
    if isinstance(output, (str, os.PathLike)):
        output = Path(output)
        if output.resolve() == src_path.resolve():
            raise ConversionError(f"output {os.fspath(output)!r} is the input file; choose "
                                  "another name (the input is never overwritten)")
    src = source if isinstance(source, MrcFile) else MrcFile(source)
    try:
        return _convert(src, output, target, progress, started, known_stats)
    finally:
        if src is not source:
            src.close()


class SourceView(Protocol):
    """What planning a conversion needs of its source: an open :class:`MrcFile`, or the
    header of a stream still arriving (:class:`service.mrc.stream.StreamSource`)."""

    header: np.record
    layout: hdr.Layout
    extended: ExtendedHeader

    @property
    def mode(self) -> int: ...

    @property
    def dtype(self) -> np.dtype: ...


@dataclass(frozen=True)
class OutputPlan:
    """The output's mode, descriptive header fields and extended header, decided from
    the source's header alone (so a stream can be converted frame by frame as it
    arrives), and how each frame is turned into the output mode."""

    source_mode: int
    source_dtype: np.dtype
    mode: int
    target: Target
    by_type: bool                  # every possible source value survives: no data check
    safe_modes: list[int]
    template: np.record
    extended: bytes
    exttyp: bytes
    nint: int
    nreal: int
    view_counts: bool              # 4-bit counts are viewed as int8 bytes, not copied
    note: str | None

    def writer(self, output: str | os.PathLike | Sink, layout: hdr.Layout, *,
               known_stats: Stats | None = None, collect_stats: bool = True,
               on_encoded: OnEncoded | None = None) -> MrcWriter:
        return MrcWriter(output, nx=layout.nx, ny=layout.ny, nz=layout.nz, mode=self.mode,
                         codec=self.target.codec, clevel=self.target.clevel,
                         byte_order=self.target.byte_order, template=self.template,
                         extended_header=self.extended, exttyp=self.exttyp, nint=self.nint,
                         nreal=self.nreal, known_stats=known_stats,
                         collect_stats=collect_stats, on_encoded=on_encoded)

    def convert_frame(self, k: int, frame: np.ndarray) -> np.ndarray:
        """Frame ``k`` (decoded source values) in the output mode's dtype; a value the
        output cannot hold raises :class:`LossyConversionError` naming where."""
        spec = mode_spec(self.mode)
        converted = frame.view(spec.dtype) if self.view_counts else cast_to(frame, spec.dtype)
        if not self.by_type:
            bad = _changed_pixels(frame, converted, self.mode)
            if bad.any():
                raise LossyConversionError(
                    f"mode {self.source_mode} -> {self.mode} ({spec.name}) would change "
                    f"values: frame {k}, {_describe_first(bad, frame)}", self.safe_modes)
        return converted


def plan_output(src: SourceView, target: Target) -> OutputPlan:
    """Decide the output for ``target`` from the source's header; raises
    :class:`ConversionError` for an impossible target before any frame is read."""
    mode = default_mode(src) if target.mode is None else target.mode
    spec = mode_spec(mode)
    safe_modes = lossless_targets(src.mode, src.dtype)
    if target.is_mrcz and spec.is_packed:
        raise ConversionError("MRCZ cannot hold 4-bit packed data (python-mrcz refuses it); "
                              "use mode 0, which bitshuffle compresses as well")
    if (src.dtype.kind == "c" or src.dtype.names) and not spec.is_complex:
        raise LossyConversionError(f"complex data (mode {src.mode}) cannot become real "
                                   f"mode {mode}", safe_modes)
    ext_raw, exttyp, nint, nreal, note = _extended_for(src, target)
    template = src.header.copy()
    set_labels(template, _labels_for(src, target, mode))
    if src.layout.packing == hdr.PACKED_HALF_WIDTH and int(src.header["mx"]) * 2 == src.layout.nx:
        # IMOD doubles MX and CELLA.x together for half-width files; do the same.
        template["mx"] = src.layout.nx
        template["cella"]["x"] = float(src.header["cella"]["x"]) * 2
    template["origin"] = hdr.origin(src.header)  # IMOD's inverted origin undone
    meta = src.extended.metadata or {}
    if isinstance(meta.get("mz"), int) and int(src.header["mz"]) == 0:
        template["mz"] = meta["mz"]  # the true MZ an MRCZ file of ours carried
    if target.is_mrcz and not ext_raw:
        ext_raw, exttyp = json.dumps({"mz": int(template["mz"])}).encode(), b"json"
    return OutputPlan(
        source_mode=src.mode, source_dtype=src.dtype, mode=mode, target=target,
        by_type=always_lossless(src.mode, src.dtype, mode), safe_modes=safe_modes,
        template=template, extended=ext_raw, exttyp=exttyp, nint=nint, nreal=nreal,
        # 4-bit counts (0-15) read as uint8 are already valid int8 bytes: view, not copy,
        # which keeps one fewer K2 super-resolution frame (57 MB) in memory.
        view_counts=bool(src.layout.packing) and spec.dtype.itemsize == 1, note=note)


def _convert(src: MrcFile, output: Path | Sink, target: Target, progress: Progress | None,
             started: float, known_stats: Stats | None) -> ConversionReport:
    plan = plan_output(src, target)
    lay = src.layout
    with plan.writer(output, lay, known_stats=known_stats) as writer:
        for k, frame in enumerate(src.frames()):
            # fresh arrays from the reader: the writer may keep them without a copy
            writer.write_frame(plan.convert_frame(k, frame), owned=True)
            if progress:
                progress(k + 1, lay.nz)
    return ConversionReport(
        source=str(src.path), output=str(output) if isinstance(output, Path) else "<sink>",
        source_mode=src.mode, target_mode=plan.mode,
        codec=target.codec.cname if target.is_mrcz else None,
        clevel=target.clevel if target.is_mrcz else None, frames=lay.nz,
        lossless="by type" if plan.by_type else "verified on every frame",
        stats=writer.final_stats.to_dict(),
        data_bytes_in=src.stored_data_nbytes, file_bytes_out=writer.size,
        seconds=round(time.perf_counter() - started, 3),
        notes=[plan.note] if plan.note else [])
