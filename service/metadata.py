"""Acquisition metadata of a dataset: the summary drawn from its sidecars (.mdoc,
info.txt) and its header's extended header, recomputed whenever either side arrives.

A sidecar may arrive while its movie is being ingested; the final write of an ingest
and a sidecar's refresh take the same lock, so neither overwrites the other's summary.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from .catalog import Catalog
from .mrc.extended import ExtendedHeader
from .readers import Readers
from .sidecars import acquisition


class Acquisition:
    def __init__(self, catalog: Catalog, readers: Readers):
        self.catalog, self.readers = catalog, readers
        self._lock = threading.Lock()

    def _apply(self, dataset_id: str, info: dict[str, Any], fields: dict[str, Any],
               extended: ExtendedHeader | None, header: Any, n_frames: int | None) -> None:
        """Summary, sidecars and their findings into ``info``; the catalog columns the
        summary fills into ``fields`` (the summary already ranks the header first).
        Without the header its facts are unknown rather than absent: a None then erases
        nothing."""
        summary, findings, parsed, columns = acquisition(self.catalog.sidecars_of(dataset_id),
                                                         extended, header, n_frames)
        info["acquisition"] = summary
        info["sidecars"] = parsed
        # Sidecars refused on shared storage (a link, not a plain file) stay findings.
        info["sidecar_findings"] = (info.get("refused_sidecars", [])
                                    + [f.to_dict() for f in findings])
        if header is None:
            columns = {k: v for k, v in columns.items() if v is not None}
        fields.update(columns)

    def finalize(self, dataset_id: str, info: dict[str, Any], fields: dict[str, Any],
                 extended: ExtendedHeader | None, header: Any, n_frames: int | None,
                 commit: Callable[[dict[str, Any], dict[str, Any]], str]) -> str:
        """The commit of an ingest with its summary in it: ``commit(info, fields)`` runs
        the catalog transaction (:mod:`service.arrival.protocol`) under this lock, so a
        sidecar arriving meanwhile is in the summary or refreshes it after. Returns the
        transaction's verdict."""
        with self._lock:
            self._apply(dataset_id, info, fields, extended, header, n_frames)
            return commit(info, fields)

    def refresh(self, dataset_id: str) -> dict[str, Any] | None:
        """Recompute a dataset's summary after a sidecar arrived."""
        with self._lock:
            dataset = self.catalog.get_dataset(dataset_id)
            if dataset is None:
                return None
            found = self.readers.header(dataset) if dataset["status"] in ("ready",
                                                                           "rejected") else None
            header, extended, n_frames = found if found is not None else (None, None, None)
            info, fields = dict(dataset["info"]), {}
            self._apply(dataset_id, info, fields, extended, header, n_frames)
            self.catalog.update_dataset(dataset_id, info=info, **fields)
            return self.catalog.get_dataset(dataset_id)
