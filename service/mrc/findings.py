"""Findings: what a check found, as data (severity, field, message).

The validator returns a list of these; the CLI prints them, the API returns them and
the tests compare them. Nothing here prints or raises for a bad file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum


class Severity(str, Enum):
    """``error``: the file cannot be read as declared. ``warning``: readable, but not
    what the spec or a common reader expects. ``info``: a fact worth recording (an
    interpretation we chose, a non-standard but known convention)."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True)
class Finding:
    severity: Severity
    field: str
    message: str

    def to_dict(self) -> dict[str, str]:
        d = asdict(self)
        d["severity"] = self.severity.value
        return d


def error(field: str, message: str) -> Finding:
    return Finding(Severity.ERROR, field, message)


def warning(field: str, message: str) -> Finding:
    return Finding(Severity.WARNING, field, message)


def info(field: str, message: str) -> Finding:
    return Finding(Severity.INFO, field, message)


def has_errors(findings: list[Finding]) -> bool:
    return any(f.severity is Severity.ERROR for f in findings)
