"""Where a movie belongs: its session and the session's project (DESIGN.md §13).

Every arrival path names them the same way (``?session=&project=`` on PUT, multipart
and conversions; ``session``/``project`` in tus ``Upload-Metadata``; ``"session"``,
``"project"`` in a registration's JSON) or leaves them to the defaults: project
``default`` (or the token's only project), session ``<source>-<UTC date>``, and for a
registered file the folder under its root (EPU and SerialEM write one folder per
session). A token limited to projects places movies in those only; any other project
is answered as one that does not exist (404).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .auth import DEFAULT_PROJECT, Scope
from .catalog import Catalog
from .errors import NotFound, Unprocessable

SESSION_NAME_MAX = 200
PROJECT_NAME_MAX = 100


def check_label(value: str, what: str, longest: int) -> str:
    """A session or project name as given (surrounding blanks dropped): 1 to ``longest``
    characters, none of them a control character."""
    text = value.strip()
    if not text or len(text) > longest:
        raise Unprocessable({"message": f"{what} name must be 1 to {longest} characters",
                          "where": what, "got": value[:longest + 20]})
    for index, char in enumerate(text):
        if unicodedata.category(char).startswith("C"):
            raise Unprocessable({"message": f"{what} name holds a control character "
                                         f"(U+{ord(char):04X}) at {index}",
                              "where": what})
    return text


@dataclass(frozen=True)
class Placement:
    """What a request said of where its movie goes (None: not said)."""

    session: str | None = None
    project: str | None = None

    @classmethod
    def given(cls, session: str | None, project: str | None) -> "Placement":
        return cls(None if session is None else check_label(session, "session",
                                                             SESSION_NAME_MAX),
                   None if project is None else check_label(project, "project",
                                                             PROJECT_NAME_MAX))

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> "Placement":
        """From tus ``Upload-Metadata`` (keys ``session`` and ``project``)."""
        return cls.given(metadata.get("session"), metadata.get("project"))

    def with_default_session(self, name: str | None) -> "Placement":
        """This placement, or its session ``name`` when none was said (a folder's name
        that cannot be a session's, too long or with a control character, is not
        used: the default applies)."""
        if self.session is not None or not name:
            return self
        try:
            return Placement(check_label(name, "session", SESSION_NAME_MAX), self.project)
        except Unprocessable:
            return self


def default_session_name(source: str, moment: datetime | None = None) -> str:
    """``<source>-<UTC date>``: the session of a movie sent without one."""
    moment = moment or datetime.now(timezone.utc)
    return f"{source}-{moment.astimezone(timezone.utc).date().isoformat()}"


def project_for(placement: Placement, scope: Scope) -> str:
    """The project a write goes to: the one named (which the caller's token must reach:
    else 404, as for a project that does not exist), else the token's only project,
    else ``default``."""
    if placement.project is not None:
        if not scope.sees(placement.project):
            raise NotFound(f"no project {placement.project!r}")
        return placement.project
    if scope.projects is None:
        return DEFAULT_PROJECT
    if len(scope.projects) == 1:
        return next(iter(scope.projects))
    raise Unprocessable({"message": "this token writes to several projects; say which with "
                                 "?project= (tus: Upload-Metadata key 'project')",
                      "where": "project", "projects": sorted(scope.projects)})


def place(catalog: Catalog, placement: Placement, scope: Scope,
          source: str) -> dict[str, str]:
    """The dataset columns that place a movie (``session_id``, ``project``), making its
    session on first use."""
    project = project_for(placement, scope)
    name = placement.session or default_session_name(source)
    session = catalog.session_for(project, name, source)
    return {"session_id": session["id"], "project": project}
