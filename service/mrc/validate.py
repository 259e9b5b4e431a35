"""Check a file and report findings; never raise for a bad file.

Covers every check of ``mrcfile.validate`` (MAP id, machine stamp, mode, dimensions and
cell, MAPC/MAPR/MAPS, volume-stack NZ, labels, NVERSION, EXTTYP, statistics, file size)
plus what it cannot see: 4-bit packing, IMOD flags, extended-header layouts, and every
MRCZ chunk. Structural problems come from opening the file (:class:`MrcFile`); field
checks from :func:`check_header_fields`; the statistics check reads every frame.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import header as hdr
from .codec import Codec
from .errors import FormatError
from .findings import Finding, error, has_errors, info, warning
from .modes import mode_spec
from .reader import MrcFile
from .stats import FrameStats, Stats, StatsAccumulator

#: Relative tolerance for mean and RMS, as mrcfile's validator uses.
STATS_RTOL = 0.01


def check_header_fields(h: np.record, layout: hdr.Layout | None) -> list[Finding]:
    """Field-level checks of a parsed header (MRC2014 words noted per check)."""
    found: list[Finding] = []
    if bytes(h["map"]) != hdr.MAP_ID:
        found.append(warning("map", f"MAP id (word 53) is {bytes(h['map'])!r}, expected "
                                    f"{hdr.MAP_ID!r}"))
    for name in ("mx", "my", "mz"):
        if int(h[name]) < 0:
            found.append(warning(name, f"{name.upper()} (sampling) is negative: {int(h[name])}"))
    for name in ("mx", "my"):
        if int(h[name]) == 0:
            found.append(warning(name, f"{name.upper()} is 0, so the pixel size CELLA/"
                                       f"{name.upper()} is undefined"))
    for axis in ("x", "y", "z"):
        if float(h["cella"][axis]) < 0:
            found.append(warning("cella", f"cell length {axis} is negative: "
                                          f"{float(h['cella'][axis])}; Direct Electron writes "
                                          "a negative cell as a placeholder, so any real "
                                          "pixel size (info.txt, .mdoc) wins over it"))
    axes = {int(h["mapc"]), int(h["mapr"]), int(h["maps"])}
    if axes != {1, 2, 3}:
        found.append(warning("mapc", "MAPC/MAPR/MAPS (words 17-19) are "
                                     f"{int(h['mapc'])}, {int(h['mapr'])}, {int(h['maps'])}: "
                                     "not a permutation of 1, 2, 3"))
    ispg, mz, nz = int(h["ispg"]), int(h["mz"]), int(h["nz"])
    if 401 <= ispg <= 630 and mz > 0 and nz % mz:
        found.append(warning("nz", f"volume stack (ISPG {ispg}): NZ {nz} is not a multiple "
                                   f"of MZ {mz}"))
    found += _check_labels(h)
    found += _check_version(h, layout)
    exttyp = bytes(h["exttyp"])
    compressed = layout is not None and layout.codec is not Codec.NONE
    known = hdr.KNOWN_EXTTYPES if compressed else tuple(t for t in hdr.KNOWN_EXTTYPES
                                                         if t != b"json")
    if int(h["nsymbt"]) > 0 and exttyp not in known:
        found.append(warning("exttyp", f"extended header of {int(h['nsymbt'])} bytes has "
                                       f"an unrecognised EXTTYP {exttyp!r}"))
    if layout is not None and layout.packing == hdr.PACKED_MODE_101 and layout.nx % 2:
        found.append(info("nx", f"4-bit data with odd NX {layout.nx}: each row is "
                                f"{(layout.nx + 1) // 2} bytes, the last nibble is padding"))
    if layout is not None and layout.mode == 0 and layout.bytes_signed and \
            int(h["imod_stamp"]) != hdr.IMOD_STAMP:
        found.append(info("mode", "mode 0 without the IMOD stamp: bytes read as signed "
                                  "(MRC2014); IMOD would read them as unsigned"))
    if int(h["imod_stamp"]) == hdr.IMOD_STAMP and \
            int(h["imod_flags"]) & hdr.ImodFlag.ORIGIN_INVERTED:
        found.append(info("origin", "IMOD flag: origin stored with inverted sign; reported "
                                    "with the MRC2014 sign"))
    return found


def _check_labels(h: np.record) -> list[Finding]:
    nlabl = int(h["nlabl"])
    if not 0 <= nlabl <= 10:
        return [warning("nlabl", f"NLABL is {nlabl}, must be 0-10")]
    used = [bool(bytes(label).strip(b" \x00")) for label in h["label"]]
    found = []
    if sum(used) != nlabl:
        found.append(warning("nlabl", f"NLABL says {nlabl} labels but {sum(used)} hold text"))
    if any(used[i] and not used[i - 1] for i in range(1, len(used))):
        found.append(warning("label", "a label with text follows an empty one"))
    return found


def _check_version(h: np.record, layout: hdr.Layout | None) -> list[Finding]:
    nversion = int(h["nversion"])
    if nversion in hdr.MRC2014_VERSIONS:
        return []
    standard = (layout is not None and layout.codec is Codec.NONE and not layout.packing
                and mode_spec(layout.mode).mrc2014)
    if not standard and nversion == 0:
        return []  # IMOD: files with non-MRC2014 modes should carry 0
    return [warning("nversion", f"NVERSION (word 28) is {nversion}, expected 20140 or 20141")]


def check_stats(h: np.record, actual: Stats) -> list[Finding]:
    """Header statistics against the data, with mrcfile's tolerances: DMIN/DMAX exact
    (as float32), DMEAN and RMS within 1%; fields marked undetermined are skipped."""
    found: list[Finding] = []
    dmin, dmax, dmean, rms = (float(h[k]) for k in ("dmin", "dmax", "dmean", "rms"))
    if actual.count == 0:
        return found
    if rms >= 0 and not math.isclose(actual.rms, rms, rel_tol=STATS_RTOL, abs_tol=1e-8):
        found.append(warning("rms", f"RMS in header is {rms}, the data's is {actual.rms:.6g}"))
    if dmin < dmax:
        if np.float32(actual.dmin) != np.float32(dmin):
            found.append(warning("dmin", f"DMIN in header is {dmin}, the data's is "
                                         f"{actual.dmin}"))
        if np.float32(actual.dmax) != np.float32(dmax):
            found.append(warning("dmax", f"DMAX in header is {dmax}, the data's is "
                                         f"{actual.dmax}"))
    if dmean > min(dmin, dmax) and not math.isclose(actual.dmean, dmean, rel_tol=STATS_RTOL,
                                                    abs_tol=1e-8):
        found.append(warning("dmean", f"DMEAN in header is {dmean}, the data's is "
                                      f"{actual.dmean:.6g}"))
    return found


def check_header_bytes(raw: bytes) -> tuple[hdr.Layout | None, list[Finding]]:
    """The door check on the first 1024 bytes of an upload, before anything is stored:
    a layout when they are an MRC/MRCZ header (byte order, positive sizes, known mode),
    else None with findings that say why. Field-level findings come with the layout."""
    if len(raw) < hdr.HEADER_SIZE:
        return None, [error("header", f"{len(raw)} bytes received, fewer than the "
                                      f"{hdr.HEADER_SIZE}-byte MRC header")]
    raw = bytes(raw[:hdr.HEADER_SIZE])
    byte_order, findings = hdr.detect_byte_order(raw)
    if byte_order is None:
        return None, findings
    h = hdr.parse(raw, byte_order)
    layout, more = hdr.derive_layout(h, byte_order)
    findings += more
    if layout is None:
        return None, findings
    return layout, findings + check_header_fields(h, layout)


@dataclass(frozen=True)
class FrameLimits:
    """How many frames, and how small, a header may declare before the work it asks for
    is refused (each frame costs a fixed amount of work and bookkeeping, whatever its
    size). None or 0: no limit. The format core reads no settings: the service passes
    its own, and ``setting_prefix`` makes each finding name the setting that holds the
    limit (``MRC_INGEST_`` there)."""

    max_frames: int | None = None
    #: frames smaller than this ...
    min_frame_bytes: int = 0
    #: ... may be at most this many
    max_small_frames: int | None = None
    setting_prefix: str = ""

    def setting(self, name: str) -> str:
        return f"{self.setting_prefix}{name}".upper() if self.setting_prefix else name


def check_frame_limits(layout: hdr.Layout, limits: FrameLimits | None) -> list[Finding]:
    """Error findings when the header declares more frames than ``limits`` allow (NZ),
    or more frames smaller than ``min_frame_bytes`` (NX x NY in MODE) than
    ``max_small_frames``; nothing when it is within them."""
    if limits is None:
        return []
    nz, found = layout.nz, []
    if limits.max_frames and nz > limits.max_frames:
        found.append(error("nz", f"NZ is {nz} frames, over the limit of {limits.max_frames} "
                                 f"frames ({limits.setting('max_frames')})"))
    elif limits.min_frame_bytes and limits.max_small_frames is not None and \
            layout.frame_nbytes < limits.min_frame_bytes and nz > limits.max_small_frames:
        found.append(error("nx", f"NX x NY = {layout.nx} x {layout.ny} (mode "
                                 f"{layout.mode}) makes frames of {layout.frame_nbytes} "
                                 f"bytes, and NZ is {nz}: more than the "
                                 f"{limits.max_small_frames} frames "
                                 f"({limits.setting('max_small_frames')}) of fewer than "
                                 f"{limits.min_frame_bytes} bytes "
                                 f"({limits.setting('min_frame_bytes')}) a movie may have"))
    return found


def scan(src: MrcFile, progress: Callable[[int, int], None] | None = None,
         on_frame: Callable[[np.ndarray], None] | None = None,
         per_frame: list[FrameStats] | None = None) -> tuple[Stats | None, list[Finding]]:
    """Read every frame once: exact statistics (None, with findings, when a frame cannot
    be read), ``on_frame`` for whatever else wants each frame (the ingest's sum image);
    each frame's own statistics are appended to ``per_frame`` when given."""
    acc = StatsAccumulator()
    for k in range(src.n_frames):
        try:
            frame = src.read_frame(k)
        except FormatError as exc:
            return None, exc.findings
        frame_stats = acc.add(frame)
        if per_frame is not None:
            per_frame.append(frame_stats)
        if on_frame:
            on_frame(frame)
        if progress:
            progress(k + 1, src.n_frames)
    return acc.result(), []


def open_checked(path: str | os.PathLike) -> tuple[MrcFile | None, list[Finding]]:
    """Open ``path`` and check its header fields: the open file (None when it cannot be
    read as MRC/MRCZ) and every finding so far."""
    try:
        src = MrcFile(path)
    except FormatError as exc:
        extra = check_header_fields(exc.header, None) if exc.header is not None else []
        return None, list(exc.findings) + extra
    except OSError as exc:
        return None, [error("file", f"cannot read {os.fspath(path)!r}: {exc.strerror}")]
    return src, src.findings + check_header_fields(src.header, src.layout)


def _run(path: str | os.PathLike, deep: bool,
         progress: Callable[[int, int], None] | None) -> tuple[dict[str, Any], list[Finding]]:
    src, findings = open_checked(path)
    report: dict[str, Any] = {"path": os.fspath(path)}
    if src is not None:
        with src:
            report.update(src.describe())
            if deep:
                stats, more = scan(src, progress)
                findings += more
                if stats is not None:
                    report["stats"] = stats.to_dict()
                    findings += check_stats(src.header, stats)
    report["valid"] = not has_errors(findings)
    report["findings"] = [f.to_dict() for f in findings]
    return report, findings


def validate(path: str | os.PathLike, *, deep: bool = True,
             progress: Callable[[int, int], None] | None = None) -> list[Finding]:
    """All findings for the file at ``path``. ``deep`` reads every frame to check the
    header statistics (and decompresses every MRCZ chunk)."""
    return _run(path, deep, progress)[1]


def inspect(path: str | os.PathLike, *, deep: bool = True,
            progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """JSON-ready facts about the file (:meth:`MrcFile.describe`), its findings, and with
    ``deep`` the exact statistics of its data. ``valid`` is False when any finding is an
    error."""
    return _run(path, deep, progress)[0]
