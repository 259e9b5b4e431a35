"""Files on shared storage, opened inside the allowed roots (``ARCHITECTURE.md``, "Shared
storage").

Shared storage is written by many users and read with the service's own rights, so a
name inside a root proves nothing: a symlink or a hard link can make it any file the
service may read (``/proc/self/environ`` holds the database password and the store's
keys). Every file the service reads there -- a registered movie, its ``.mdoc`` and
``_info.txt``, a particle stack -- is opened here and nowhere else:

1. the path is resolved once and must lie inside a root (a link inside a root that
   points inside it is fine; one that points out is refused);
2. the resolved path is then walked from the root's own directory descriptor, one
   component at a time with ``O_NOFOLLOW``, so a folder swapped for a symlink between
   the check and the open is refused rather than followed;
3. what was opened must be a regular file (not a FIFO, device, socket, or a file of
   ``/proc``) with one link (another name of the same inode may lie outside the roots),
   unless hard links are allowed by the operator (movies only; never sidecars);
4. a registered file's :class:`Identity` is recorded and compared at every later open:
   a changed file is a :class:`~service.errors.Conflict` that says what changed.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import (Conflict, NotFound, NotRegularFile, PathNotAllowed, RefusedFile,
                     Unprocessable)
from .mrc.findings import Finding, warning
from .mrc.source import FileSource

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@dataclass(frozen=True)
class Identity:
    """What makes an opened file the same file later: device, inode, size and
    modification time (nanoseconds)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "Identity":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def changes_from(self, recorded: dict[str, int]) -> dict[str, tuple[int, int]]:
        """The recorded facts that differ now, as {fact: (recorded, now)}. Only the facts
        that were recorded are compared (older catalogs kept size and mtime only)."""
        now = self.to_dict()
        return {k: (v, now[k]) for k, v in recorded.items() if k in now and now[k] != v}


