"""Where things live: the datastore keys of everything kept for a dataset, the replica's
scratch folder, and which shared-storage paths may be registered.

Keys (in the datastore: the data folder by default, an S3 bucket prefix with
``MRC_INGEST_STORAGE_URL=s3://...``)::

    datasets/<id>/archive.mrcz        the MRCZ archive (normalized; the stored form)
    datasets/<id>/restore.npz         its restore record (header, layout, padding, index)
    datasets/<id>/tail.bin            bytes received after the last frame, if any
    datasets/<id>/original/<name>     the file as received, when it is the stored form
                                      (or MRC_INGEST_KEEP_ORIGINAL is set)
    datasets/<id>/sum.bin             frame sum at preview resolution (``sum.npy`` before;
                                      service.mrc.preview.encode_sum)
    conversions/<id>/<target>.mrc[z]  converted downloads, a cache bounded in bytes
    particle_sets/<id>/...            a cryoSPARC .cs and its exported stacks

Scratch (this replica's own, under ``data_dir``; bounded by the uploads in flight)::

    incoming/    a particle file (.cs) while it arrives (removed once stored or failed);
                 a movie's PUT never lands here: its ingest pass keeps the bytes in its
                 own objects (service.arrival.ingest_pass)
    tus/         resumable uploads in progress (local datastore)

Datasets stored before archive-only storage keep an absolute ``path`` (the file as
received inside ``datasets/<id>/``) and maybe ``archive.mrcz`` beside it:
:func:`stored_form` reads either shape, so they keep working.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from .datastore import DataStore, LocalStore, sweep_abandoned
from .mrc import Target

HASH_BLOCK = 4 << 20

#: stored forms (dataset info ``storage.form``)
FORM_ARCHIVE = "archive"          # archive + restore record (+ tail) give the bytes back
FORM_ORIGINAL = "original"        # the file as received is kept as it is
FORM_REGISTERED = "registered"    # the user's own file on shared storage is the source
FORM_LEGACY = "legacy"            # stored before archive-only storage (absolute path)


def dataset_prefix(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/"


def generation_prefix(dataset_id: str, generation: str) -> str:
    """The folder one ingest pass writes its objects into (ARCHITECTURE.md): two passes
    of one dataset (a stale worker and the one that took over) never share a key."""
    return f"datasets/{dataset_id}/{generation}/"


def _in(dataset_id: str, generation: str | None) -> str:
    return generation_prefix(dataset_id, generation) if generation else \
        dataset_prefix(dataset_id)


def archive_key(dataset_id: str, generation: str | None = None) -> str:
    return f"{_in(dataset_id, generation)}archive.mrcz"


def record_key(dataset_id: str, generation: str | None = None) -> str:
    return f"{_in(dataset_id, generation)}restore.npz"


def tail_key(dataset_id: str, generation: str | None = None) -> str:
    return f"{_in(dataset_id, generation)}tail.bin"


def original_key(dataset_id: str, filename: str, generation: str | None = None) -> str:
    return f"{_in(dataset_id, generation)}original/{filename}"


def sum_key(dataset_id: str, legacy: bool = False, gen: str | None = None) -> str:
    return f"{_in(dataset_id, gen)}sum.{'npy' if legacy else 'bin'}"


def conversions_prefix(dataset_id: str) -> str:
    return f"conversions/{dataset_id}/"


def conversion_key(dataset_id: str, target: Target) -> str:
    mode = "auto" if target.mode is None else str(target.mode)
    endian = "le" if target.byte_order == "<" else "be"
    if target.is_mrcz:
        name = f"mode{mode}-{target.codec.cname}{target.clevel}-{endian}.mrcz"
    else:
        name = f"mode{mode}-{endian}.mrc"
    return f"{conversions_prefix(dataset_id)}{name}"


def particle_set_prefix(set_id: str) -> str:
    return f"particle_sets/{set_id}/"


@dataclass(frozen=True)
class StoredForm:
    """How a dataset's bytes are kept, whatever shape its catalog row has."""

    form: str
    archive_key: str | None = None    # readable MRCZ archive (for previews, conversions)
    record_key: str | None = None     # restore record (FORM_ARCHIVE)
    tail_key: str | None = None
    original_key: str | None = None   # the file as received, in the datastore
    registered_path: str | None = None  # the user's file (registrations)
    sum_key: str | None = None

    @property
    def keys(self) -> list[str]:
        """Every datastore key kept for the dataset (conversions aside)."""
        return [k for k in (self.archive_key, self.record_key, self.tail_key,
                            self.original_key, self.sum_key) if k]


