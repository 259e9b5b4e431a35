"""Sidecar files that travel with movies: SerialEM ``movie.mrc.mdoc`` / ``movie.mdoc`` and
Direct Electron ``<id>_info.txt`` (for ``<id>_movie.mrc``).

They may arrive before their movie, after it, or lie next to a registered file. Whatever
the order, a sidecar is kept in the catalog and attached to the movie's dataset by name;
the dataset's acquisition summary is recomputed from all its sidecars plus the movie's
header and extended header (:func:`service.mrc.acquisition.summarize`, whose docstring
says which source wins for each fact).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from .mrc.acquisition import catalog_fields, parse_key_values, parse_mdoc, summarize
from .mrc.extended import ExtendedHeader
from .mrc.findings import Finding

#: Sidecars are small text files; anything bigger is not one.
SIDECAR_MAX_BYTES = 16 << 20
_DE_INFO = re.compile(r"(?P<id>.+)_info\.txt")
#: name endings of sidecar files (for multipart bodies: parts kept beside the movie)
SIDECAR_SUFFIXES = (".mdoc", "_info.txt")
MOVIE_SUFFIXES = (".mrc", ".mrcs", ".mrcz", ".st", ".tif", ".tiff", ".eer")


def sidecar_kind(name: str) -> str | None:
    if name.lower().endswith(".mdoc"):
        return "mdoc"
    if _DE_INFO.fullmatch(name):
        return "de_info"
    return None


def belongs_to(sidecar_name: str, movie_name: str) -> bool:
    """``movie.mrc.mdoc`` -> ``movie.mrc``; ``movie.mdoc`` -> ``movie.<any suffix>``;
    ``<id>_info.txt`` -> ``<id>_movie.<suffix>`` (Direct Electron's naming)."""
    kind = sidecar_kind(sidecar_name)
    if kind == "mdoc":
        base = sidecar_name[:-len(".mdoc")]
        if base.lower().endswith(MOVIE_SUFFIXES):
            return movie_name == base
        return Path(movie_name).stem == base
    if kind == "de_info":
        movie_id = _DE_INFO.fullmatch(sidecar_name).group("id")  # type: ignore[union-attr]
        return Path(movie_name).stem == f"{movie_id}_movie"
    return False


def name_prefix(sidecar_name: str) -> str:
    """A prefix every movie name this sidecar may belong to starts with (catalog lookup)."""
    if sidecar_kind(sidecar_name) == "de_info":
        return _DE_INFO.fullmatch(sidecar_name).group("id") + "_movie"  # type: ignore[union-attr]
    return sidecar_name[:-len(".mdoc")]


def sidecar_names(movie_name: str) -> list[str]:
    """The names a sidecar of a registered movie may have beside it (they are read
    inside the roots by :meth:`service.roots.Roots.read_beside`)."""
    movie = Path(movie_name)
    names = [f"{movie.name}.mdoc", f"{movie.stem}.mdoc"]
    if movie.stem.endswith("_movie"):
        names.append(f"{movie.stem[:-len('_movie')]}_info.txt")
    return list(dict.fromkeys(names))


def decode_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # SerialEM on Windows writes the local code page


def acquisition(sidecar_rows: list[dict[str, Any]], extended: ExtendedHeader | None,
                header: np.record | None = None, n_frames: int | None = None
                ) -> tuple[dict[str, Any], list[Finding], dict[str, Any], dict[str, Any]]:
    """(summary, findings, parsed sidecars, catalog fields) of a dataset: the summary from
    its sidecars, extended header and MRC ``header`` (per-image lists limited to its
    ``n_frames`` images); the findings of parsing the sidecars and of summarizing
    (disagreeing pixel sizes, placeholders such as DE's negative cell, pixels that are not
    square); the parsed sidecars for the detail view;
    the catalog columns voltage_kv, pixel_size, exposure_s, magnification, camera,
    total_dose (None when unknown)."""
    mdoc = de_info = None
    findings: list[Finding] = []
    parsed: dict[str, Any] = {}
    for row in sidecar_rows:  # oldest first: a later upload of the same kind wins
        if row["kind"] == "mdoc":
            mdoc = parse_mdoc(row["text"])
            findings += mdoc.findings
            parsed["mdoc"] = {"name": row["name"], **mdoc.to_dict()}
        elif row["kind"] == "de_info":
            de_info, more = parse_key_values(row["text"], "de_info")
            findings += more
            parsed["de_info"] = {"name": row["name"], "values": de_info}
    summary, more = summarize(mdoc=mdoc, de_info=de_info, extended=extended, header=header,
                              n_frames=n_frames)
    return summary, findings + more, parsed, catalog_fields(summary)
