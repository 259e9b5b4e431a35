"""cryoSPARC particle sets: a ``.cs`` index (a numpy structured array, ``.npy`` format)
whose rows point into MRC stacks by ``blob/path`` and ``blob/idx`` (0-based, as cryoSPARC
writes it). With a folder given, only the file name of ``blob/path`` is used inside it
(as CryoLike's ``folder_cryosparc`` does).

Pickled (object) columns are never loaded: a ``.cs`` comes from a client, and unpickling
runs code. cryoSPARC writes fixed-width byte strings, which load without it.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import numpy as np

from .errors import MrcError
from .findings import Finding, error
from .reader import MrcFile
from .source import ByteSource, FileSource
from .writer import MrcWriter

PATH_FIELD, INDEX_FIELD = "blob/path", "blob/idx"
NUMPY_MAGIC = b"\x93NUMPY"
#: cryosparc-tools' compressed-stream format (``Dataset.save(..., format=CSDAT_FORMAT)``):
#: not numpy, and not read here
CSDAT_MAGIC = b"\x95CSDAT"
#: at most this many row numbers are spelled out in one finding
MAX_ROWS_LISTED = 20
#: opens a stack's file for reading; a service passes one that stays inside its roots
StackOpener = Callable[[Path], ByteSource]


class ParticleSetError(MrcError):
    """The .cs file is unusable (not .npy, pickled, missing blob fields), or so are the
    rows asked for (a missing stack, an index past its end, mixed shapes)."""


def load_cs(raw: bytes | os.PathLike | str) -> np.ndarray:
    if isinstance(raw, bytes):
        head = raw[:6]
    else:
        with open(raw, "rb") as f:
            head = f.read(6)
    if head == CSDAT_MAGIC:
        raise ParticleSetError("a cryoSPARC compressed-stream (CSDAT) .cs file; only the "
                               "numpy .cs format is read: save it with cryosparc-tools' "
                               "Dataset.save(path), whose default is the numpy format")
    if head != NUMPY_MAGIC:
        raise ParticleSetError("not a numpy .npy/.cs file (no NUMPY magic at byte 0)")
    try:
        source = io.BytesIO(raw) if isinstance(raw, bytes) else raw
        rows = np.load(source, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise ParticleSetError("the .cs file has object (pickled) columns, which are "
                                   "not loaded for safety; save strings as fixed-width "
                                   "bytes") from None
        raise ParticleSetError(f"not a numpy .npy/.cs file: {exc}") from None
    except (OSError, EOFError) as exc:
        raise ParticleSetError(f"not a numpy .npy/.cs file: {exc}") from None
    if not isinstance(rows, np.ndarray) or rows.dtype.names is None or rows.ndim != 1:
        raise ParticleSetError("a .cs file holds a 1-D structured array (one row per particle)")
    missing = [f for f in (PATH_FIELD, INDEX_FIELD) if f not in rows.dtype.names]
    if missing:
        raise ParticleSetError(f"the .cs file has no {', '.join(missing)} field; it has "
                               f"{list(rows.dtype.names)[:20]}")
    if rows.dtype[INDEX_FIELD].kind not in "iu":
        raise ParticleSetError(f"{INDEX_FIELD} must hold integers, not "
                               f"{rows.dtype[INDEX_FIELD]}")
    return rows


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def row_dict(rows: np.ndarray, k: int) -> dict[str, Any]:
    return {name: jsonable(rows[k][name]) for name in rows.dtype.names}


def _rows_text(rows: np.ndarray) -> str:
    listed = ", ".join(str(int(r)) for r in rows[:MAX_ROWS_LISTED])
    more = f" and {len(rows) - MAX_ROWS_LISTED} more" if len(rows) > MAX_ROWS_LISTED else ""
    return f"row{'s' if len(rows) > 1 else ''} {listed}{more}"


@dataclass
class StackInfo:
    name: str                 # blob/path as written in the .cs
    path: Path
    rows: int                 # how many rows point into it
    sections: int | None = None
    shape: tuple[int, int] | None = None
    mode: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"blob_path": self.name, "file": str(self.path), "rows": self.rows,
                "sections": self.sections, "shape": list(self.shape) if self.shape else None,
                "mode": self.mode}


@dataclass
class ParticleSet:
    rows: np.ndarray
    folder: Path
    stacks: dict[str, StackInfo] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    valid_rows: np.ndarray | None = None   # bool mask
    opener: StackOpener = FileSource

    def stack_path(self, blob_path: str) -> Path:
        return self.folder / PurePosixPath(blob_path.replace("\\", "/")).name

    def open_stack(self, path: Path) -> MrcFile:
        return MrcFile(self.opener(path), owns_source=True)

    def image(self, k: int) -> np.ndarray:
        """Particle ``k`` (row order) as a 2-D array."""
        if not 0 <= k < len(self.rows):
            raise IndexError(f"particle {k} out of range: the set has {len(self.rows)} rows")
        if self.valid_rows is not None and not self.valid_rows[k]:
            raise ParticleSetError(f"row {k} points at a missing stack or an index out of "
                                   "range (see the set's findings)")
        blob = _text(self.rows[k][PATH_FIELD])
        with self.open_stack(self.stack_path(blob)) as stack:
            return stack.read_frame(int(self.rows[k][INDEX_FIELD]))

    def images(self, selection: np.ndarray) -> Iterator[np.ndarray]:
        """Images of the selected rows, in row order; each stack is opened once at a time
        (consecutive rows from one stack reuse it)."""
        current_name, current = None, None
        try:
            for k in selection:
                blob = _text(self.rows[k][PATH_FIELD])
                if blob != current_name:
                    if current is not None:
                        current.close()
                    current_name, current = blob, self.open_stack(self.stack_path(blob))
                yield current.read_frame(int(self.rows[k][INDEX_FIELD]))
        finally:
            if current is not None:
                current.close()


def open_particle_set(rows: np.ndarray, folder: Path,
                      opener: StackOpener = FileSource) -> ParticleSet:
    """Check every referenced stack and index: a missing or unreadable stack, or an index
    past its stack's sections, is a finding naming the rows. Every stack is opened with
    ``opener``."""
    pset = ParticleSet(rows=rows, folder=folder, opener=opener)
    paths = np.array([_text(v) for v in rows[PATH_FIELD]], dtype=object)
    indices = rows[INDEX_FIELD].astype(np.int64)
    valid = np.ones(len(rows), dtype=bool)
    for name in dict.fromkeys(paths.tolist()):
        members = np.flatnonzero(paths == name)
        info = StackInfo(name=name, path=pset.stack_path(name), rows=len(members))
        pset.stacks[name] = info
        try:
            with pset.open_stack(info.path) as stack:
                info.sections, info.mode = stack.n_frames, stack.mode
                info.shape = (stack.layout.ny, stack.layout.nx)
        except FileNotFoundError:
            valid[members] = False
            pset.findings.append(error("blob/path", f"stack {name!r} not found as "
                                                    f"{str(info.path)!r}: "
                                                    f"{_rows_text(members)}"))
            continue
        except (MrcError, OSError) as exc:
            valid[members] = False
            pset.findings.append(error("blob/path", f"stack {name!r} is not readable MRC "
                                                    f"({exc}): {_rows_text(members)}"))
            continue
        bad = members[(indices[members] < 0) | (indices[members] >= info.sections)]
        if len(bad):
            valid[bad] = False
            pset.findings.append(error("blob/idx", f"index out of range for {name!r} "
                                                   f"({info.sections} sections, 0-based): "
                                                   f"{_rows_text(bad)}"))
    pset.valid_rows = valid
    return pset


def export_stack(pset: ParticleSet, selection: np.ndarray, output: Path) -> Path:
    """The selected particles, in row order, as one MRC stack (temp file + rename)."""
    if len(selection) == 0:
        raise ParticleSetError("no particles selected")
    bad = selection[~pset.valid_rows[selection]] if pset.valid_rows is not None else []
    if len(bad):
        raise ParticleSetError(f"the selection includes unusable rows "
                               f"({_rows_text(np.asarray(bad))}); see the set's findings")
    used = {_text(pset.rows[k][PATH_FIELD]) for k in selection}
    shapes = {pset.stacks[n].shape for n in used}
    modes = {pset.stacks[n].mode for n in used}
    if len(shapes) != 1 or len(modes) != 1:
        raise ParticleSetError(f"the selected particles come from stacks of different "
                               f"shapes/modes ({sorted(map(str, shapes))}, modes "
                               f"{sorted(map(str, modes))}); export them separately")
    (ny, nx), mode = shapes.pop(), modes.pop()
    mode = 0 if mode == 101 else mode  # 4-bit particles, if ever: raw counts in mode 0
    with pset.open_stack(pset.stacks[sorted(used)[0]].path) as first:
        template = first.header.copy()  # pixel size, origin, labels of the source
    template["ispg"], template["mz"] = 0, 1  # an image stack (MRC2014: ISPG 0, MZ 1)
    with MrcWriter(output, nx=nx, ny=ny, nz=len(selection), mode=mode,
                   template=template) as writer:
        for image in pset.images(selection):
            writer.write_frame(image.view(np.int8) if image.dtype == np.uint8 and mode == 0
                               else image, owned=True)
    return output
