"""Acquisition metadata: SerialEM ``.mdoc`` and Direct Electron ``_info.txt`` sidecars,
and one summary of what a dashboard and the catalog want (voltage, pixel size, dose,
exposure, frame rate, tilt, magnification, camera, times) drawn from them, from FEI/SERI
extended headers and from the MRC header itself.

Formats
-------
``.mdoc`` (SerialEM help, "File Formats": an IMOD autodoc): ``Key = Value`` lines; global
keys first, then sections opened by ``[ZValue = n]`` (or ``[FrameSet = n]``,
``[MontSection = n]``); ``[T = ...]`` lines are titles. Units as SerialEM writes them:
Voltage kV, PixelSpacing Å, ExposureDose e-/Å², ExposureTime s, TiltAngle degrees,
StagePosition and Defocus µm.

Direct Electron ``<id>_info.txt`` (DE-Server autosave; spellings as in the DE files of
RosettaSciIO's test data): ``Key = Value`` lines, the key padded with spaces and most
carrying its unit in parentheses (``Instrument Accelerating Voltage (V) = 300000``,
``Specimen Pixel Size X (nanometers) = 0.1``, ``Exposure Time (seconds)``,
``Timestamp (seconds since Epoch)``); some have none (``Frames Per Second``,
``Camera Model``, ``Frame Count``). Keys are matched by name and unit with spaces and case
normalized, and a unit in any spelling of :data:`UNITS` converts (``nm`` or
``nanometers``, ``kV`` or ``V``). The parsed values are kept as written. DE writes ``-1``
for what it does not know (magnification, pixel sizes, camera length when the TEM channel
is off): that is no value (:data:`MEANINGS`). ``Specimen Pixel Size Y`` may differ from X:
both are kept (``pixel_size_angstrom``, ``pixel_size_y_angstrom``).

Nothing here raises for bad content: a line that does not parse is a finding with its
line number.

Precedence
----------
Every fact of the summary comes from :data:`ROWS`, one row per (fact, source, source key,
unit in the source), and what a value means from :data:`MEANINGS`, one row per (source,
kind of value) that is not what it seems. A fact's rows are tried in table order and the
first *real* value wins:

- a source that lacks the key, or writes a value that means "not known" (0 for a
  voltage, pixel size, magnification, exposure or dose; FEI records that were never
  filled; Direct Electron's ``-1``), gives way to the next one and never erases it;
- a *placeholder* (a stand-in a writer puts where it knows no value: an MRC-header pixel
  size of exactly 1 Å, CELLA equal to the grid, as IMOD and EMAN write it; a negative
  CELLA, Direct Electron's constant -10 Å per pixel whatever the binning) ranks after
  every real value of every source and is never a value itself: when no source has a
  real one the fact is unknown (left out of the summary, null in the catalog, so no
  filter, session range or RELION optics group is made of a stand-in). It is never a
  "sources disagree" warning: an info finding says it is a placeholder and what the
  catalog uses instead (or that the fact is unknown); ``pixel_size_sources`` lists it.

The order of the sources is the same for every fact:

1. ``mrc_header``: the file's own header, where it has the fact: the pixel size
   CELLA/MX (and CELLA/MY) and MRCZ's voltage word (MRCZ files only). It is what RELION,
   cryoSPARC and IMOD read from the file, so the catalog agrees with them.
2. ``mdoc``: SerialEM writes it with the image, from its calibrations, at full precision.
3. ``fei_extended_header`` (EPU/Velox per-image records), then
   ``serialem_extended_header``: bound to the file, but after the .mdoc because the SERI
   shorts are rounded copies of the .mdoc's values (tilt to 0.01°, magnification to
   hundreds), and an .mdoc sent with an EPU file is a deliberate addition.
4. ``de_info``: authoritative for the camera (model, frame rate, frame count, exposure),
   but its microscope values (voltage, magnification, camera length) come from the
   optional TEM channel and are the server's settings (or -1) when that is disconnected.

Derived from the chosen values, never kept twice: ``total_dose`` (sum of
``dose_per_image``), ``exposure_time_s`` from DE's frame count / frame rate when no source
gives it, ``pixel_size_sources`` (every source's pixel size), ``sources`` (those that
contributed) and the catalog columns (:func:`catalog_fields`). Real pixel sizes or
voltages that disagree beyond :data:`AGREE_RTOL` are a warning naming the value the catalog
uses; a pixel size in y that differs from x (beyond float32 rounding) is a warning too:
the catalog's ``pixel_size`` is the x one.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np

from . import header as hdr
from .codec import split_mode
from .extended import ExtendedHeader
from .findings import Finding, info, warning

_SECTION = re.compile(r"\[\s*([A-Za-z]\w*)\s*=\s*(.*?)\s*\]")
_MDOC_KEY = re.compile(r"[A-Za-z][\w.]*")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
#: section kinds that hold per-image keys, as SerialEM writes them
SECTION_KINDS = ("ZValue", "FrameSet", "MontSection")


def parse_value(text: str) -> Any:
    """A number, a list of numbers, or the text itself (dates, file names)."""
    tokens = text.split()
    if tokens and all(_NUMBER.fullmatch(t) for t in tokens):
        values = [int(t) if re.fullmatch(r"[-+]?\d+", t) else float(t) for t in tokens]
        return values[0] if len(values) == 1 else values
    return text.strip()


@dataclass
class Mdoc:
    globals: dict[str, Any] = field(default_factory=dict)
    sections: list[dict[str, Any]] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"globals": self.globals, "sections": self.sections, "titles": self.titles}


def parse_mdoc(text: str) -> Mdoc:
    doc = Mdoc()
    current: dict[str, Any] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("["):
            match = _SECTION.fullmatch(stripped)
            if match is None:
                doc.findings.append(warning("mdoc", f"line {number}: malformed section "
                                                    f"header {stripped[:80]!r}; skipped"))
                continue
            kind, value = match.groups()
            if kind == "T":
                doc.titles.append(value)
                continue
            current = {kind: parse_value(value)}
            doc.sections.append(current)
            if kind not in SECTION_KINDS:
                doc.findings.append(info("mdoc", f"line {number}: section kind {kind!r} "
                                                 "kept as it is"))
            continue
        key, sep, value = stripped.partition("=")
        key = key.strip()
        if not sep or not _MDOC_KEY.fullmatch(key):
            doc.findings.append(warning("mdoc", f"line {number}: not 'Key = Value': "
                                                f"{stripped[:80]!r}; skipped"))
            continue
        target = doc.globals if current is None else current
        if key in target:
            doc.findings.append(warning("mdoc", f"line {number}: {key} repeated; the last "
                                                "value wins"))
        target[key] = parse_value(value)
    return doc


def parse_key_values(text: str, source: str) -> tuple[dict[str, Any], list[Finding]]:
    """Direct Electron ``_info.txt`` (``Key = Value``, keys may hold spaces)."""
    values: dict[str, Any] = {}
    findings: list[Finding] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, value = stripped.partition("=")
        if not sep or not key.strip():
            findings.append(warning(source, f"line {number}: not 'Key = Value': "
                                            f"{stripped[:80]!r}; skipped"))
            continue
        key = key.strip()
        if key in values:
            findings.append(warning(source, f"line {number}: {key} repeated; the last value "
                                            "wins"))
        values[key] = parse_value(value)
    return values, findings


# --- units ---------------------------------------------------------------------------


def normalize(text: str) -> str:
    """Spaces collapsed, case folded, compatibility forms unified (Å sign, micro sign)."""
    return " ".join(unicodedata.normalize("NFKC", text).split()).casefold()


#: (quantity, power of ten of the quantity's base unit, spellings). Every factor is a power
#: of ten, so a conversion is exact in decimal after rounding off the binary noise.
_UNIT_SPELLINGS: tuple[tuple[str, int, tuple[str, ...]], ...] = (
    ("voltage", 0, ("V", "volt", "volts")),
    ("voltage", 3, ("kV", "kilovolt", "kilovolts")),
    ("length", 0, ("m", "meter", "meters", "metre", "metres")),
    ("length", -2, ("cm", "centimeter", "centimeters", "centimetre", "centimetres")),
    ("length", -3, ("mm", "millimeter", "millimeters", "millimetre", "millimetres")),
    ("length", -6, ("µm", "um", "micrometer", "micrometers", "micrometre", "micrometres",
                    "micron", "microns")),
    ("length", -9, ("nm", "nanometer", "nanometers", "nanometre", "nanometres")),
    ("length", -10, ("Å", "A", "angstrom", "angstroms", "ångström", "ångströms")),
    ("time", 0, ("s", "sec", "second", "seconds", "seconds since epoch")),
    ("time", -3, ("ms", "millisecond", "milliseconds")),
    ("time", -6, ("µs", "us", "microsecond", "microseconds")),
    ("time", -9, ("ns", "nanosecond", "nanoseconds")),
    ("rate", 0, ("fps", "Hz", "1/s", "frames/s")),
    ("fluence", 0, ("e-/m²", "e/m2")),
    ("fluence", 20, ("e-/Å²", "e/A2")),
    ("angle", 0, ("°", "deg", "degree", "degrees")),
    ("magnification", 0, ("x",)),
    ("number", 0, ("1",)),
)
#: normalized spelling -> (quantity, power of ten), derived from the spellings above
UNITS: dict[str, tuple[str, int]] = {normalize(spelling): (quantity, power)
                                     for quantity, power, spellings in _UNIT_SPELLINGS
                                     for spelling in spellings}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def convert(value: Any, unit: str | None, to: str | None) -> Any:
    """``value`` (a number or a list of numbers) given in ``unit``, expressed in ``to``.
    Text passes through. Raises KeyError for an unknown spelling and ValueError for units
    of different quantities (both are table errors; DE's own units are checked first)."""
    if unit is None or to is None or normalize(unit) == normalize(to):
        return value
    (quantity, power), (to_quantity, to_power) = UNITS[normalize(unit)], UNITS[normalize(to)]
    if quantity != to_quantity:
        raise ValueError(f"cannot express {unit} ({quantity}) in {to} ({to_quantity})")
    shift = power - to_power

    def scale(x: Any) -> Any:
        if not _is_number(x):
            return x
        scaled = x * 10 ** shift if shift >= 0 else x / 10 ** -shift
        return float(f"{scaled:.12g}")  # 0.1 nm is 1.0 Å, not 1.0000000000000002
    return [scale(v) for v in value] if isinstance(value, list) else scale(value)


# --- the one table -------------------------------------------------------------------


class Fact(NamedTuple):
    """A fact of the summary: its name, its shape (``one`` value; ``images``: one per
    image; ``same``: one per image, a single value when they all agree), its unit (a
    :data:`UNITS` spelling, None for text) and whether 0 means "not written"."""

    name: str
    shape: str
    unit: str | None
    zero_unset: bool = False


FACTS: tuple[Fact, ...] = (
    Fact("voltage_kv", "one", "kV", True),
    Fact("pixel_size_angstrom", "one", "Å", True),
    Fact("pixel_size_y_angstrom", "one", "Å", True),
    Fact("exposure_time_s", "same", "s", True),
    Fact("frames_per_second", "one", "fps", True),
    Fact("frame_count", "one", "1", True),
    Fact("movie_sum_count", "one", "1", True),      # DE: camera frames per saved frame
    Fact("subframes", "same", "1", True),
    Fact("magnification", "one", "x", True),
    Fact("camera", "one", None),
    Fact("camera_length_m", "one", "m", True),
    Fact("adus_per_electron", "one", "1", True),
    Fact("dose_per_image", "images", "e-/Å²", True),
    Fact("tilt_angles", "images", "°"),
    Fact("stage_positions", "images", "µm"),
    Fact("defocus_um", "images", "µm"),
    Fact("timestamps", "images", "s", True),         # as each source counts them
    Fact("datetimes", "images", None),
    Fact("binning", "one", "1", True),              # [x, y]
    Fact("hardware_binning", "one", "1", True),
    Fact("hardware_roi_offset", "one", "1"),
    Fact("hardware_roi_size", "one", "1", True),
    Fact("navigation_shape", "one", "1", True),     # 4D-STEM scan: [rows, columns]
)
FACT: dict[str, Fact] = {f.name: f for f in FACTS}

#: the sources, in precedence order (module docstring)
PRECEDENCE = ("mrc_header", "mdoc", "fei_extended_header", "serialem_extended_header",
              "de_info")
#: extended-header type -> source name
EXTENDED_SOURCES = {"FEI1": "fei_extended_header", "FEI2": "fei_extended_header",
                    "SERI": "serialem_extended_header"}
#: the MRC header's keys for its pixel sizes: CELLA/MX and CELLA/MY, signed as written
HEADER_PIXEL_SIZE, HEADER_PIXEL_SIZE_Y = "CELLA/MX", "CELLA/MY"
PIXEL_SIZES = ("pixel_size_angstrom", "pixel_size_y_angstrom")


class Row(NamedTuple):
    """Where a fact is found: the source, its key (a tuple of keys makes a list such as
    [x, y]) and the unit the source writes it in (DE: unless its key names another)."""

    fact: str
    source: str
    key: str | tuple[str, ...]
    unit: str | None


#: Each fact's rows in precedence order. Keys: mdoc as SerialEM spells them, FEI/SERI as
#: :mod:`.extended` names its fields, DE without the parenthesized unit.
ROWS: tuple[Row, ...] = (
    Row("voltage_kv", "mrc_header", "mrcz_voltage", "kV"),
    Row("voltage_kv", "mdoc", "Voltage", "kV"),
    Row("voltage_kv", "fei_extended_header", "ht", "V"),
    Row("voltage_kv", "de_info", "Instrument Accelerating Voltage", "V"),
    Row("pixel_size_angstrom", "mrc_header", HEADER_PIXEL_SIZE, "Å"),
    Row("pixel_size_angstrom", "mdoc", "PixelSpacing", "Å"),
    Row("pixel_size_angstrom", "fei_extended_header", "pixel_size_x", "m"),
    Row("pixel_size_angstrom", "de_info", "Specimen Pixel Size X", "nm"),
    Row("pixel_size_y_angstrom", "mrc_header", HEADER_PIXEL_SIZE_Y, "Å"),
    Row("pixel_size_y_angstrom", "mdoc", "PixelSpacing", "Å"),  # SerialEM: one for both
    Row("pixel_size_y_angstrom", "fei_extended_header", "pixel_size_y", "m"),
    Row("pixel_size_y_angstrom", "de_info", "Specimen Pixel Size Y", "nm"),
    Row("exposure_time_s", "mdoc", "ExposureTime", "s"),
    Row("exposure_time_s", "fei_extended_header", "integration_time", "s"),
    Row("exposure_time_s", "de_info", "Exposure Time", "s"),
    Row("frames_per_second", "de_info", "Frames Per Second", "fps"),
    Row("frame_count", "de_info", "Frame Count", "1"),
    Row("movie_sum_count", "de_info", "Autosave Movie Sum Count", "1"),
    Row("subframes", "mdoc", "NumSubFrames", "1"),
    Row("magnification", "mdoc", "Magnification", "x"),
    Row("magnification", "fei_extended_header", "magnification", "x"),
    Row("magnification", "serialem_extended_header", "magnification", "x"),
    Row("magnification", "de_info", "Instrument Project Magnification", "x"),
    Row("camera", "fei_extended_header", "detector_commercial_name", None),
    Row("camera", "fei_extended_header", "camera_name", None),
    Row("camera", "de_info", "Camera Model", None),
    Row("camera_length_m", "fei_extended_header", "camera_length", "m"),
    Row("camera_length_m", "de_info", "Instrument Project Camera Length", "cm"),
    Row("adus_per_electron", "de_info", "ADUs Per Electron", "1"),
    Row("adus_per_electron", "de_info", "ADUs Per Electron Bin1x", "1"),  # older servers
    Row("dose_per_image", "mdoc", "ExposureDose", "e-/Å²"),
    Row("dose_per_image", "fei_extended_header", "dose", "e-/m²"),
    Row("dose_per_image", "serialem_extended_header", "exposure_dose", "e-/Å²"),
    Row("tilt_angles", "mdoc", "TiltAngle", "°"),
    Row("tilt_angles", "fei_extended_header", "alpha_tilt", "°"),
    Row("tilt_angles", "serialem_extended_header", "tilt_angle", "°"),
    Row("stage_positions", "mdoc", "StagePosition", "µm"),
    Row("stage_positions", "fei_extended_header", ("stage_x", "stage_y"), "m"),
    Row("stage_positions", "serialem_extended_header", "stage_position", "µm"),
    Row("defocus_um", "mdoc", "Defocus", "µm"),
    Row("defocus_um", "fei_extended_header", "defocus", "m"),
    Row("timestamps", "fei_extended_header", "timestamp", "s"),
    Row("timestamps", "de_info", "Timestamp", "s"),
    Row("datetimes", "mdoc", "DateTime", None),
    Row("binning", "mdoc", ("Binning", "Binning"), "1"),
    Row("binning", "fei_extended_header", ("binning_width", "binning_height"), "1"),
    Row("binning", "de_info", ("Binning X", "Binning Y"), "1"),
    Row("hardware_binning", "de_info", ("Hardware Binning X", "Hardware Binning Y"), "1"),
    Row("hardware_roi_offset", "de_info", ("Hardware ROI Offset X", "Hardware ROI Offset Y"),
        "1"),
    Row("hardware_roi_size", "de_info", ("Hardware ROI Size X", "Hardware ROI Size Y"), "1"),
    Row("navigation_shape", "de_info", ("Scan - Size Y", "Scan - Size X"), "1"),
)
#: fact -> its rows, in table order
ROWS_BY_FACT: dict[str, tuple[Row, ...]] = {
    f.name: tuple(r for r in ROWS if r.fact == f.name) for f in FACTS}

#: what a value means: a real value, a placeholder (ranked after every real value), or
#: nothing (the source does not know; the next source's value is used)
VALUE, PLACEHOLDER, UNKNOWN = "value", "placeholder", "unknown"
RANKS = {VALUE: 0, PLACEHOLDER: 1}


class Meaning(NamedTuple):
    """A value a source writes that is not the value it seems to be. A property of the
    source and the value (as the source writes it, in its unit), for ``facts`` (None:
    every numeric fact of the source): ``test(value)`` says whether it applies;
    ``meaning`` is :data:`UNKNOWN` or :data:`PLACEHOLDER`; a placeholder that is used
    reads as ``reads_as(value)``."""

    source: str
    facts: tuple[str, ...] | None
    test: Callable[[float], bool]
    meaning: str
    why: str
    reads_as: Callable[[float], float] = abs


#: Every such value, in one place (module docstring, "Precedence"). The "unset" zeros of
#: :attr:`Fact.zero_unset` hold for every source and are the fact's.
MEANINGS: tuple[Meaning, ...] = (
    Meaning("de_info", None, lambda v: v == -1, UNKNOWN,
            "Direct Electron writes -1 for what it does not know"),
    Meaning("mrc_header", PIXEL_SIZES, lambda v: v < 0, PLACEHOLDER,
            "a negative cell: Direct Electron writes CELLA as -10 Å per pixel whatever "
            "the pixel size"),
    Meaning("mrc_header", PIXEL_SIZES, lambda v: v == 1, PLACEHOLDER,
            "CELLA equal to the grid: what IMOD and EMAN write when they know no pixel "
            "size"),
)
#: facts whose sources must agree; relative tolerance: mdoc values carry 3-4 significant
#: digits, while a binning, super-resolution or nm/Å mix-up is a factor of 2 or 10
AGREEMENT_CHECKED = ("voltage_kv", "pixel_size_angstrom")
AGREE_RTOL = 0.01
#: pixel sizes in x and y that differ by more than this (float32 rounding of CELLA/M) are
#: not square pixels
SQUARE_RTOL = 1e-5
#: catalog column -> the summary fact it holds (the pipeline writes the columns)
CATALOG_COLUMNS = (("voltage_kv", "voltage_kv"), ("pixel_size", "pixel_size_angstrom"),
                   ("exposure_s", "exposure_time_s"), ("magnification", "magnification"),
                   ("camera", "camera"), ("total_dose", "total_dose"))
CAMERA_COLUMN_CHARS = 64


# --- sources as views ----------------------------------------------------------------


def _pick(mapping: dict[str, Any], key: str | tuple[str, ...]) -> Any:
    if isinstance(key, str):
        return mapping.get(key)
    parts = [mapping.get(k) for k in key]
    return None if any(p is None for p in parts) else parts


@dataclass
class _Dicts:
    """A source as per-image dicts (mdoc sections, FEI/SERI records, the header's one
    dict) plus dicts that hold single facts only (mdoc globals): the candidates for a key
    are the global value, then each image's."""

    images: list[dict[str, Any]]
    head: list[dict[str, Any]] = field(default_factory=list)

    def values(self, key: str | tuple[str, ...], unit: str | None,
               per_image: bool) -> list[Any]:
        dicts = self.images if per_image else [*self.head, *self.images]
        return [v for v in (_pick(d, key) for d in dicts) if v is not None]


_UNIT_SUFFIX = re.compile(r"(?P<name>.*?)\s*\((?P<unit>[^()]*)\)")


class _KeyValues:
    """Direct Electron ``info.txt`` values by normalized name, each key's parenthesized
    unit converted into the unit a row asks for."""

    def __init__(self, values: dict[str, Any], source: str, findings: list[Finding]):
        self.source, self.findings = source, findings
        self.by_name: dict[str, list[tuple[str, str | None, Any]]] = {}
        for key, value in values.items():
            match = _UNIT_SUFFIX.fullmatch(key)
            name, unit = (match["name"], normalize(match["unit"])) if match else (key, None)
            self.by_name.setdefault(normalize(name), []).append((key, unit, value))
        if any(normalize(str(v)) == "disable" for *_, v in self.by_name.get("scan - enable", [])):
            # DE writes its scan settings with scanning off too; then they describe nothing
            self.by_name = {n: e for n, e in self.by_name.items() if not n.startswith("scan -")}

    def values(self, key: str | tuple[str, ...], unit: str | None,
               per_image: bool) -> list[Any]:
        if not isinstance(key, str):
            parts = [self.values(k, unit, per_image) for k in key]
            return [[p[0] for p in parts]] if all(parts) else []
        entries = self.by_name.get(normalize(key), [])
        for _, spelled, value in entries:
            if spelled is None:
                return [value]  # no unit written: the one DE writes for this key
            if unit is not None and UNITS.get(spelled, ("",))[0] == UNITS[normalize(unit)][0]:
                return [convert(value, spelled, unit)]
        if entries:
            self.findings.append(warning(self.source, f"{entries[0][0]!r}: the unit "
                                                      f"{entries[0][1]!r} is not one we "
                                                      f"read as {unit or 'text'}; not used"))
        return []


def _header_values(h: np.record) -> dict[str, Any]:
    """The facts an MRC header holds: the pixel sizes CELLA/MX and CELLA/MY, signed as
    written (:data:`MEANINGS` says what a negative or 1 Å one is), and MRCZ's voltage
    word."""
    out: dict[str, Any] = {}
    spacings = hdr.voxel_size(h)
    for key, axis, spacing in ((HEADER_PIXEL_SIZE, "x", spacings[0]),
                               (HEADER_PIXEL_SIZE_Y, "y", spacings[1])):
        # float32 carries 7 significant digits; the rest of CELLA/M is binary noise
        out[key] = math.copysign(float(f"{spacing:.7g}"), float(h["cella"][axis]))
    labels = hdr.labels(h)
    if split_mode(int(h["mode"]))[1] or (labels and labels[0].startswith("MRCZ")):
        out["mrcz_voltage"] = float(h["mrcz_voltage"])  # kV (python-mrcz writeMRC)
    return out


def _mdoc_images(doc: Mdoc, n_frames: int | None,
                 findings: list[Finding]) -> list[dict[str, Any]]:
    """The sections of images the file holds (``[ZValue = n]`` with n < NZ)."""
    if n_frames is None:
        return doc.sections
    held = [s for s in doc.sections
            if not (isinstance(s.get("ZValue"), int) and s["ZValue"] >= n_frames)]
    if len(held) < len(doc.sections):
        findings.append(warning("mdoc", f"{len(doc.sections) - len(held)} [ZValue] sections "
                                        f"describe images past the file's {n_frames}; "
                                        "not used"))
    return held


# --- the summary -----------------------------------------------------------------------


def _present(fact: Fact, value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(_present(fact, v) for v in value)
    if fact.unit is None:
        return isinstance(value, str) and value.strip() != ""
    return (_is_number(value) and math.isfinite(value)
            and not (fact.zero_unset and value == 0))


def _meaning(source: str, fact: Fact, value: Any) -> Meaning | None:
    """The row of :data:`MEANINGS` that a number (or any number of a list) written by
    ``source`` falls under; None for a plain value. Unknown before placeholder."""
    numbers = [v for v in (value if isinstance(value, list) else [value]) if _is_number(v)]
    found = [m for m in MEANINGS if m.source == source
             and (m.facts is None or fact.name in m.facts)
             and any(m.test(v) for v in numbers)]
    return min(found, key=lambda m: m.meaning != UNKNOWN, default=None)


class Candidate(NamedTuple):
    """One source's value of a fact: in the fact's unit (a placeholder as it reads), as
    the source wrote it (in the row's unit), and what it means (None: a real value)."""

    row: Row
    value: Any
    written: Any
    meaning: Meaning | None

    @property
    def placeholder(self) -> bool:
        return self.meaning is not None


def _read(row: Row, fact: Fact, value: Any) -> tuple[Any, Meaning | None] | None:
    """(value as it reads, its meaning) of a value written by ``row.source``; None when
    it is no value (absent, unset, unknown)."""
    if not _present(fact, value):
        return None
    meaning = _meaning(row.source, fact, value)
    if meaning is None:
        return value, None
    if meaning.meaning == UNKNOWN:
        return None
    reads = [meaning.reads_as(v) for v in value] if isinstance(value, list) \
        else meaning.reads_as(value)
    return reads, meaning


def _candidates(fact: Fact, views: dict[str, Any]) -> list[Candidate]:
    """Every source's value of the fact, real values first, each rank in table order."""
    found = []
    for row in ROWS_BY_FACT[fact.name]:
        view = views.get(row.source)
        if view is None:
            continue
        raw = view.values(row.key, row.unit, per_image=fact.shape != "one")
        read = [(v, r) for v in raw if (r := _read(row, fact, v)) is not None]
        if not read:
            continue
        values = [convert(value, row.unit, fact.unit) for _, (value, _) in read]
        meaning = next((m for _, (_, m) in read if m is not None), None)
        single = fact.shape == "one" or (fact.shape == "same"
                                         and all(v == values[0] for v in values))
        found.append(Candidate(row, values[0] if single else values,
                               read[0][0] if single else [v for v, _ in read], meaning))
    return sorted(found, key=lambda c: RANKS[c.meaning.meaning if c.meaning else VALUE])


def _key_text(key: str | tuple[str, ...]) -> str:
    return key if isinstance(key, str) else "/".join(key)


def _comparison(fact: Fact, found: list[Candidate]) -> list[Finding]:
    """A fact's sources compared: each placeholder said to be one (an info, never a
    disagreement), and real values that disagree beyond :data:`AGREE_RTOL` (a warning)."""
    chosen, out = found[0], []
    for c in found:
        if not c.placeholder:
            continue
        written = f"{c.row.source} {_key_text(c.row.key)}: {c.written:g} {c.row.unit}"
        uses = ("no source has a real value, so the pixel size is unknown (a placeholder "
                "is never used as one)"
                if c is chosen else
                f"ranked after every real value: the catalog uses {chosen.value:g} "
                f"{fact.unit} from {chosen.row.source}")
        out.append(info(fact.name, f"{written} is a placeholder ({c.meaning.why}); {uses}"))
    real = [c for c in found if not c.placeholder]
    if not real or all(math.isclose(c.value, real[0].value, rel_tol=AGREE_RTOL)
                       for c in real[1:]):
        return out
    listing = "; ".join(f"{c.row.source} {_key_text(c.row.key)}: {c.value:g} {fact.unit}"
                        for c in real)
    return out + [warning(fact.name, f"the sources disagree ({listing}); the catalog uses "
                                     f"{chosen.value:g} {fact.unit} from {chosen.row.source}")]


def _not_square(chosen: dict[str, Candidate]) -> list[Finding]:
    """A warning when the real pixel sizes in x and y differ (the catalog keeps x); a
    placeholder says nothing about the pixel's shape."""
    x, y = (chosen.get(name) for name in PIXEL_SIZES)
    if x is None or y is None or x.placeholder or y.placeholder \
            or math.isclose(x.value, y.value, rel_tol=SQUARE_RTOL):
        return []
    return [warning("pixel_size_y_angstrom",
                    f"the pixels are not square: {x.value:g} Å in x ({x.row.source} "
                    f"{_key_text(x.row.key)}), {y.value:g} Å in y ({y.row.source} "
                    f"{_key_text(y.row.key)}); both are kept, the catalog's pixel size is "
                    "the x one")]


def summarize(*, mdoc: Mdoc | None = None, de_info: dict[str, Any] | None = None,
              extended: ExtendedHeader | None = None, header: np.record | None = None,
              n_frames: int | None = None) -> tuple[dict[str, Any], list[Finding]]:
    """The facts a dashboard shows, in the units of :data:`FACTS`, each from the first
    source that has a real value (module docstring, "Precedence"), and the findings:
    pixel sizes or voltages that disagree, placeholders, pixels that are not square, DE
    units we cannot read. Per-image lists keep the source's order and cover the images
    the file holds (``n_frames``, NZ). Missing facts are left out, never null."""
    findings: list[Finding] = []
    views: dict[str, Any] = {}
    if header is not None:
        views["mrc_header"] = _Dicts([_header_values(header)])
    if mdoc is not None:
        views["mdoc"] = _Dicts(_mdoc_images(mdoc, n_frames, findings), [mdoc.globals])
    if extended is not None and extended.kind in EXTENDED_SOURCES:
        views[EXTENDED_SOURCES[extended.kind]] = _Dicts(extended.image_records(n_frames))
    if de_info is not None:
        views["de_info"] = _KeyValues(de_info, "de_info", findings)

    summary: dict[str, Any] = {}
    chosen: dict[str, Candidate] = {}
    for fact in FACTS:
        found = _candidates(fact, views)
        if not found:
            continue
        chosen[fact.name] = found[0]
        if not found[0].placeholder:  # a stand-in alone: the fact is unknown
            summary[fact.name] = found[0].value
        if fact.name in AGREEMENT_CHECKED:
            findings += _comparison(fact, found)
        if fact.name == "pixel_size_angstrom":
            summary["pixel_size_sources"] = [
                {"source": c.row.source, "key": _key_text(c.row.key), "value": c.value,
                 **({"placeholder": True} if c.placeholder else {})} for c in found]
    findings += _not_square(chosen)
    used = {c.row.source for c in chosen.values() if not c.placeholder}
    if "dose_per_image" in summary:
        summary["total_dose"] = sum(summary["dose_per_image"])
    if "exposure_time_s" not in summary and {"frame_count", "frames_per_second"} <= set(summary):
        summary["exposure_time_s"] = summary["frame_count"] / summary["frames_per_second"]
    if used:
        summary["sources"] = [s for s in PRECEDENCE if s in used]
    return summary, findings


def catalog_fields(summary: dict[str, Any]) -> dict[str, Any]:
    """The catalog columns of a summary, None where unknown. ``exposure_s`` is the whole
    exposure: the time every image shares (a movie's), or their sum when they differ."""
    out = {column: summary.get(fact) for column, fact in CATALOG_COLUMNS}
    if isinstance(out["exposure_s"], list):
        out["exposure_s"] = sum(out["exposure_s"])
    if out["magnification"] is not None:
        out["magnification"] = float(out["magnification"])
    if out["camera"] is not None:
        out["camera"] = out["camera"][:CAMERA_COLUMN_CHARS]
    return out