def stored_form(dataset: dict[str, Any], data_dir: Path) -> StoredForm:
    info = dataset["info"]
    storage = info.get("storage")
    if storage is not None:
        keys = storage.get("keys", {})
        return StoredForm(form=storage["form"], archive_key=keys.get("archive"),
                          record_key=keys.get("record"), tail_key=keys.get("tail"),
                          original_key=keys.get("original"),
                          registered_path=dataset["path"] or None,
                          sum_key=keys.get("sum"))
    # Before archive-only storage: the file as received at an absolute path, and maybe
    # an archive copy beside it.
    dataset_id, path = dataset["id"], dataset["path"]
    if dataset["source"] == "registration":
        original, registered = None, path
    else:
        original, registered = _key_under(Path(path), data_dir), None
    archive = info.get("archive")
    archive_name = None
    if archive is not None and (archive.get("codec") or "none") != "none":
        archive_name = archive_key(dataset_id)
    return StoredForm(form=FORM_LEGACY, archive_key=archive_name, original_key=original,
                      registered_path=registered,
                      sum_key=sum_key(dataset_id, legacy=True)
                      if dataset["status"] == "ready" else None)


def _key_under(path: Path, root: Path) -> str | None:
    try:
        return PurePosixPath(path.resolve().relative_to(root.resolve())).as_posix()
    except ValueError:
        return None


class Storage:
    """The datastore plus this replica's scratch folders."""

    def __init__(self, data_dir: Path, store: DataStore | None = None):
        self.root = Path(data_dir).resolve()
        self.store = store if store is not None else LocalStore(self.root)
        self.incoming = self.root / "incoming"
        self.tus = self.root / "tus"

    def prepare(self, min_age: float = 0.0) -> list[Path]:
        """Create the scratch folders and remove temporaries whose writer is gone (a
        crash's leftovers); files that live writers hold are left alone. ``min_age``:
        spare younger files too (a writer creates its file an instant before locking
        it; at start-up no writer of this process exists yet)."""
        for folder in (self.incoming, self.tus):
            folder.mkdir(parents=True, exist_ok=True)
        removed = sweep_abandoned(self.incoming, min_age=min_age)
        if isinstance(self.store, LocalStore):
            for folder in ("datasets", "conversions", "particle_sets"):
                removed += sweep_abandoned(self.root / folder, min_age=min_age)
        return removed

    def sweep(self, writing: Callable[[str], bool], older_than_seconds: float) -> int:
        """Remove what crashed writers left, and only that; returns how many. Local
        temporaries carry their writer's flock, so a free one is proof. On S3 an
        incomplete multipart upload under ``datasets/<id>/`` or ``conversions/<id>/`` is
        aborted once it is older than ``older_than_seconds`` and no job of dataset
        ``<id>`` holds a live lease (``writing(id)`` false); under ``particle_sets/``,
        age alone. tus uploads (``tus/``) are the catalog's: expiry drops them."""
        if isinstance(self.store, LocalStore):
            return len(self.prepare(min_age=60.0))
        aborted = len(self.prepare(min_age=60.0))  # this replica's scratch
        for prefix in ("datasets/", "conversions/", "particle_sets/"):
            for upload in self.store.stale_multipart_uploads(prefix, older_than_seconds):
                owner = upload.key.split("/")[1] if upload.key.count("/") >= 2 else ""
                if prefix != "particle_sets/" and owner and writing(owner):
                    continue
                self.store.abort_pending(upload)
                aborted += 1
        return aborted

    def remove_dataset(self, dataset_id: str) -> None:
        """Every object kept for the dataset, and its cached conversions. A registered
        file is never touched (it is not in the datastore)."""
        self.store.delete_prefix(dataset_prefix(dataset_id))
        self.store.delete_prefix(conversions_prefix(dataset_id))

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free


def read_blocks(read_at: Callable[[int, int], bytes], start: int, stop: int,
                block: int = 1 << 20) -> Iterator[bytes]:
    """Bytes ``start`` .. ``stop - 1`` of something read by ``read_at(offset, n)`` (an
    object in the datastore, a file), in pieces of at most ``block``."""
    for offset in range(start, stop, block):
        yield read_at(offset, min(block, stop - offset))


def file_blocks(path: Path, block: int = 8 << 20) -> Iterator[bytes]:
    """A local file's bytes in order, in pieces of ``block``."""
    with open(path, "rb", buffering=0) as f:
        while piece := f.read(block):
            yield piece


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(HASH_BLOCK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()
