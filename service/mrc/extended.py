"""Extended headers (the NSYMBT bytes after byte 1024): identify and decode.

- ``json``: MRCZ metadata (python-mrcz ``specification.rst``, "JSON extended meta-data").
- ``SERI``: SerialEM per-section shorts; NINT = bytes per section, NREAL = flags saying
  which items follow, in flag order (IMOD ``mrc_format.txt``, header bytes 128-131).
- ``FEI1``/``FEI2``: Thermo Fisher EPU/Velox per-frame records of 768/888 bytes whose
  first int32 is the record size (FEI "MRC2014 extended header" description).
- ``CCP4``/``MRCO``: symmetry operators as 80-character text records.
Unknown types are identified and kept as raw bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .findings import Finding, info, warning

# --- SerialEM -------------------------------------------------------------------

#: (flag bit, bytes, item name, decoder from the shorts). In record order (IMOD doc).
_SERI_ITEMS: tuple[tuple[int, int, str], ...] = (
    (1, 2, "tilt_angle"),          # degrees * 100
    (2, 6, "piece_coordinates"),   # x, y, z of a montage piece
    (4, 4, "stage_position"),      # x, y in microns * 25
    (8, 2, "magnification"),       # magnification / 100
    (16, 2, "intensity"),          # intensity * 25000
    (32, 4, "exposure_dose"),      # e-/A^2 as a two-short float
    (64, 2, "reserved_64"),
    (128, 4, "reserved_128"),
    (256, 2, "reserved_256"),
    (512, 4, "reserved_512"),
    (1024, 2, "reserved_1024"),
)


def seri_bytes_for_flags(flags: int) -> int:
    """Bytes per section implied by NREAL's SerialEM flags."""
    return sum(size for bit, size, _ in _SERI_ITEMS if flags & bit)


