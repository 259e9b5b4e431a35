"""The datastore in a local folder (the embedded default).

An object is a file under the root named by its key. A writer streams into a temporary
``.<name>.<random>.part`` beside its final name, holds an exclusive ``flock`` on it for
its whole life, and commits by fsync + rename + fsync of the folder, so a reader never
sees a partial object. Because live writers hold their lock, a sweep can tell provably
abandoned temporaries (a crashed process's: the kernel released its lock) from the
in-flight files of other processes sharing the folder, and removes only the former.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from ..mrc.checksum import crc32
from ..mrc.sink import PART_SUFFIX, AtomicFile, fsync_directory
from ..mrc.source import ByteSource, FileSource
from .base import (DataStore, ObjectCorrupt, ObjectInfo, ObjectMissing, Receipt,
                   StoreUnavailable, check_key)


#: bytes mapped at a time when an object is read back (a multiple of the page size)
_READ_BACK_WINDOW = 8 << 20


class LocalWriter(AtomicFile):
    """An :class:`AtomicFile` that knows its key."""

    def __init__(self, final: Path, key: str, reserve_head: int):
        super().__init__(final, reserve_head=reserve_head)
        self.key = key
        self.receipt: Receipt | None = None

    def commit(self, head: bytes | None = None, *, durable: bool = True) -> int:
        size = super().commit(head, durable=durable)
        self.receipt = Receipt(self.key, size, local_checksum(
            self._reserve, self.head_crc32 or 0, self.body_crc32))
        return size


def local_checksum(head_bytes: int, head_crc: int, body_crc: int) -> str:
    """A local object's checksum: CRC-32 of its first ``head_bytes`` and of the rest
    (a writer fills its reserved head last, so the two are taken apart)."""
    return f"crc32:{head_bytes}:{head_crc:08x}:{body_crc:08x}"


class LocalStore(DataStore):
    kind = "local"

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def describe(self) -> str:
        return f"local folder {self.root}"

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def open_writer(self, key: str, *, reserve_head: int = 0) -> LocalWriter:
        return LocalWriter(self.path(key), key, reserve_head)

    def read_range(self, key: str, offset: int, n: int) -> bytes:
        try:
            fd = os.open(self.path(key), os.O_RDONLY)
        except FileNotFoundError:
            raise ObjectMissing(key) from None
        try:
            return os.pread(fd, n, offset)
        finally:
            os.close(fd)

    def source(self, key: str) -> ByteSource:
        try:
            return FileSource(self.path(key))
        except FileNotFoundError:
            raise ObjectMissing(key) from None

    def size(self, key: str) -> int | None:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        path = self.path(key)
        path.unlink(missing_ok=True)
        self._remove_empty_parents(path)

    def _remove_empty_parents(self, path: Path) -> None:
        """Drop folders a deletion emptied, up to the root (datasets/<id>/ and such)."""
        parent = path.parent
        while parent != self.root and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self.root / prefix.rstrip("/") if prefix else self.root
        if base.is_file():
            st = base.stat()
            yield ObjectInfo(prefix, st.st_size, st.st_mtime)
            return
        for folder, dirs, files in os.walk(base):
            dirs.sort()
            for name in sorted(files):
                if name.startswith("."):
                    continue  # temporaries of writers
                full = Path(folder) / name
                try:
                    st = full.stat()
                except FileNotFoundError:
                    continue
                yield ObjectInfo(full.relative_to(self.root).as_posix(), st.st_size,
                                 st.st_mtime)

    def delete_prefix(self, prefix: str) -> int:
        count = super().delete_prefix(prefix)
        folder = self.root / prefix.rstrip("/")
        shutil.rmtree(folder, ignore_errors=True)  # temporaries too
        self._remove_empty_parents(folder)
        return count

    def put_file(self, key: str, path: Path) -> int:
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.replace(path, final)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            writer = self.open_writer(key)
            with open(path, "rb") as f:
                while block := f.read(8 << 20):
                    writer.write(block)
            writer.commit()
            path.unlink()
        fsync_directory(final.parent)
        return final.stat().st_size

    def local_path(self, key: str) -> Path | None:
        return self.path(key)

    def read_back(self, receipt: Receipt) -> None:
        """Read the file again (mapped: the checksum reads the page cache in place, no
        copy) and compare its size and CRC-32s with the receipt's."""
        _, head_text, _, _ = receipt.checksum.split(":")
        head_bytes = int(head_text)
        try:
            fd = os.open(self.path(receipt.key), os.O_RDONLY)
        except FileNotFoundError:
            raise ObjectMissing(receipt.key) from None
        try:
            size = os.fstat(fd).st_size
            head_crc = body_crc = 0
            # a window at a time: a whole-file mapping counts in the server's RSS (a
            # 1 GiB movie's archive added 0.5 GiB to its peak)
            for start in range(0, size, _READ_BACK_WINDOW):
                length = min(_READ_BACK_WINDOW, size - start)
                with mmap.mmap(fd, length, prot=mmap.PROT_READ, offset=start) as mapped:
                    if hasattr(mapped, "madvise"):  # one large read-ahead, not 128 KiB ones
                        mapped.madvise(mmap.MADV_WILLNEED)
                    view = memoryview(mapped)
                    try:
                        head = max(0, min(head_bytes, start + length) - start)
                        if head:
                            head_crc = crc32(view[:head], head_crc)
                        body_crc = crc32(view[head:], body_crc)
                    finally:
                        view.release()
        finally:
            os.close(fd)
        found = local_checksum(head_bytes, head_crc, body_crc)
        if size != receipt.size or found != receipt.checksum:
            raise ObjectCorrupt(f"{receipt.key}: {size} bytes ({found}) read back, "
                                f"{receipt.size} ({receipt.checksum}) written")

    def copy_file(self, key: str, path: Path) -> int:
        """A hard link where the data folder allows it (the same file system): no byte is
        copied, and ``path`` may be removed later without touching the object."""
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        temp = final.with_name(f".{final.name}.link{PART_SUFFIX}")
        temp.unlink(missing_ok=True)
        try:
            os.link(path, temp)
        except OSError:
            return super().copy_file(key, path)
        os.replace(temp, final)
        fsync_directory(final.parent)
        return final.stat().st_size

    def move(self, source: str, target: str) -> int:
        src, dst = self.path(source), self.path(target)
        if not src.is_file():
            raise ObjectMissing(source)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        fsync_directory(dst.parent)
        return dst.stat().st_size

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreUnavailable(f"the data folder {self.root} is not writable")


def sweep_abandoned(folder: Path, min_age: float = 60.0) -> list[Path]:
    """Remove ``*.part`` temporaries under ``folder`` whose writer is gone (their flock
    can be taken); in-flight files of live processes are left alone. Files younger than
    ``min_age`` seconds are skipped too: a writer creates its file an instant before it
    locks it."""
    removed = []
    if not folder.exists():
        return removed
    now = time.time()
    for path in folder.rglob(f"*{PART_SUFFIX}"):
        try:
            if now - path.stat().st_mtime < min_age:
                continue
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer holds it
            path.unlink(missing_ok=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed
