"""A session's movies for processing: a RELION 3.1+ movies STAR file and a CSV of every
catalog column (DESIGN.md section 13). Pure writers: they take rows (the catalog's
``session_movies`` pages, oldest first) and yield text chunks; the router streams them.

The STAR file
-------------
* Only ``ready`` movies are written; rejected, failed and in-flight (receiving, queued,
  processing) movies are left out and counted in a comment line at the top.
* ``data_optics`` holds one optics group per distinct (pixel size, voltage, frame size,
  MRC mode), named ``opticsGroup1..n`` in order of first appearance (oldest movie
  first), with ``rlnSphericalAberration`` and ``rlnAmplitudeContrast`` as given (query
  parameters, else settings; never guessed). A comment line per group says what it is.
* ``data_movies`` has ``rlnMicrographMovieName`` and ``rlnOpticsGroup``, oldest first.
  The name is the absolute as-received download URL, or with ``prefix`` (where the
  store is mounted) a file RELION can read: a registered movie's own path on shared
  storage, an upload's kept original as ``<prefix><its key>``. An upload kept only as
  its MRCZ archive (the default) has no such file: it is refused like an incomplete
  movie, as the MRCZ archive is not a file RELION reads.
* Each data block is preceded by ``# version 30001``, as RELION 3.1 writes.
* Numbers are written as Python's ``repr`` of the stored float: the shortest text that
  reads back as exactly the same double.
* A ready movie without a (positive, finite) pixel size or voltage cannot be in an
  optics group, and a movie path that STAR cannot hold (a control character, a name
  that is no Unicode, both quote characters) cannot be written: the export is refused
  before its first byte (:class:`~service.errors.Unprocessable`, naming the first
  movies and what each lacks) unless ``skip_incomplete``, which leaves them out and
  counts them in the comment.

The file is written in two passes over the session's rows: the first (narrow columns)
finds the optics groups, the counts and the incomplete movies, so a refusal comes before
anything is sent and ``data_optics`` can precede the movies; the second streams
``data_movies``. A movie that becomes ready between the passes is written when its
optics group is in the header and left out otherwise (it is in the next export); one
deleted in between is not written. The counts in the comment are the first pass's.

The CSV
-------
One row per movie of the session (every status), oldest first: every column of the
``datasets`` table except the large JSON ones (``info``, ``frame_stats``,
``progress``), plus ``session_name`` after ``session_id``. Values as stored (``repr``
for floats, empty for null), quoted by the csv module where needed (RFC 4180, CRLF line
ends), UTF-8 without a byte-order mark. A name that is no valid Unicode (undecodable
bytes of a registered file, held as lone surrogates) is written with U+FFFD in their
place, as in Content-Disposition.
"""

from __future__ import annotations

import csv
import io
import math
import operator
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from .catalog.schema import datasets
from .catalog.sessions import IN_FLIGHT
from .errors import Conflict, Unprocessable

Row = dict[str, Any]