def serialem_float(s1: int, s2: int) -> float:
    """SerialEM's float-in-two-shorts (IMOD doc):
    value = sign(s1) * (|s1| * 256 + (|s2| mod 256)) * 2 ** (sign(s2) * (|s2| // 256))."""
    sign1 = -1 if s1 < 0 else 1
    sign2 = -1 if s2 < 0 else 1
    a1, a2 = abs(s1), abs(s2)
    return float(sign1 * (a1 * 256 + (a2 % 256)) * 2.0 ** (sign2 * (a2 // 256)))


def _decode_seri(data: bytes, nint: int, nreal: int, byte_order: str) -> list[dict[str, Any]]:
    n_sections = len(data) // nint
    records: list[dict[str, Any]] = []
    for k in range(n_sections):
        shorts = np.frombuffer(data, dtype=f"{byte_order}i2", count=nint // 2, offset=k * nint)
        pos, record = 0, {}
        for bit, size, name in _SERI_ITEMS:
            if not nreal & bit:
                continue
            s = [int(v) for v in shorts[pos // 2:(pos + size) // 2]]
            pos += size
            if name == "tilt_angle":
                record[name] = s[0] / 100.0
            elif name == "piece_coordinates":
                record[name] = [v & 0xFFFF for v in s]  # unsigned (IMOD doc)
            elif name == "stage_position":
                record[name] = [s[0] / 25.0, s[1] / 25.0]
            elif name == "magnification":
                record[name] = s[0] * 100
            elif name == "intensity":
                record[name] = s[0] / 25000.0
            elif name == "exposure_dose":
                record[name] = serialem_float(s[0], s[1])
        records.append(record)
    return records


# --- FEI / Thermo Fisher ---------------------------------------------------------

FEI_RECORD_SIZES = {b"FEI1": 768, b"FEI2": 888}

#: The fields we surface, (name, byte offset in the record, numpy format); SI units as
#: EPU writes them (HT in V, lengths in m, dose in e-/m^2, times in s). Offsets from the
#: FEI/Thermo "MRC2014 extended header" description (mrcfile's dtype is the test oracle);
#: a field past the end of the shorter FEI1 record exists in FEI2 files only.
_FEI_FIELDS: tuple[tuple[str, int, str], ...] = (
    ("metadata_size", 0, "i4"),
    ("metadata_version", 4, "i4"),
    ("timestamp", 12, "f8"),
    ("microscope_type", 20, "S16"),
    ("application", 52, "S16"),
    ("ht", 84, "f8"),
    ("dose", 92, "f8"),
    ("alpha_tilt", 100, "f8"),
    ("beta_tilt", 108, "f8"),
    ("stage_x", 116, "f8"),
    ("stage_y", 124, "f8"),
    ("stage_z", 132, "f8"),
    ("pixel_size_x", 156, "f8"),
    ("pixel_size_y", 164, "f8"),
    ("defocus", 220, "f8"),
    ("magnification", 289, "f8"),
    ("camera_length", 301, "f8"),
    ("integration_time", 419, "f8"),
    ("binning_width", 427, "i4"),
    ("binning_height", 431, "i4"),
    ("camera_name", 435, "S16"),
    ("direct_detector_counting", 472, "b1"),
    ("is_dose_fraction", 655, "b1"),
    ("fraction_number", 656, "i4"),
    ("start_frame", 660, "i4"),
    ("end_frame", 664, "i4"),
    ("detector_commercial_name", 804, "S16"),  # FEI2
)
#: The record's own size and version words: a record whose only non-zero bytes are these
#: says nothing about an image, so "filled" means a non-zero byte after them.
_FEI_RECORD_PREAMBLE = 8


def fei_dtype(exttyp: bytes, byte_order: str) -> np.dtype:
    """A record dtype holding the surfaced fields at their published offsets (those that
    fit in the record: FEI1 records end before the FEI2 additions)."""
    size = FEI_RECORD_SIZES[exttyp]
    fields = [(n, o, np.dtype(f)) for n, o, f in _FEI_FIELDS if o + np.dtype(f).itemsize <= size]
    return np.dtype({
        "names": [n for n, _, _ in fields],
        "formats": [f.newbyteorder(byte_order) for _, _, f in fields],
        "offsets": [o for _, o, _ in fields],
        "itemsize": size,
    })


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.rstrip(b"\x00 ").decode("latin-1")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode_fei(data: bytes, exttyp: bytes,
                byte_order: str) -> tuple[list[dict[str, Any]], list[bool]]:
    """The records and, for each, whether it is filled. EPU reserves records for up to
    1024 images whatever the file holds (a one-frame image still carries 1024 x 768
    bytes) and leaves the unused ones zero."""
    dtype = fei_dtype(exttyp, byte_order)
    count = len(data) // dtype.itemsize
    records = np.frombuffer(data, dtype=dtype, count=count)
    raw = np.frombuffer(data, dtype=np.uint8, count=count * dtype.itemsize)
    filled = raw.reshape(count, dtype.itemsize)[:, _FEI_RECORD_PREAMBLE:].any(axis=1)
    return ([{name: _plain(rec[name]) for name in dtype.names} for rec in records],
            [bool(f) for f in filled])


# --- the one entry point -----------------------------------------------------------


@dataclass
class ExtendedHeader:
    """An identified extended header. ``records``: per-section dicts where the type has
    them (SERI, FEI), record k for section k, reserved ones included; ``filled``: for FEI,
    whether each record holds anything; ``metadata``: a dict (json); ``raw`` always holds
    the bytes."""

    kind: str
    raw: bytes
    records: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] | None = None
    text: list[str] = field(default_factory=list)
    filled: list[bool] = field(default_factory=list)

    def image_records(self, n_images: int | None = None) -> list[dict[str, Any]]:
        """The records of the images the file holds: the first ``n_images`` (SerialEM and
        EPU reserve room for more sections than they write), less the FEI records that
        were never filled."""
        filled = self.filled or [True] * len(self.records)
        return [r for r, f in zip(self.records[:n_images], filled) if f]

    def to_dict(self, max_records: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind, "nbytes": len(self.raw)}
        if self.metadata is not None:
            out["metadata"] = self.metadata
        if self.records:
            out["n_records"] = len(self.records)
            if self.filled:
                out["n_filled"] = sum(self.filled)
            out["records"] = self.records[:max_records] if max_records else self.records
        if self.text:
            out["text"] = self.text
        return out


def decode(raw: bytes, exttyp: bytes, nint: int, nreal: int, byte_order: str,
           n_sections: int) -> tuple[ExtendedHeader, list[Finding]]:
    """Identify and decode an extended header. Never raises for bad content: what does
    not fit its declared layout becomes a finding and stays available as raw bytes."""
    findings: list[Finding] = []
    kind = exttyp.rstrip(b"\x00 ").decode("latin-1") or "none"
    ext = ExtendedHeader(kind=kind, raw=raw)
    if not raw:
        return ext, findings
    if exttyp == b"json":
        try:
            meta = json.loads(raw.decode("utf-8"))
            ext.metadata = meta if isinstance(meta, dict) else {"value": meta}
        except (UnicodeDecodeError, ValueError) as exc:
            findings.append(warning("extended_header", f"EXTTYP json but the bytes are not "
                                                       f"valid JSON: {exc}"))
    elif exttyp == b"SERI":
        implied = seri_bytes_for_flags(nreal)
        if nint <= 0 or implied != nint:
            findings.append(warning("nint", f"SERI header: NINT {nint} bytes per section does "
                                            f"not match the {implied} bytes NREAL flags "
                                            f"{nreal} imply; per-section values not decoded"))
        else:
            ext.records = _decode_seri(raw, nint, nreal, byte_order)
            if len(ext.records) < n_sections:
                findings.append(warning("nsymbt", f"SERI header holds {len(ext.records)} "
                                                  f"section records for {n_sections} sections"))
    elif exttyp in FEI_RECORD_SIZES:
        size = FEI_RECORD_SIZES[exttyp]
        first = int(np.frombuffer(raw[:4], dtype=f"{byte_order}i4")[0]) if len(raw) >= 4 else 0
        if len(raw) < size:
            findings.append(warning("nsymbt", f"{kind} header of {len(raw)} bytes is shorter "
                                              f"than one {size}-byte record"))
        else:
            if first != size:
                findings.append(warning("extended_header", f"{kind} record says its size is "
                                                           f"{first}, the layout says {size}"))
            ext.records, ext.filled = _decode_fei(raw, exttyp, byte_order)
    elif exttyp in (b"CCP4", b"MRCO"):
        ext.text = [raw[i:i + 80].decode("latin-1").rstrip(" \x00")
                    for i in range(0, len(raw), 80)]
    else:
        findings.append(info("exttyp", f"extended header of type {kind!r} ({len(raw)} bytes) "
                                       "identified but not decoded; kept as raw bytes"))
    return ext, findings
