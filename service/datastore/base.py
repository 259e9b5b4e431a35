"""The datastore: where everything the service keeps lives, behind one small interface
with two implementations (a local folder, an S3-compatible object store).

Keys are relative, ``/``-separated names (``datasets/<id>/archive.mrcz``); the catalog
stores keys, never paths, so the same catalog works whichever store holds the bytes.
Writes are streamed and atomic: an :class:`ObjectWriter` takes the bytes in order and
the object appears under its key only on :meth:`ObjectWriter.commit` (a rename after
fsync on disk, a completed multipart upload on S3); :meth:`ObjectWriter.abort` leaves
nothing behind. A writer may reserve the first bytes of the object and fill them at
commit: a file header that holds totals known only at the end (an MRC header's
statistics) is written without seeking back, which an object store cannot do.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from ..mrc.source import ByteSource

_KEY = re.compile(r"^(?!/)(?!.*//)(?!.*(^|/)\.\.?(/|$))[A-Za-z0-9._+\-/]{1,900}$")


class StoreError(Exception):
    """Base of the datastore's own errors."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (or refuses service) right now."""


class ObjectMissing(StoreError, KeyError):
    """No object under this key."""


def check_key(key: str) -> str:
    """A relative key of plain segments (no ``..``, no leading or doubled ``/``)."""
    if not _KEY.fullmatch(key):
        raise ValueError(f"invalid datastore key {key!r}")
    return key


class ObjectCorrupt(StoreError):
    """What the store holds under a key is not what was written there."""


@dataclass(frozen=True)
class Receipt:
    """What a writer wrote, for reading it back before anything that depends on it is
    committed (ARCHITECTURE.md, step "stored"): its key, size and CRC-32 checksum in the
    form the store can check (local: the head and the body separately; S3: the
    object's checksum as the store reports it, composite for a multipart upload)."""

    key: str
    size: int
    checksum: str


def crc32_text(crc: int) -> str:
    """A CRC-32 as S3 spells it: the four big-endian bytes in base64."""
    import base64

    return base64.b64encode(crc.to_bytes(4, "big")).decode()


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float  # seconds since the epoch


class ObjectWriter(Protocol):
    key: str
    written: int
    #: set by :meth:`commit`: what :meth:`DataStore.read_back` checks
    receipt: Receipt | None

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data`` (it may be reused by the caller once this returns)."""

    def commit(self, head: bytes | None = None, *, durable: bool = True) -> int:
        """Publish the object; ``head`` fills the reserved first bytes. Returns its size.
        ``durable=False``: it need not survive a power loss (an intermediate read once,
        then removed: a local store skips the fsyncs; S3 is as durable as it is)."""

    def abort(self) -> None:
        """Drop everything written; nothing appears under the key."""


class DataStore(ABC):
    """Streamed put, ranged read, delete and list (issue #9's interface)."""

    kind: str = "abstract"

    @abstractmethod
    def open_writer(self, key: str, *, reserve_head: int = 0) -> ObjectWriter: ...

    @abstractmethod
    def read_range(self, key: str, offset: int, n: int) -> bytes: ...

    @abstractmethod
    def source(self, key: str) -> ByteSource:
        """A :class:`ByteSource` over the object, for the format core's reader."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """The object's size, or None when there is none."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object if it exists."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...

    @abstractmethod
    def put_file(self, key: str, path: Path) -> int:
        """Store the finished local file ``path`` under ``key`` (it may be moved, not
        copied); returns the object's size."""

    @abstractmethod
    def ping(self) -> None:
        """Raise :class:`StoreUnavailable` when the store cannot be used."""

    @abstractmethod
    def read_back(self, receipt: Receipt) -> None:
        """Check that the object under ``receipt.key`` is what was written (size and
        checksum, from the store itself); :class:`ObjectCorrupt` or
        :class:`ObjectMissing` otherwise."""

    def copy_file(self, key: str, path: Path) -> int:
        """Store a copy of the local file ``path`` under ``key``; ``path`` stays."""
        writer = self.open_writer(key)
        try:
            with open(path, "rb") as f:
                while block := f.read(8 << 20):
                    writer.write(block)
        except BaseException:
            writer.abort()
            raise
        return writer.commit()

    def copy(self, source: str, target: str) -> int:
        """Store a copy of the object ``source`` under ``target`` (streamed; stores
        override with something cheaper); ``source`` stays. Returns its size."""
        size = self.size(source)
        if size is None:
            raise ObjectMissing(source)
        writer = self.open_writer(target)
        try:
            for offset in range(0, size, 8 << 20):
                writer.write(self.read_range(source, offset, min(8 << 20, size - offset)))
        except BaseException:
            writer.abort()
            raise
        return writer.commit()

    def sha256(self, key: str) -> str:
        """The SHA-256 of the object as the store gives it back (reads it whole)."""
        import hashlib

        size = self.size(key)
        if size is None:
            raise ObjectMissing(key)
        digest = hashlib.sha256()
        for offset in range(0, size, 8 << 20):
            digest.update(self.read_range(key, offset, min(8 << 20, size - offset)))
        return digest.hexdigest()

    def local_path(self, key: str) -> Path | None:
        """The object's path on local disk, for stores that have one (sendfile)."""
        return None

    def describe(self) -> str:
        return self.kind

    # -- conveniences built on the primitives -------------------------------------

    def put_bytes(self, key: str, data: bytes) -> int:
        return self.put(key, data).size

    def put(self, key: str, data: bytes) -> Receipt:
        """Store ``data`` under ``key``; the writer's receipt."""
        writer = self.open_writer(key)
        try:
            writer.write(data)
        except BaseException:
            writer.abort()
            raise
        writer.commit()
        assert writer.receipt is not None
        return writer.receipt

    def get_bytes(self, key: str) -> bytes:
        size = self.size(key)
        if size is None:
            raise ObjectMissing(key)
        return self.read_range(key, 0, size)

    def move(self, source: str, target: str) -> int:
        """Give the object ``source`` the key ``target`` (a copy, then delete; stores
        override with something cheaper). Returns its size."""
        size = self.copy(source, target)
        self.delete(source)
        return size

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix`` (a folder-like key ending in ``/``)."""
        keys = [info.key for info in self.list(prefix)]
        for key in keys:
            self.delete(key)
        return len(keys)

    def usage(self, prefix: str) -> int:
        return sum(info.size for info in self.list(prefix))

    def close(self) -> None:
        pass
