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
``nanometers``, ``kV`` or ``V``). The parsed values are kept as written.

Nothing here raises for bad content: a line that does not parse is a finding with its
line number.

Precedence
----------
Every fact of the summary comes from :data:`ROWS`, one row per (fact, source, source key,
unit in the source). A fact's rows are tried in table order and the first *present* value
wins: a source that lacks the key, or writes the "unset" value (0 for a voltage, pixel
size, magnification, exposure or dose; FEI records that were never filled), gives way to
the next one and never erases it. The order is the same for every fact:

1. ``mrc_header``: the file's own header, where it has the fact: the pixel size
   |CELLA|/MX when it is a real value (positive and finite; the magnitude, since Direct
   Electron writes negative cells) and MRCZ's voltage word (MRCZ files only). It is what
   RELION, cryoSPARC and IMOD read from the file, so the catalog agrees with them.
2. ``mdoc``: SerialEM writes it with the image, from its calibrations, at full precision.
3. ``fei_extended_header`` (EPU/Velox per-image records), then
   ``serialem_extended_header``: bound to the file, but after the .mdoc because the SERI
   shorts are rounded copies of the .mdoc's values (tilt to 0.01°, magnification to
   hundreds), and an .mdoc sent with an EPU file is a deliberate addition.
4. ``de_info``: authoritative for the camera (model, frame rate, frame count, exposure),
   but its microscope values (voltage, magnification, camera length) come from the
   optional TEM channel and are the server's settings when that is disconnected.
5. One exception: an MRC-header pixel size of exactly 1 Å (CELLA equal to the grid, what
   IMOD and EMAN write when they know no pixel size) ranks after every other source.

Derived from the chosen values, never kept twice: ``total_dose`` (sum of
``dose_per_image``), ``exposure_time_s`` from DE's frame count / frame rate when no source
gives it, ``pixel_size_sources`` (every source's pixel size), ``sources`` (those that
contributed) and the catalog columns (:func:`catalog_fields`). Pixel sizes or voltages
that disagree beyond :data:`AGREE_RTOL` are a finding naming the value the catalog uses.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, NamedTuple

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
#: the MRC header's keys for its pixel size: a real one, and the 1 Å placeholder
HEADER_PIXEL_SIZE, HEADER_PLACEHOLDER = "CELLA/MX", "CELLA/MX = 1 (placeholder)"


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
    Row("pixel_size_angstrom", "mrc_header", HEADER_PLACEHOLDER, "Å"),
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
#: facts whose sources must agree; relative tolerance: mdoc values carry 3-4 significant
#: digits, while a binning, super-resolution or nm/Å mix-up is a factor of 2 or 10
AGREEMENT_CHECKED = ("voltage_kv", "pixel_size_angstrom")
AGREE_RTOL = 0.01
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


def _header_values(h: np.record, findings: list[Finding]) -> dict[str, Any]:
    """The facts an MRC header holds: pixel size |CELLA|/MX, and MRCZ's voltage word."""
    out: dict[str, Any] = {}
    # float32 carries 7 significant digits; the rest of CELLA/MX is binary noise
    spacing = float(f"{hdr.voxel_size(h)[0]:.7g}")
    cell = float(h["cella"]["x"])
    if cell < 0 and spacing > 0:
        findings.append(info("pixel_size", f"CELLA x is negative ({cell:g} Å), as Direct "
                                           "Electron writes it; the pixel size is its "
                                           f"magnitude, {spacing:g} Å"))
    if math.isfinite(spacing) and spacing > 0:
        out[HEADER_PLACEHOLDER if spacing == 1.0 else HEADER_PIXEL_SIZE] = spacing
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


def _candidates(fact: Fact, views: dict[str, Any]) -> list[tuple[Row, Any]]:
    """(row, value in the fact's unit) for every source that has the fact, in order."""
    found = []
    for row in ROWS_BY_FACT[fact.name]:
        view = views.get(row.source)
        if view is None:
            continue
        raw = view.values(row.key, row.unit, per_image=fact.shape != "one")
        values = [convert(v, row.unit, fact.unit) for v in raw if _present(fact, v)]
        if not values:
            continue
        single = fact.shape == "one" or (fact.shape == "same"
                                         and all(v == values[0] for v in values))
        found.append((row, values[0] if single else values))
    return found


def _key_text(key: str | tuple[str, ...]) -> str:
    return key if isinstance(key, str) else "/".join(key)


def _disagreement(fact: Fact, found: list[tuple[Row, Any]]) -> list[Finding]:
    (chosen_row, chosen), others = found[0], found[1:]
    if all(math.isclose(v, chosen, rel_tol=AGREE_RTOL) for _, v in others):
        return []
    listing = "; ".join(f"{r.source} {_key_text(r.key)}: {v:g} {fact.unit}" for r, v in found)
    return [warning(fact.name, f"the sources disagree ({listing}); the catalog uses "
                               f"{chosen:g} {fact.unit} from {chosen_row.source}")]


def summarize(*, mdoc: Mdoc | None = None, de_info: dict[str, Any] | None = None,
              extended: ExtendedHeader | None = None, header: np.record | None = None,
              n_frames: int | None = None) -> tuple[dict[str, Any], list[Finding]]:
    """The facts a dashboard shows, in the units of :data:`FACTS`, each from the first
    source that has it (module docstring, "Precedence"), and the findings: pixel sizes
    or voltages that disagree, a negative cell, DE units we cannot read. Per-image lists
    keep the source's order and cover the images the file holds (``n_frames``, NZ).
    Missing facts are left out, never null."""
    findings: list[Finding] = []
    views: dict[str, Any] = {}
    if header is not None:
        views["mrc_header"] = _Dicts([_header_values(header, findings)])
    if mdoc is not None:
        views["mdoc"] = _Dicts(_mdoc_images(mdoc, n_frames, findings), [mdoc.globals])
    if extended is not None and extended.kind in EXTENDED_SOURCES:
        views[EXTENDED_SOURCES[extended.kind]] = _Dicts(extended.image_records(n_frames))
    if de_info is not None:
        views["de_info"] = _KeyValues(de_info, "de_info", findings)

    summary: dict[str, Any] = {}
    used: set[str] = set()
    for fact in FACTS:
        found = _candidates(fact, views)
        if not found:
            continue
        summary[fact.name] = found[0][1]
        used.add(found[0][0].source)
        if fact.name in AGREEMENT_CHECKED:
            findings += _disagreement(fact, found)
        if fact.name == "pixel_size_angstrom":
            summary["pixel_size_sources"] = [
                {"source": r.source, "key": _key_text(r.key), "value": v} for r, v in found]
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
