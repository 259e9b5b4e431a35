"""Acquisition metadata: SerialEM ``.mdoc`` and Direct Electron ``_info.txt`` sidecars,
and one summary of what a dashboard wants (voltage, pixel size, dose, exposure, tilt,
magnification, times) drawn from them and from FEI/SERI extended headers.

``.mdoc`` (SerialEM "autodoc"): ``Key = Value`` lines; global keys first, then sections
opened by ``[ZValue = n]`` (or ``[FrameSet = n]``, ``[MontSection = n]``); ``[T = ...]``
lines are titles. Direct Electron ``<id>_info.txt``: ``Key = Value`` lines whose keys may
hold spaces (``Scan - Size X = 256``). Nothing here raises for bad content: a line that
does not parse is a finding with its line number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

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
        values[key.strip()] = parse_value(value)
    return values, findings


def _per_image(doc: Mdoc, key: str) -> list[Any]:
    return [s[key] for s in doc.sections if key in s]


def _first(*candidates: Any) -> Any:
    return next((c for c in candidates if c not in (None, [], "")), None)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def summarize(*, mdoc: Mdoc | None = None, de_info: dict[str, Any] | None = None,
              extended: ExtendedHeader | None = None) -> dict[str, Any]:
    """The facts a dashboard shows, in fixed units (kV, Å, s, e-/Å², degrees), each from
    the first source that has it: ``.mdoc``, then the extended header, then DE info.
    Per-image lists keep the source's order (sections, or FEI/SERI records)."""
    out: dict[str, Any] = {}
    sources: list[str] = []
    records = extended.records if extended is not None else []
    fei = [r for r in records if "ht" in r]
    seri = [r for r in records if "ht" not in r]

    if mdoc is not None:
        sources.append("mdoc")
        g = mdoc.globals
        out["voltage_kv"] = _number(_first(g.get("Voltage"), *_per_image(mdoc, "Voltage")))
        out["pixel_size_angstrom"] = _number(_first(g.get("PixelSpacing"),
                                                    *_per_image(mdoc, "PixelSpacing")))
        doses = [d for d in map(_number, _per_image(mdoc, "ExposureDose")) if d is not None]
        if doses:
            out["dose_per_image"] = doses
            out["total_dose"] = sum(doses)
        times = [t for t in map(_number, _per_image(mdoc, "ExposureTime")) if t is not None]
        if times:
            out["exposure_time_s"] = times[0] if len(set(times)) == 1 else times
        tilts = [t for t in map(_number, _per_image(mdoc, "TiltAngle")) if t is not None]
        if tilts:
            out["tilt_angles"] = tilts
        mags = _per_image(mdoc, "Magnification")
        if mags:
            out["magnification"] = _number(mags[0])
        stage = _per_image(mdoc, "StagePosition")
        if stage:
            out["stage_positions"] = stage
        dates = _per_image(mdoc, "DateTime")
        if dates:
            out["datetimes"] = dates
        frames = _per_image(mdoc, "NumSubFrames")
        if frames:
            out["subframes"] = frames[0] if len(set(frames)) == 1 else frames
    if fei:
        sources.append("fei_extended_header")
        first = fei[0]
        out.setdefault("voltage_kv", first["ht"] / 1000.0 if first["ht"] else None)
        if first["pixel_size_x"]:
            out.setdefault("pixel_size_angstrom", first["pixel_size_x"] * 1e10)
        doses = [r["dose"] * 1e-20 for r in fei if r["dose"]]  # e-/m² -> e-/Å²
        if doses:
            out.setdefault("dose_per_image", doses)
            out.setdefault("total_dose", sum(doses))
        if first["integration_time"]:
            out.setdefault("exposure_time_s", first["integration_time"])
        out.setdefault("tilt_angles", [r["alpha_tilt"] for r in fei])
        out.setdefault("magnification", first["magnification"] or None)
        out.setdefault("timestamps", [r["timestamp"] for r in fei])
    if seri:
        sources.append("serialem_extended_header")
        tilts = [r["tilt_angle"] for r in seri if "tilt_angle" in r]
        if tilts:
            out.setdefault("tilt_angles", tilts)
        mags = [r["magnification"] for r in seri if "magnification" in r]
        if mags:
            out.setdefault("magnification", float(mags[0]))
        doses = [r["exposure_dose"] for r in seri if "exposure_dose" in r]
        if doses:
            out.setdefault("dose_per_image", doses)
            out.setdefault("total_dose", sum(doses))
        stage = [r["stage_position"] for r in seri if "stage_position" in r]
        if stage:
            out.setdefault("stage_positions", stage)
    if de_info is not None:
        sources.append("de_info")
        nx, ny = de_info.get("Scan - Size X"), de_info.get("Scan - Size Y")
        if isinstance(nx, int) and isinstance(ny, int) and nx > 0 and ny > 0:
            out["navigation_shape"] = [ny, nx]  # 4D-STEM scan: rows, columns
        for key, name in (("Voltage", "voltage_kv"),):
            if _number(de_info.get(key)) is not None:
                out.setdefault(name, _number(de_info[key]))
    summary = {k: v for k, v in out.items() if v is not None}
    if sources:
        summary["sources"] = sources
    return summary
