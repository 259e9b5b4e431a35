"""Recovery: the commit protocol run again from what the catalog says, after a crash, an
outage of the catalog or the store, or a lease taken over (ARCHITECTURE.md, "Recovery").

Every step is idempotent and safe on any number of replicas at once; each replica with
workers runs :meth:`Recovery.tick` at start and every ``MRC_INGEST_RECOVERY_SECONDS``
(15), so a complete tus
upload without its dataset becomes one within a minute of the service (or the catalog,
or the store) being back, and :meth:`Recovery.sweep` every few minutes. Recovery never
re-queues a ``ready`` or ``rejected`` dataset and never deletes a key that a committed
row names.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any

from ..catalog import Catalog
from ..datastore import StoreUnavailable
from ..errors import first_line
from ..storage import Storage, stored_form

if TYPE_CHECKING:
    from ..tus import TusUploads

log = logging.getLogger("mrc_ingest.recovery")
#: the folder name of one pass's objects (protocol.new_generation)
GENERATION = re.compile(r"[0-9a-f]{8}")

#: an object younger than this is never swept: a pass stores its objects a moment
#: before it commits them
ORPHAN_MIN_AGE_SECONDS = 600.0


class Recovery:
    def __init__(self, catalog: Catalog, storage: Storage, tus: "TusUploads"):
        self.catalog, self.storage, self.tus = catalog, storage, tus

    def tick(self) -> dict[str, int]:
        """The quick steps: finish deletions that were cut off, replay complete uploads
        that have no committed dataset, release the bytes of committed ones, drop
        expired uploads. What each did, counted."""
        done = {"deleted": self.finish_deletions(),
                "replayed": self.tus.finish_complete(),
                "released": self.tus.release_committed(),
                "expired": self.tus.expire()}
        self.tus.forget_streams()
        return done

    def finish_deletions(self) -> int:
        """Tombstones whose jobs no longer run: their objects, then their rows."""
        done = 0
        for dataset_id in self.catalog.tombstones():
            try:
                if self.catalog.has_live_lease(dataset_id):
                    continue  # its job stops at its next lease renewal; the next tick
                self.delete_now(dataset_id)
                done += 1
            except Exception as exc:  # noqa: BLE001 - one stuck item never stops the rest
                log.warning("deletion of %s postponed: %s", dataset_id, first_line(exc))
        return done

    def delete_now(self, dataset_id: str) -> None:
        """Objects first, then the row: should the store be away, the tombstone stays
        (hidden from every answer) and the next tick finishes it."""
        self.storage.remove_dataset(dataset_id)
        self.catalog.delete_dataset(dataset_id)

    def sweep(self, min_age: float = ORPHAN_MIN_AGE_SECONDS) -> int:
        """Objects under ``datasets/`` that no row names, older than ``min_age``: those of
        a dataset without a row, and those of a committed (or failed) dataset that its
        row does not name (a pass that died, or lost its lease, before it removed
        them). Datasets a pass may be writing (receiving, queued, processing, or with a
        live lease) are left alone. Returns how many objects went."""
        cutoff = time.time() - min_age
        by_dataset: dict[str, list[Any]] = {}
        for info in self.storage.store.list("datasets/"):
            parts = info.key.split("/")
            if len(parts) >= 3:
                by_dataset.setdefault(parts[1], []).append(info)
        removed = 0
        for dataset_id, objects in by_dataset.items():
            row = self.catalog.get_dataset(dataset_id)
            if row is not None and row["status"] not in ("ready", "rejected", "failed"):
                continue
            if row is not None:
                if "storage" not in row["info"]:
                    continue  # stored before generations (its keys derive from paths)
                # only what a pass wrote under its own generation's folder
                objects = [o for o in objects if GENERATION.fullmatch(o.key.split("/")[2])
                           and o.key.count("/") >= 3]
            named = set(stored_form(row, self.storage.root).keys) if row is not None \
                else set()
            stale = [o for o in objects if o.key not in named and o.modified <= cutoff]
            if not stale or (row is not None and self.catalog.has_live_lease(dataset_id)):
                continue
            for info in stale:
                self.storage.store.delete(info.key)
                removed += 1
        return removed


def run_tick(recovery: Recovery) -> None:
    """One tick, logged; an outage of the catalog or store only postpones it."""
    try:
        done = recovery.tick()
    except StoreUnavailable as exc:
        log.warning("recovery postponed: %s", first_line(exc))
        return
    except Exception as exc:  # noqa: BLE001 - the catalog may be away; next tick
        log.warning("recovery postponed: %s", first_line(exc))
        return
    if any(done.values()):
        log.info("recovered", extra=done)


__all__ = ["Recovery", "run_tick"]