@dataclass
class SharedFile:
    """An open regular file inside a root: its descriptor, resolved path and identity."""

    fd: int
    path: Path
    identity: Identity

    def source(self) -> FileSource:
        """A :class:`FileSource` that owns the descriptor from now on."""
        fd, self.fd = self.fd, -1
        return FileSource.from_fd(fd, self.path)

    def read_limited(self, limit: int) -> bytes:
        """The whole file if it holds at most ``limit`` bytes; RefusedFile otherwise (the
        size is read from what was opened, then checked again by reading one more)."""
        if self.identity.size > limit:
            raise RefusedFile(f"it holds {self.identity.size} bytes, more than the "
                              f"{limit} a sidecar may")
        data = os.pread(self.fd, limit + 1, 0)
        if len(data) > limit:
            raise RefusedFile(f"it grew past the {limit} bytes a sidecar may while read")
        return data

    def require_unchanged(self, recorded: dict[str, int] | None, what: str,
                          since: str = "it was registered",
                          again: str = "register it again") -> None:
        """Conflict (and the file closed) when its identity is not the ``recorded`` one:
        "<what> changed after <since> (<fact a -> b>, ...); <again>"."""
        changed = self.identity.changes_from(recorded or {})
        if changed:
            self.close()
            said = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            raise Conflict(f"{what} changed after {since} ({said}); {again}")

    def blocks(self, block: int = 8 << 20) -> Iterator[bytes]:
        offset = 0
        while piece := os.pread(self.fd, block, offset):
            offset += len(piece)
            yield piece

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "SharedFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Roots:
    """The allowed roots of shared storage, and the only way the service opens a file
    there."""

    def __init__(self, roots: list[Path], allow_hard_links: bool = False):
        self.roots = [Path(root).resolve() for root in roots]
        self.allow_hard_links = allow_hard_links
        self._proc_dev = _device_of("/proc")

    # -- locating --------------------------------------------------------------------

    def resolve(self, path: str | os.PathLike) -> Path:
        """The real path of ``path`` if it lies inside a root once every symlink and
        ``..`` is resolved. Errors are the API's (404 missing, 403 outside, 422 not
        absolute)."""
        if not self.roots:
            raise PathNotAllowed("no allowed roots are configured (set MRC_INGEST_ALLOWED_ROOTS)")
        candidate = Path(path)
        if not candidate.is_absolute():
            raise Unprocessable(f"path must be absolute, got {str(path)!r}")
        if "\x00" in str(path):
            raise Unprocessable(f"path {str(path)!r} holds a NUL byte; no file has one")
        try:
            str(path).encode("utf-8")
        except UnicodeEncodeError:
            raise Unprocessable(f"path {str(path)!r} is not valid UTF-8; the catalog keeps "
                                "names as UTF-8 (rename the file)") from None
        try:
            real = candidate.resolve(strict=True)
        except FileNotFoundError:
            raise NotFound(f"no such file or folder: {str(path)!r}") from None
        except (OSError, RuntimeError, ValueError) as exc:
            raise Unprocessable(f"cannot resolve {str(path)!r}: {exc}") from None
        try:
            str(real).encode("utf-8")
        except UnicodeEncodeError:
            raise Unprocessable(f"path {str(path)!r} resolves to a name that is not valid "
                                "UTF-8; the catalog keeps names as UTF-8") from None
        if self._root_of(real) is None:
            raise PathNotAllowed(f"{str(path)!r} (resolved to {str(real)!r}) is outside the "
                                 f"allowed roots {[str(r) for r in self.roots]}")
        return real

    def _root_of(self, real: Path) -> Path | None:
        inside = [root for root in self.roots if real.is_relative_to(root)]
        return max(inside, key=lambda r: len(r.parts)) if inside else None

    # -- opening -----------------------------------------------------------------------

    def session_folder(self, real: Path) -> str | None:
        """The folder right under the root that holds ``real`` (EPU and SerialEM write
        one folder per session), or None for a file at the root itself."""
        root = self._root_of(real)
        if root is None:
            return None
        parts = real.relative_to(root).parts
        return parts[0] if len(parts) > 1 else None

    def open_file(self, real: Path, *, hard_links: bool | None = None) -> SharedFile:
        """Open ``real`` (a resolved path inside a root) by walking it from its root with
        ``O_NOFOLLOW`` on every component; RefusedFile says why it cannot be read.
        ``hard_links`` overrides the operator's setting (sidecars never allow them)."""
        allow_links = self.allow_hard_links if hard_links is None else hard_links
        root = self._root_of(real)
        if root is None:
            raise RefusedFile(f"{str(real)!r} is outside the allowed roots")
        parts = real.relative_to(root).parts
        if not parts:
            raise NotRegularFile(f"{str(real)!r} is not a regular file (a folder)")
        folder = self._walk(root, parts[:-1])
        try:
            try:
                fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=folder)
            except FileNotFoundError:
                raise
            except OSError as exc:
                raise RefusedFile(f"{str(real)!r} cannot be opened as a plain file "
                                  f"({_reason(exc, parts[-1], folder)})") from None
        finally:
            os.close(folder)
        try:
            st = os.fstat(fd)
            _check_regular(real, st, allow_links, self._proc_dev,
                           operator_may_allow=hard_links is None)
            # Reads of a regular file never block; clear O_NONBLOCK all the same.
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return SharedFile(fd, real, Identity.of(st))

    def _walk(self, root: Path, folders: tuple[str, ...]) -> int:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in folders:
                try:
                    nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    raise
                except OSError as exc:
                    raise RefusedFile(f"the folder {name!r} on the way to the file is not a "
                                      f"plain folder ({_reason(exc, name, fd)})") from None
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_registered(self, path: str, recorded: dict[str, int] | None,
                        what: str = "the registered file") -> SharedFile:
        """A registered file, opened again for reading: the same checks as when it was
        registered, and its identity must still be the recorded one (409 otherwise)."""
        try:
            opened = self.open_file(Path(path))
        except FileNotFoundError:
            raise Conflict(f"{what} {path!r} is gone") from None
        except RefusedFile as exc:
            raise Conflict(f"{what} {path!r} can no longer be read safely: {exc}") from None
        opened.require_unchanged(recorded, f"{what} {path!r}")
        return opened

    def open_registration(self, path: str) -> SharedFile:
        """A movie to register: resolved inside the roots and opened safely; errors are
        the API's (404, 403 with the reason, 422)."""
        real = self.resolve(path)
        try:
            opened = self.open_file(real)
        except FileNotFoundError:
            raise NotFound(f"no such file: {path!r}") from None
        except NotRegularFile as exc:
            raise Unprocessable(str(exc)) from None
        except RefusedFile as exc:
            raise PathNotAllowed(str(exc)) from None
        if not os.access(real, os.R_OK):
            opened.close()
            raise PathNotAllowed(f"{path!r} is not readable by the service")
        return opened

    def read_beside(self, movie: Path, names: list[str], limit: int
                    ) -> tuple[list[tuple[str, bytes]], list[Finding]]:
        """The files ``names`` in the folder of ``movie`` (resolved, inside a root) that
        exist: (name, bytes) of those read, and a finding for each one refused (a link,
        several hard links, not a regular file, too big). A refused file's content is
        never read."""
        found: list[tuple[str, bytes]] = []
        findings: list[Finding] = []
        for name in dict.fromkeys(names):
            try:
                with self.open_file(movie.with_name(name), hard_links=False) as opened:
                    found.append((name, opened.read_limited(limit)))
            except FileNotFoundError:
                continue
            except RefusedFile as exc:
                findings.append(warning(f"sidecar:{name}", f"not read: {exc}"))
        return found, findings


def _check_regular(real: Path, st: os.stat_result, allow_links: bool,
                   proc_dev: int | None, operator_may_allow: bool) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(f"{str(real)!r} is not a regular file "
                          f"({_kind(st.st_mode)})")
    if proc_dev is not None and st.st_dev == proc_dev:
        raise RefusedFile(f"{str(real)!r} is a file of /proc")
    if st.st_nlink > 1 and not allow_links:
        hint = (" (set MRC_INGEST_ALLOW_HARD_LINKS if your storage uses hard links on "
                "purpose)") if operator_may_allow else ""
        raise RefusedFile(f"{str(real)!r} has {st.st_nlink} hard links; another of them may "
                          f"lie outside the allowed roots{hint}")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a plain file"


def _reason(exc: OSError, name: str, dir_fd: int) -> str:
    """Why ``name`` (in the folder ``dir_fd``) could not be opened, in a user's words."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        mode = None
    if exc.errno == errno.ELOOP or (mode is not None and stat.S_ISLNK(mode)):
        return "it is a symlink"
    if exc.errno == errno.ENOTDIR:
        return f"it is {_kind(mode)}" if mode is not None else "not a folder"
    if exc.errno == errno.ENXIO:
        return "a socket or device with nothing behind it"
    return exc.strerror or str(exc)


def _device_of(path: str) -> int | None:
    try:
        return os.stat(path).st_dev
    except OSError:
        return None
