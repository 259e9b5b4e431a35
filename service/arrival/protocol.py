"""The commit protocol: the one order in which a movie that arrived becomes a dataset
(ARCHITECTURE.md, "The commit protocol"). Every arrival path ends here -- a PUT or
multipart upload, the last tus PATCH, a registration, a tus upload replayed after a
restart, a job taken over from a worker that died -- and nothing else deletes received
bytes or stored objects of a pass::

    stored     the pass's objects (archive, tail, record, frame sum, and the original
               where it is kept) are durable, then read back: each must be what was
               written (size and CRC-32 from the store itself; the original's SHA-256
               must be the one taken on receipt)
    committed  one catalog transaction: the dataset ``ready``/``rejected`` with the keys
               of its objects, its job finished (fenced by owner and claim), a tus
               upload marked completed
    released   only now do the received bytes go (a tus file or parts; a one-request
               upload's are held by the pass's own objects, and any it rebuilt the
               original from go now)

Each step may run again (a replay, a takeover, recovery): a pass writes its objects
under its own generation's keys, so removing what it wrote never touches a key that a
committed row names, and a dataset is committed once.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from ..catalog import Catalog, Fence
from ..config import Settings
from ..datastore import DataStore, ObjectCorrupt, Receipt
from ..errors import Conflict
from ..failpoints import hit
from ..priority import WorkThreads

log = logging.getLogger("mrc_ingest.commit")


class ReceivedBytes:
    """Where the bytes as received wait until the protocol releases them. This base is
    a registration's: the user's own file, never stored and never released."""

    #: a tus upload the commit transaction marks completed
    tus_upload_id: str | None = None
    #: nothing else holds the bytes: the pass keeps what its archive does not prove,
    #: as it arrives (a one-request upload)
    kept_by_pass: bool = False

    def keep(self, store: DataStore, key: str) -> int | None:
        """Store a copy of the bytes under ``key`` (they stay where they are until
        :meth:`release`); the byte count, or None when nothing can be stored."""
        return None

    def release(self) -> None:
        """Drop the bytes: the dataset that holds them is committed."""


class PassBytes(ReceivedBytes):
    """A one-request upload's bytes (PUT, multipart): held by nothing but its pass, which
    stores what its archive does not prove as it arrives
    (:mod:`service.arrival.ingest_pass`). The client has no answer until the commit:
    should it fail, it is told so and sends again. What there is to release are the
    objects an original was rebuilt from (:meth:`held_in`)."""

    kept_by_pass = True

    def __init__(self) -> None:
        self._store: DataStore | None = None
        self._keys: list[str] = []

    def held_in(self, store: DataStore, keys: list[str]) -> None:
        """The pass rebuilt the original from these objects (the proven chunks and the
        tail, which no row names): they hold the bytes until the release."""
        self._store, self._keys = store, list(keys)

    def release(self) -> None:
        store, keys, self._keys = self._store, self._keys, []
        for key in keys:
            assert store is not None
            try:
                store.delete(key)
            except Exception:  # noqa: BLE001 - no row names it: the sweep removes it
                log.warning("%s not removed yet (the sweep will)", key, exc_info=True)


#: how many passes may cut and measure frames at once: one per core but one, which
#: stays for the event loop and the compressors. Eight uploads at once otherwise run
#: eight such threads, and the event loop, which answers the dashboards, waits its turn
#: for the GIL behind all of them; the others wait here (and their clients, through
#: TCP, a moment) instead. Measured (bench_load --quick, 2 cores): metadata p99 326 ms
#: unbounded, 164 ms with one slot per core, 85 ms with this; the aggregate upload rate
#: 121, 119, 114 MB/s.
def frame_slots() -> threading.Semaphore:
    return threading.BoundedSemaphore(max(1, (os.cpu_count() or 1) - 1))


@dataclass
class PassDeps:
    """What a pass needs of the service around it."""

    settings: Settings
    catalog: Catalog
    store: DataStore
    #: (dataset id, info, fields, extended header, header, frames, commit) -> the commit
    #: transaction's verdict: takes the acquisition lock, fills in the summary, then
    #: calls ``commit(info, fields)`` (:meth:`service.metadata.Acquisition.finalize`)
    finalize: Callable[..., str]
    #: serializes "is there already a dataset with these bytes?" with the catalog
    #: commit, and nothing else (no store I/O is done under it)
    commit_lock: threading.Lock = field(default_factory=threading.Lock)
    #: how many passes may cut and measure frames at once (:func:`frame_slots`)
    frame_slots: threading.Semaphore = field(default_factory=lambda: frame_slots())
    #: where an upload's stream work runs: threads nicer than the requests' (none by
    #: default: the work runs on the caller's thread)
    work: WorkThreads = field(default_factory=lambda: WorkThreads(0))


def new_generation() -> str:
    """The folder under ``datasets/<id>/`` that one pass writes into: a stale pass (a
    worker paused past its lease) and the one that took over never share a key."""
    return secrets.token_hex(4)


@dataclass
class Stored:
    """The objects one pass stored: their keys and sizes by role, and what to check."""

    keys: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    receipts: list[Receipt] = field(default_factory=list)
    #: (key, SHA-256 it must have): the original, checked end to end
    original_check: tuple[str, str] | None = None

    def add(self, role: str, receipt: Receipt) -> None:
        self.keys[role], self.sizes[role] = receipt.key, receipt.size
        self.receipts.append(receipt)


def read_back(store: DataStore, stored: Stored) -> None:
    """Step "stored", second half: every object is what was written, as the store gives
    it back. Nothing may be committed (and nothing received released) otherwise."""
    for receipt in stored.receipts:
        store.read_back(receipt)
    if stored.original_check is not None:
        key, expected = stored.original_check
        found = store.sha256(key)
        if found != expected:
            raise ObjectCorrupt(f"{key}: SHA-256 {found} read back, {expected} received")


def commit(deps: PassDeps, dataset_id: str, stored: Stored, info: dict[str, Any],
           fields: dict[str, Any], *, fence: Fence | None, job_result: dict[str, Any],
           tus_upload_id: str | None, summary: tuple[Any, Any, Any]) -> str:
    """Step "committed": one transaction (under the acquisition lock, which fills in the
    summary). The caller holds the commit lock. Returns the catalog's verdict."""
    if not stored.keys.get("archive") and not stored.keys.get("original") \
            and not info.get("storage", {}).get("form") == "registered":
        raise Conflict(f"dataset {dataset_id}: nothing of it was stored; not committed")

    def transaction(info: dict[str, Any], fields: dict[str, Any]) -> str:
        return deps.catalog.commit_ingest(dataset_id, {**fields, "info": info},
                                          fence=fence, job_result=job_result,
                                          tus_upload_id=tus_upload_id)
    extended, header, n_frames = summary
    verdict = deps.finalize(dataset_id, info, fields, extended, header, n_frames,
                            commit=transaction)
    hit("commit.answer_lost")  # as if the connection broke after COMMIT was sent
    return verdict


def release(received: ReceivedBytes, dataset_id: str) -> None:
    """Step "released". A failure here loses nothing (the dataset is committed): the
    bytes are released again by recovery (:mod:`service.arrival.recovery`)."""
    try:
        received.release()
    except Exception:  # noqa: BLE001 - recovery releases them later
        log.warning("received bytes not released yet (recovery will)", exc_info=True,
                    extra={"dataset_id": dataset_id})
        return
    hit("commit.after_release")
