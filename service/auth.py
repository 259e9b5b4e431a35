"""API tokens with roles: ``read`` (dashboards: metadata, previews, downloads) <
``write`` (a microscope PC: uploads, registrations, conversions; and what read may do) <
``admin`` (deletion, the list of all jobs; and everything else).

Tokens are configured by their SHA-256 (``mrc-ingest token`` makes one), so the settings
never hold a usable secret; tokens are long random strings, for which an unsalted hash
is the usual choice (as for GitHub or PyPI tokens). With no token configured the API is
open, and ``mrc-ingest serve`` then binds to loopback only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from pydantic import BaseModel, Field, field_validator

from .errors import Forbidden, Unauthorized

TOKEN_PREFIX = "mrci_"


class Role(IntEnum):
    READ = 1
    WRITE = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


class TokenSpec(BaseModel):
    """One configured token: who it is, what it may do, the SHA-256 of the secret, and
    the projects it is limited to (none: every project)."""

    name: str = Field(min_length=1, max_length=100)
    role: Role
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    projects: list[str] | None = Field(default=None, min_length=1)

    @property
    def scope(self) -> "Scope":
        if self.role is Role.ADMIN or self.projects is None:
            return Scope.ALL
        return Scope(frozenset(self.projects))

    @field_validator("role", mode="before")
    @classmethod
    def _role_by_name(cls, value: object) -> object:
        if isinstance(value, str) and not value.isdigit():
            try:
                return Role[value.upper()]
            except KeyError:
                raise ValueError(f"role must be read, write or admin, got {value!r}") from None
        return value


@dataclass(frozen=True)
class Scope:
    """The projects a caller may see and write: ``projects`` None is every project (no
    token configured, a token without projects, admin). Anything outside is answered as
    if it did not exist (404), so a project's names never leak to another's token."""

    projects: frozenset[str] | None = None

    ALL: ClassVar["Scope"]

    @property
    def limited(self) -> bool:
        return self.projects is not None

    def sees(self, project: str | None) -> bool:
        return self.projects is None or (project or DEFAULT_PROJECT) in self.projects


Scope.ALL = Scope(None)
#: the project of whatever arrives without one
DEFAULT_PROJECT = "default"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class Authenticator:
    def __init__(self, tokens: list[TokenSpec]):
        self.tokens = list(tokens)

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    def check(self, authorization: str | None, needed: Role) -> TokenSpec | None:
        """The token's spec when ``authorization`` (the header) grants ``needed``;
        None when auth is off. Raises Unauthorized (401) or Forbidden (403)."""
        if not self.tokens:
            return None
        scheme, _, credential = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise Unauthorized("send 'Authorization: Bearer <token>'")
        digest = hash_token(credential.strip())
        match = None
        for spec in self.tokens:  # compare every entry: no timing hint of which matched
            if hmac.compare_digest(spec.sha256, digest):
                match = spec
        if match is None:
            raise Unauthorized("unknown token")
        if match.role < needed:
            raise Forbidden(f"token {match.name!r} has role {match.role.label}; this needs "
                            f"{needed.label}")
        return match
