"""The 1024-byte MRC2014 header as one numpy dtype, byte-order detection, and the data
layout a header implies.

Offsets (from 0) follow MRC2014 (Cheng et al. 2015) with the IMOD additions of
``mrc_format.txt`` (NINT/NREAL at 128/130, imodStamp/imodFlags at 152/156) and the MRCZ
words (voltage, C3, gain at 132-140, packed byte count at 144). Every reader, writer and
check in the package uses :data:`HEADER_DTYPE`; nobody re-types an offset.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag

import numpy as np

from . import codec as codec_mod
from .findings import Finding, error, info, warning
from .modes import MODES, frame_nbytes, mode_spec

HEADER_SIZE = 1024

_XYZ_F4 = [("x", "f4"), ("y", "f4"), ("z", "f4")]

#: Field order and sizes of the main header; the dtype has no byte order of its own.
HEADER_DTYPE = np.dtype([
    ("nx", "i4"), ("ny", "i4"), ("nz", "i4"),              # words 1-3: columns, rows, sections
    ("mode", "i4"),                                        # word 4 (+1000*codec for MRCZ)
    ("nxstart", "i4"), ("nystart", "i4"), ("nzstart", "i4"),  # words 5-7
    ("mx", "i4"), ("my", "i4"), ("mz", "i4"),              # words 8-10: sampling
    ("cella", _XYZ_F4),                                    # words 11-13: cell, Angstrom
    ("cellb", [("alpha", "f4"), ("beta", "f4"), ("gamma", "f4")]),  # words 14-16
    ("mapc", "i4"), ("mapr", "i4"), ("maps", "i4"),        # words 17-19: axis order
    ("dmin", "f4"), ("dmax", "f4"), ("dmean", "f4"),       # words 20-22
    ("ispg", "i4"),                                        # word 23: space group
    ("nsymbt", "i4"),                                      # word 24: extended header bytes
    ("creatid", "i2"), ("extra_98", "V6"),                 # word 25-26 (IMOD: creator id)
    ("exttyp", "S4"),                                      # word 27: extended header type
    ("nversion", "i4"),                                    # word 28: 20140 / 20141
    ("extra_112", "V16"),                                  # words 29-32
    ("nint", "i2"), ("nreal", "i2"),                       # word 33: SERI bytes/flags (IMOD)
    ("mrcz_voltage", "f4"), ("mrcz_c3", "f4"), ("mrcz_gain", "f4"),  # 132-143 (MRCZ, deprecated)
    ("mrcz_packed_bytes", "i8"),                           # 144: MRCZ total chunk bytes
    ("imod_stamp", "i4"), ("imod_flags", "i4"),            # 152, 156 (IMOD)
    ("extra_160", "V36"),                                  # 160-195: IMOD tilt info, unused
    ("origin", _XYZ_F4),                                   # words 50-52
    ("map", "S4"),                                         # word 53: "MAP "
    ("machst", "u1", (4,)),                                # word 54: machine stamp
    ("rms", "f4"),                                         # word 55
    ("nlabl", "i4"),                                       # word 56
    ("label", "S80", (10,)),                               # words 57-256
])
assert HEADER_DTYPE.itemsize == HEADER_SIZE

IMOD_STAMP = 1146047817
MAP_ID = b"MAP "
MRC2014_VERSIONS = (20140, 20141)
#: The version we write: MRC2014 update 1 (2017).
NVERSION = 20141
KNOWN_EXTTYPES = (b"CCP4", b"MRCO", b"SERI", b"AGAR", b"FEI1", b"FEI2", b"HDF5", b"json")
MACHST_LITTLE = ((0x44, 0x44, 0, 0), (0x44, 0x41, 0, 0))
MACHST_BIG = ((0x11, 0x11, 0, 0),)


class ImodFlag(IntFlag):
    """imodFlags bits (IMOD ``mrc_format.txt``, header byte 156)."""

    SIGNED_BYTES = 1
    PIXEL_SPACING_FROM_EXTENDED = 2
    ORIGIN_INVERTED = 4
    RMS_NEGATIVE_IF_UNSET = 8
    FOUR_BIT_BYTES = 16


def header_dtype(byte_order: str) -> np.dtype:
    return HEADER_DTYPE.newbyteorder(byte_order)


def parse(raw: bytes, byte_order: str) -> np.record:
    """View 1024 bytes as a header record in the given byte order ("<" or ">")."""
    return np.frombuffer(raw[:HEADER_SIZE], dtype=header_dtype(byte_order))[0]


def new_header(byte_order: str = "<") -> np.record:
    """A blank, writable MRC2014 header: MAP, MACHST, NVERSION, 90-degree cell, axes 1 2 3,
    the IMOD stamp (so that flags such as signed bytes are honoured), stats undetermined."""
    h = np.zeros(1, dtype=header_dtype(byte_order))[0]
    h["map"] = MAP_ID
    h["machst"] = MACHST_LITTLE[0] if byte_order == "<" else MACHST_BIG[0]
    h["nversion"] = NVERSION
    h["cellb"] = (90.0, 90.0, 90.0)
    h["mapc"], h["mapr"], h["maps"] = 1, 2, 3
    h["imod_stamp"] = IMOD_STAMP
    h["dmin"], h["dmax"], h["dmean"], h["rms"] = 0.0, -1.0, -2.0, -1.0
    return h


def _plausible(raw: bytes, byte_order: str) -> bool:
    """A reading whose dimensions are positive and whose MODE is a known (MRCZ) mode."""
    nx, ny, nz, raw_mode = np.frombuffer(raw[:16], dtype=f"{byte_order}i4")
    base, codec_id = codec_mod.split_mode(int(raw_mode))
    return (nx > 0 and ny > 0 and nz > 0 and raw_mode >= 0 and base in MODES
            and codec_id in codec_mod.Codec._value2member_map_)


def machine_stamp_order(machst: bytes) -> str | None:
    """Byte order named by MACHST, or None when the stamp is not one MRC2014 defines."""
    stamp = tuple(machst[:4])
    if stamp in MACHST_LITTLE:
        return "<"
    if stamp in MACHST_BIG:
        return ">"
    # Many writers fill only the first two bytes, or only the first: accept those.
    if stamp[0] == 0x44 and stamp[1] in (0x44, 0x41, 0x00):
        return "<"
    if stamp[0] == 0x11 and stamp[1] in (0x11, 0x00):
        return ">"
    return None


def detect_byte_order(raw: bytes) -> tuple[str | None, list[Finding]]:
    """Trust MACHST when its reading is plausible; otherwise use the order in which
    NX/NY/NZ/MODE are plausible (IMOD and mrcfile do the same)."""
    findings: list[Finding] = []
    stamped = machine_stamp_order(raw[212:216])
    candidates = [order for order in ("<", ">") if _plausible(raw, order)]
    if stamped and stamped in candidates:
        return stamped, findings
    if not candidates:
        nx, ny, nz, mode = np.frombuffer(raw[:16], dtype="<i4")
        findings.append(error("header", "not an MRC header: in neither byte order are "
                                        "NX/NY/NZ positive with a known MODE "
                                        f"(little-endian reading: {nx} x {ny} x {nz}, mode {mode})"))
        return None, findings
    chosen = candidates[0]
    name = "little" if chosen == "<" else "big"
    if stamped is None:
        findings.append(warning("machst", f"machine stamp {raw[212:216].hex(' ')} is not an "
                                          f"MRC2014 stamp; byte order detected as {name}-endian "
                                          "from the dimensions"))
    else:
        findings.append(warning("machst", f"machine stamp says the other byte order, but only "
                                          f"{name}-endian gives a sensible header; using that"))
    return chosen, findings


#: How 4-bit pixels are stored, when they are: SerialEM/IMOD mode 101 ...
PACKED_MODE_101 = "mode101"
#: ... or IMOD/SerialEM "4 bits packed" in a mode-0 file whose NX counts bytes, not pixels.
PACKED_HALF_WIDTH = "mode0-half-width"


@dataclass(frozen=True)
class Layout:
    """Everything needed to find and decode the pixels, derived from the header alone."""

    byte_order: str
    mode: int                 # base MRC mode as stored (101 for 4-bit, even half-width)
    codec: codec_mod.Codec
    nx: int                   # pixels per row (after undoing half-width packing)
    ny: int
    nz: int
    data_offset: int
    frame_nbytes: int         # stored bytes of one uncompressed frame
    dtype: np.dtype           # decoded pixel dtype, native byte order
    stored_dtype: np.dtype    # dtype of the stored (uncompressed) pixels, file byte order
    packing: str | None
    bytes_signed: bool | None  # for mode 0: how the bytes were interpreted

    @property
    def data_nbytes(self) -> int:
        """Bytes of an uncompressed data section."""
        return self.frame_nbytes * self.nz

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.nz, self.ny, self.nx)


def _looks_half_width(h: np.record) -> bool:
    """IMOD reads a mode-0 file as packed 4-bit in half the width when imodFlags has
    FOUR_BIT_BYTES (mrcfiles.c, mrc_head_read)."""
    return (int(h["imod_stamp"]) == IMOD_STAMP
            and bool(int(h["imod_flags"]) & ImodFlag.FOUR_BIT_BYTES))


def derive_layout(h: np.record, byte_order: str) -> tuple[Layout | None, list[Finding]]:
    """The data layout the header declares, or None with error findings."""
    findings: list[Finding] = []
    raw_mode = int(h["mode"])
    base, codec_id = codec_mod.split_mode(raw_mode)
    codec = codec_mod.Codec(codec_id)
    nx, ny, nz = int(h["nx"]), int(h["ny"]), int(h["nz"])
    nsymbt = int(h["nsymbt"])
    if nsymbt < 0:
        findings.append(error("nsymbt", f"extended header length is negative ({nsymbt})"))
        return None, findings
    spec = mode_spec(base)
    stored = spec.dtype.newbyteorder(byte_order)
    decoded = spec.dtype
    packing = PACKED_MODE_101 if spec.is_packed else None
    bytes_signed: bool | None = None
    if base == 0:
        if _looks_half_width(h):
            packing = PACKED_HALF_WIDTH
            findings.append(info("imod_flags", "mode 0 with the IMOD 4-bit flag: two 4-bit "
                                               f"pixels per byte, so NX {nx} counts bytes and "
                                               f"the frames are {2 * nx} pixels wide"))
            nx *= 2
            decoded = np.dtype("u1")
        else:
            stamped = int(h["imod_stamp"]) == IMOD_STAMP
            bytes_signed = (not stamped) or bool(int(h["imod_flags"]) & ImodFlag.SIGNED_BYTES)
            decoded = np.dtype("i1") if bytes_signed else np.dtype("u1")
            stored = decoded
            if stamped and not bytes_signed:
                findings.append(info("imod_flags", "IMOD stamp without the signed-bytes flag: "
                                                   "mode-0 bytes read as unsigned 0-255"))
    if packing == PACKED_HALF_WIDTH:
        base_for_size, stored = 101, np.dtype("u1")
    else:
        base_for_size = base
    frame_bytes = frame_nbytes(base_for_size, nx, ny)
    return Layout(byte_order=byte_order, mode=101 if packing else base, codec=codec,
                  nx=nx, ny=ny, nz=nz, data_offset=HEADER_SIZE + nsymbt,
                  frame_nbytes=frame_bytes, dtype=decoded, stored_dtype=stored,
                  packing=packing, bytes_signed=bytes_signed), findings


def labels(h: np.record) -> list[str]:
    """The used labels (NLABL of them, clamped to 0-10), decoded leniently."""
    n = min(max(int(h["nlabl"]), 0), 10)
    return [bytes(h["label"][i]).decode("latin-1").rstrip(" \x00") for i in range(n)]


def axis_spacing(cell: float, sampling: int, size: int) -> float:
    """Pixel spacing along one axis: |CELLA| / M (MRC2014). A spacing is a length, so a
    negative cell (Direct Electron writes them) gives its magnitude; the validator reports
    the sign. python-mrcz writes M = 0 and means CELLA / N, so a zero sampling falls back
    to that; a negative one gives 0."""
    if sampling > 0:
        return abs(cell) / sampling
    if sampling == 0 and size > 0:
        return abs(cell) / size
    return 0.0


def voxel_size(h: np.record) -> tuple[float, float, float]:
    """Pixel spacing in Angstrom along x, y, z, never negative (see :func:`axis_spacing`).

    Half-width 4-bit files: IMOD doubles MX and CELLA.x together when MX equals the
    stored NX, which leaves the spacing unchanged, so CELLA.x/MX is right either way.
    """
    return tuple(axis_spacing(float(h["cella"][a]), int(h[f"m{a}"]), int(h[f"n{a}"]))
                 for a in "xyz")  # type: ignore[return-value]


def origin(h: np.record) -> tuple[float, float, float]:
    """ORIGIN in Angstrom, with IMOD's inverted-origin flag undone."""
    o = (float(h["origin"]["x"]), float(h["origin"]["y"]), float(h["origin"]["z"]))
    if int(h["imod_stamp"]) == IMOD_STAMP and int(h["imod_flags"]) & ImodFlag.ORIGIN_INVERTED:
        o = tuple(-v for v in o)  # type: ignore[assignment]
    return o


def header_to_dict(h: np.record) -> dict:
    """JSON-ready copy of every named field (void padding omitted)."""
    out: dict = {}
    for name in HEADER_DTYPE.names:
        if name.startswith("extra"):
            continue
        value = h[name]
        if name == "label":
            out[name] = labels(h)
        elif name == "machst":
            out[name] = bytes(value).hex(" ")
        elif name in ("map", "exttyp"):
            out[name] = bytes(value).decode("latin-1")
        elif value.dtype.names:
            out[name] = {k: float(value[k]) for k in value.dtype.names}
        elif value.dtype.kind == "f":
            out[name] = float(value)
        else:
            out[name] = int(value)
    return out