#: the STAR header's RELION version line, written before each data block
STAR_VERSION = "# version 30001"
OPTICS_LABELS = ("rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographOriginalPixelSize",
                 "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
MOVIE_LABELS = ("rlnMicrographMovieName", "rlnOpticsGroup")
#: what tells optics groups apart (dataset columns)
OPTICS_KEY = ("pixel_size", "voltage_kv", "nx", "ny", "mode")
_optics_key = operator.itemgetter(*OPTICS_KEY)
#: the dataset columns the STAR file is made of (both passes)
STAR_COLUMNS = [datasets.c[name] for name in ("id", "name", "created_at", "status",
                                              *OPTICS_KEY)]
#: ... and with ``prefix``, where each movie's readable file is
PATH_COLUMNS = STAR_COLUMNS + [datasets.c[name] for name in ("source", "path", "info")]
#: the large JSON columns the CSV leaves out
CSV_LEFT_OUT = ("info", "frame_stats", "progress")
CSV_DATASET_COLUMNS = [c for c in datasets.c if c.name not in CSV_LEFT_OUT]
#: the CSV's header: the dataset columns in table order, the session's name after its id
CSV_FIELDS = tuple(name for c in CSV_DATASET_COLUMNS
                   for name in ((c.name, "session_name") if c.name == "session_id"
                                else (c.name,)))
#: how many problem movies a refusal names
NAMED_IN_REFUSAL = 10
#: text gathered before a chunk is handed on (one thread hop per chunk when streaming)
CHUNK_CHARS = 64 * 1024


@dataclass(frozen=True)
class Optics:
    """The two optics values no movie header carries (RELION needs both)."""

    cs_mm: float
    amplitude_contrast: float


def resolve_optics(cs_mm: float | None, amplitude_contrast: float | None,
                   default_cs_mm: float | None, default_amplitude_contrast: float | None
                   ) -> Optics:
    """The query parameters, else the settings; a value in neither is a 422 naming it
    (never guessed: 2.7 mm is a Krios, 0.01 mm a corrected one; 0.1 is RELION's default,
    0.07 cryoSPARC's)."""
    cs = cs_mm if cs_mm is not None else default_cs_mm
    ac = amplitude_contrast if amplitude_contrast is not None else default_amplitude_contrast
    missing = [{"what": what, "query": query, "setting": setting}
               for value, what, query, setting in (
                   (cs, "spherical aberration (mm)", "cs_mm", "MRC_INGEST_CS_MM"),
                   (ac, "amplitude contrast (0 to 1)", "amplitude_contrast",
                    "MRC_INGEST_AMPLITUDE_CONTRAST"))
               if value is None]
    if missing:
        raise Unprocessable({
            "message": "the STAR file needs "
                       + " and ".join(f"the {m['what']}" for m in missing)
                       + ": give " + ", ".join(f"?{m['query']}=" for m in missing)
                       + " or set " + ", ".join(m["setting"] for m in missing)
                       + "; it is never guessed",
            "missing": missing})
    return Optics(float(cs), float(ac))


@dataclass(frozen=True)
class OpticsGroup:
    number: int
    pixel_size: float
    voltage_kv: float
    nx: int | None
    ny: int | None
    mode: int | None

    @property
    def name(self) -> str:
        return f"opticsGroup{self.number}"


@dataclass
class StarPlan:
    """What the first pass found: the optics groups (by key, in order of first
    appearance), how many ready movies go in, what is left out and why."""

    groups: dict[tuple, OpticsGroup] = field(default_factory=dict)
    movies: Counter = field(default_factory=Counter)        # group number -> movies
    left_out: Counter = field(default_factory=Counter)      # status -> movies
    incomplete: list[Row] = field(default_factory=list)     # the first few
    incomplete_count: int = 0

    @property
    def ready(self) -> int:
        return sum(self.movies.values())


class MovieNames:
    """How ``rlnMicrographMovieName`` is made from a row; ``checked``: whether each name
    must be checked and quoted for STAR (a path holds a file's name, a download URL only
    the dataset's id)."""

    def __init__(self, make: Callable[[Row], str], checked: bool):
        self.make, self.checked = make, checked

    def __call__(self, row: Row) -> str:
        return self.make(row)

    def star(self, row: Row) -> str:
        """The name as a STAR value (of a movie :func:`plan_star` accepted)."""
        name = self.make(row)
        return star_value(name) if self.checked else name


def movie_url(template: str, marker: str) -> MovieNames:
    """``rlnMicrographMovieName`` as the download URL: ``template`` is the URL of one
    dataset whose id is ``marker``. Dataset ids are letters and digits, so a template
    that is a bare STAR value makes bare values."""
    head, _, tail = template.partition(marker)
    sample = f"{head}0{tail}"
    return MovieNames(lambda row: f"{head}{row['id']}{tail}",
                      checked=star_value(sample) != sample or not star_writable(sample))


def movie_path(prefix: str) -> MovieNames:
    """``rlnMicrographMovieName`` as a file RELION reads (rows of :data:`PATH_COLUMNS`):
    a registered movie's own path on shared storage; an upload's kept original under
    the mounted store, ``<prefix><key>`` (the prefix as given: end it with '/'); None for
    an upload kept only as its MRCZ archive."""
    if _control(prefix):
        raise Unprocessable({"message": "prefix holds a control character",
                             "where": "query.prefix"})

    def path(row: Row) -> str | None:
        if row["source"] == "registration" and row["path"]:
            return row["path"]
        info = row["info"] if isinstance(row["info"], dict) else {}
        key = ((info.get("storage") or {}).get("keys") or {}).get("original")
        return f"{prefix}{key}" if key else None
    return MovieNames(path, checked=True)


def plan_star(rows: Iterable[Row], movie_name: MovieNames, *,
              skip_incomplete: bool = False) -> StarPlan:
    """The first pass over a session's rows (:data:`STAR_COLUMNS`). Raises
    :class:`Unprocessable` for ready movies that cannot be written, unless
    ``skip_incomplete``."""
    plan = StarPlan()
    for row in rows:
        if row["status"] != "ready":
            plan.left_out[row["status"]] += 1
            continue
        problems = _problems(row, movie_name)
        if problems:
            plan.incomplete_count += 1
            if len(plan.incomplete) < NAMED_IN_REFUSAL:
                plan.incomplete.append({"dataset_id": row["id"], "name": _text(row["name"]),
                                        "missing": problems})
            continue
        key = _optics_key(row)
        group = plan.groups.get(key)
        if group is None:
            group = plan.groups[key] = OpticsGroup(len(plan.groups) + 1, *key)
        plan.movies[group.number] += 1
    if plan.incomplete_count and not skip_incomplete:
        raise Unprocessable({
            "message": f"{plan.incomplete_count} ready movie(s) cannot be written to a "
                       "movies STAR file (an optics group needs a pixel size and a "
                       "voltage; a path under ?prefix= must be one STAR value: no control "
                       "character, not both quote characters); fix them or send "
                       "?skip_incomplete=true to leave them out",
            "count": plan.incomplete_count, "movies": plan.incomplete})
    return plan


def star_text(plan: StarPlan, optics: Optics, rows: Iterable[Row],
              movie_name: MovieNames, session: Row) -> Iterator[str]:
    """The movies STAR file in chunks: the header and ``data_optics`` from ``plan``, then
    ``data_movies`` from the second pass over ``rows``."""
    head = [f"# mrc-ingest: movies of session {_comment(session['name'])} "
            f"(id {session['id']}, project {_comment(session['project'])})",
            f"# {plan.ready} movie(s): only ready movies are listed; left out: "
            + _left_out(plan)]
    for group in plan.groups.values():
        head.append(f"# {group.name}: {group.pixel_size!r} Å/pixel, {group.voltage_kv!r} "
                    f"kV, {group.nx} x {group.ny} pixels, MRC mode {group.mode}, "
                    f"{plan.movies[group.number]} movie(s)")
    head += ["", STAR_VERSION, "", "data_optics", "", "loop_ "]
    head += [f"_{label} #{i} " for i, label in enumerate(OPTICS_LABELS, 1)]
    cs, ac = repr(optics.cs_mm), repr(optics.amplitude_contrast)
    head += [f"{g.name} {g.number} {g.pixel_size!r} {g.voltage_kv!r} {cs} {ac}"
             for g in plan.groups.values()]
    head += ["", "", STAR_VERSION, "", "data_movies", "", "loop_ "]
    head += [f"_{label} #{i} " for i, label in enumerate(MOVIE_LABELS, 1)]
    yield "\n".join(head) + "\n"

    buffer: list[str] = []
    size = 0
    for row in rows:
        if row["status"] != "ready" or _problems(row, movie_name):
            continue
        group = plan.groups.get(_optics_key(row))
        if group is None:  # ready since the first pass, in a group it did not see
            continue
        line = f"{movie_name.star(row)} {group.number}\n"
        buffer.append(line)
        size += len(line)
        if size >= CHUNK_CHARS:
            yield "".join(buffer)
            buffer, size = [], 0
    buffer.append("\n")
    yield "".join(buffer)


def movies_star(rows: Callable[[], Iterable[Row]], optics: Optics, movie_name: MovieNames,
                session: Row, *, skip_incomplete: bool = False) -> Iterator[str]:
    """Both passes: runs the first now (so a refusal is raised here, before anything is
    sent) and returns the text of the second as an iterator. ``rows()`` reads the
    session's rows afresh (:data:`STAR_COLUMNS`)."""
    plan = plan_star(rows(), movie_name, skip_incomplete=skip_incomplete)
    if not plan.ready:
        raise Conflict({"message": "the session has no ready movie to list"
                                   + (" that can be written" if plan.incomplete_count else
                                      " yet"), "left_out": dict(plan.left_out),
                        "incomplete": plan.incomplete_count})
    return star_text(plan, optics, rows(), movie_name, session)


def movies_csv(rows: Iterable[Row], session: Row) -> Iterator[str]:
    """The CSV of :data:`CSV_FIELDS` in chunks: the header, then one line per row
    (:data:`CSV_DATASET_COLUMNS`)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_FIELDS)
    name = session["name"]
    for row in rows:
        writer.writerow([name if f == "session_name" else row[f] for f in CSV_FIELDS])
        if out.tell() >= CHUNK_CHARS:
            yield out.getvalue()
            out.seek(0)
            out.truncate()
    yield out.getvalue()


def utf8(chunks: Iterable[str]) -> Iterator[bytes]:
    """Text chunks as UTF-8; lone surrogates (undecodable bytes of a file name on disk)
    become U+FFFD."""
    for chunk in chunks:
        try:
            yield chunk.encode("utf-8")
        except UnicodeEncodeError:
            yield _text(chunk).encode("utf-8")


# -- STAR values --------------------------------------------------------------------------

_RESERVED = ("data_", "loop_", "save_", "global_", "stop_")
_SPECIAL_FIRST = frozenset("_#$'\";[]")
#: control characters (Unicode Cc) and the line and paragraph separators
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: what makes a bare value ambiguous: blanks, and '#' (a comment to many readers)
_NEEDS_QUOTES = re.compile(r"[\s#]")
#: the common case, checked first: a path or URL of plain characters is a bare value
_PLAIN = re.compile(r"[A-Za-z0-9/.][A-Za-z0-9/._+:@=,%~-]*")


def star_value(text: str) -> str:
    """``text`` as one STAR value: bare when it can be, else in the quote character it
    does not hold. Only for text :func:`star_writable` accepts."""
    if _PLAIN.fullmatch(text) and not text.lower().startswith(_RESERVED):
        return text
    if text and not _NEEDS_QUOTES.search(text) and text[0] not in _SPECIAL_FIRST \
            and not text.lower().startswith(_RESERVED):
        return text
    quote = '"' if '"' not in text else "'"
    return f"{quote}{text}{quote}"


def star_writable(text: str) -> bool:
    """Whether STAR can hold ``text`` as one value: no control or line-separator
    character, valid Unicode, not both quote characters when it needs quoting."""
    if _PLAIN.fullmatch(text):
        return True
    if _control(text) or _has_surrogate(text):
        return False
    return star_value(text) == text or not ('"' in text and "'" in text)


def _problems(row: Row, movie_name: MovieNames) -> list[str]:
    problems = [column for column in ("pixel_size", "voltage_kv")
                if not _positive(row[column])]
    name = movie_name(row)
    if name is None:
        problems.append("a file RELION reads under the prefix (kept only as an MRCZ "
                        "archive: MRC_INGEST_KEEP_ORIGINAL=true keeps the original; or "
                        "list download URLs)")
    elif movie_name.checked and not star_writable(name):
        problems.append("a name STAR can hold")
    return problems


def _positive(value: Any) -> bool:
    """A positive finite number (NaN compares false)."""
    return type(value) in (float, int) and 0 < value < math.inf


def _control(text: str) -> bool:
    return _CONTROL.search(text) is not None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _text(text: str) -> str:
    """``text`` with lone surrogates as U+FFFD (valid Unicode)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _comment(text: str) -> str:
    """A label on one comment line: quoted, control characters as spaces."""
    return "'" + "".join(" " if unicodedata.category(c).startswith("C") else c
                         for c in _text(text)) + "'"


def _left_out(plan: StarPlan) -> str:
    parts = [f"{plan.left_out[s]} {s}" for s in ("rejected", "failed")
             if plan.left_out[s]]
    in_flight = sum(plan.left_out[s] for s in IN_FLIGHT)
    if in_flight:
        parts.append(f"{in_flight} in flight (receiving, queued or processing)")
    if plan.incomplete_count:
        parts.append(f"{plan.incomplete_count} ready without a pixel size, a voltage or "
                     "a name STAR can hold (skip_incomplete)")
    return ", ".join(parts) or "none"
