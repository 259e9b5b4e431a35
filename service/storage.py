"""Where files live under the data folder, and which shared-storage paths may be registered.

Layout (all under ``data_dir``)::

    incoming/<token>.part          uploads while they stream (removed on any failure)
    datasets/<id>/<filename>       the file exactly as uploaded (its SHA-256 is recorded)
    datasets/<id>/archive.mrc[z]   the archive copy (normalized; MRCZ unless configured off)
    datasets/<id>/sum.npy          frame sum at preview resolution
    conversions/<id>/<key>.mrc[z]  converted downloads, a cache bounded in bytes
    particle_sets/<id>/            a cryoSPARC .cs index and its exported stacks

Every file appears by rename from a temporary name after fsync; a ``.part`` file left by a
crash is removed at start-up.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from .errors import NotFound, PathNotAllowed, Unprocessable
from .mrc import Target

PART_SUFFIX = ".part"
HASH_BLOCK = 4 << 20


class Storage:
    def __init__(self, data_dir: Path):
        self.root = Path(data_dir).resolve()
        self.incoming = self.root / "incoming"
        self.datasets = self.root / "datasets"
        self.conversions = self.root / "conversions"
        self.particle_sets = self.root / "particle_sets"

    def prepare(self) -> list[Path]:
        """Create the folders and remove temporary files a crash left; returns those."""
        for folder in (self.incoming, self.datasets, self.conversions, self.particle_sets):
            folder.mkdir(parents=True, exist_ok=True)
        stale = [p for pattern in (f"*{PART_SUFFIX}", f"*/.*{PART_SUFFIX}")
                 for folder in (self.incoming, self.datasets, self.conversions,
                                self.particle_sets)
                 for p in folder.glob(pattern)]
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def dataset_dir(self, dataset_id: str) -> Path:
        return self.datasets / dataset_id

    def archive_path(self, dataset_id: str, mrcz: bool) -> Path:
        return self.dataset_dir(dataset_id) / ("archive.mrcz" if mrcz else "archive.mrc")

    def sum_path(self, dataset_id: str) -> Path:
        return self.dataset_dir(dataset_id) / "sum.npy"

    def conversion_path(self, dataset_id: str, target: Target) -> Path:
        mode = "auto" if target.mode is None else str(target.mode)
        endian = "le" if target.byte_order == "<" else "be"
        if target.is_mrcz:
            name = f"mode{mode}-{target.codec.cname}{target.clevel}-{endian}.mrcz"
        else:
            name = f"mode{mode}-{endian}.mrc"
        return self.conversions / dataset_id / name

    def remove_dataset(self, dataset_id: str) -> None:
        for folder in (self.dataset_dir(dataset_id), self.conversions / dataset_id):
            shutil.rmtree(folder, ignore_errors=True)

    def evict_conversions(self, limit_bytes: int, keep: Path | None = None) -> list[Path]:
        """Delete least recently used conversions until the cache fits ``limit_bytes``
        (``keep``, the one about to be served, stays). Serving touches a file's mtime."""
        files = sorted(((p.stat().st_mtime, p.stat().st_size, p)
                        for p in self.conversions.glob("*/*.mrc*")), key=lambda t: t[0])
        total = sum(size for _, size, _ in files)
        removed = []
        for _, size, path in files:
            if total <= limit_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            removed.append(path)
        return removed

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free


def resolve_inside_roots(path: str, allowed_roots: list[Path]) -> Path:
    """The real path of ``path`` if it exists inside an allowed root once every symlink
    and ``..`` is resolved (a link inside a root pointing outside it is refused)."""
    if not allowed_roots:
        raise PathNotAllowed("no allowed roots are configured (set MRC_INGEST_ALLOWED_ROOTS)")
    candidate = Path(path)
    if not candidate.is_absolute():
        raise Unprocessable(f"path must be absolute, got {path!r}")
    try:
        real = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise NotFound(f"no such file or folder: {path!r}") from None
    except (OSError, RuntimeError) as exc:
        raise Unprocessable(f"cannot resolve {path!r}: {exc}") from None
    roots = [Path(root).resolve() for root in allowed_roots]
    if not any(real.is_relative_to(root) for root in roots):
        raise PathNotAllowed(f"{path!r} (resolved to {str(real)!r}) is outside the allowed "
                             f"roots {[str(r) for r in roots]}")
    return real


def resolve_registration(path: str, allowed_roots: list[Path],
                         allow_hard_links: bool = False) -> Path:
    """A file to register, inside the allowed roots (:func:`resolve_inside_roots`). A file
    with several hard links is refused unless allowed: another name of the same data may
    lie outside the roots, and no path tells which came first."""
    real = resolve_inside_roots(path, allowed_roots)
    if not real.is_file():
        raise Unprocessable(f"{path!r} is not a regular file")
    links = real.stat().st_nlink
    if links > 1 and not allow_hard_links:
        raise PathNotAllowed(f"{path!r} has {links} hard links; another of them may lie "
                             "outside the allowed roots (set MRC_INGEST_ALLOW_HARD_LINKS if "
                             "your storage uses hard links on purpose)")
    if not os.access(real, os.R_OK):
        raise PathNotAllowed(f"{path!r} is not readable by the service")
    return real


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(HASH_BLOCK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()
