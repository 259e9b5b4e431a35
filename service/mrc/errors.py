"""Typed errors of the format core. The web layer maps each to one HTTP status, once."""

from __future__ import annotations

from typing import Any

from .findings import Finding, Severity


class MrcError(Exception):
    """Base class for everything the format core raises on purpose."""


class FormatError(MrcError):
    """The file is not a readable MRC/MRCZ file; ``findings`` says why and where.
    ``header`` is the parsed header record when the failure came after parsing it."""

    def __init__(self, findings: list[Finding], header: Any = None):
        self.findings = findings
        self.header = header
        errors = [f for f in findings if f.severity is Severity.ERROR] or findings
        super().__init__("; ".join(f"{f.field}: {f.message}" for f in errors))


class ConversionError(MrcError):
    """A requested conversion is impossible or would lose information."""


class LossyConversionError(ConversionError):
    """The data holds values the target mode cannot represent exactly."""

    def __init__(self, message: str, lossless_targets: list[int]):
        self.lossless_targets = lossless_targets
        super().__init__(f"{message}; lossless target modes for this file: {lossless_targets}")
