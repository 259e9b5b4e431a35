"""Opening what is stored for a dataset, whatever its stored form: the movie to read
frames from (the archive, with its frame index from the restore record, so no chunk
header is walked), the bytes as received (rebuilt from archive + record, or the kept
original), and the source's header (for metadata).

Restore records are small and read for every Range request and preview, so a few dozen
are kept in memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

from . import mrc
from .datastore import DataStore, ObjectMissing
from .errors import Conflict, from_core
from .mrc.extended import ExtendedHeader, decode as decode_extended
from .mrc import header as hdr
from .mrc.restore import AsReceived, RestoreRecord
from .roots import Roots, SharedFile
from .storage import (FORM_ARCHIVE, FORM_LEGACY, FORM_REGISTERED, StoredForm, read_blocks,
                      stored_form)

RECORDS_KEPT = 64


def open_registered(roots: Roots, dataset: dict[str, Any], path: str) -> SharedFile:
    """The registered file of ``dataset``, opened inside the roots and still the file
    that was registered (it lives on shared storage, outside our control)."""
    return roots.open_registered(path, dataset["info"].get("source_fingerprint"),
                                 what=f"the registered file of dataset {dataset['id']}")


class Readers:
    def __init__(self, store: DataStore, data_dir: Path, roots: Roots):
        self.store = store
        self.data_dir = data_dir
        self.roots = roots
        self._records: OrderedDict[str, RestoreRecord] = OrderedDict()
        self._lock = threading.Lock()

    def form(self, dataset: dict[str, Any]) -> StoredForm:
        return stored_form(dataset, self.data_dir)

    def record(self, dataset: dict[str, Any], form: StoredForm | None = None) -> RestoreRecord:
        form = form or self.form(dataset)
        assert form.record_key is not None
        with self._lock:
            record = self._records.get(dataset["id"])
            if record is not None:
                self._records.move_to_end(dataset["id"])
                return record
        record = RestoreRecord.from_bytes(self._get(form.record_key, dataset))
        with self._lock:
            self._records[dataset["id"]] = record
            while len(self._records) > RECORDS_KEPT:
                self._records.popitem(last=False)
        return record

    def forget(self, dataset_id: str) -> None:
        with self._lock:
            self._records.pop(dataset_id, None)

    def _get(self, key: str, dataset: dict[str, Any]) -> bytes:
        try:
            return self.store.get_bytes(key)
        except ObjectMissing:
            raise missing(key, dataset) from None

    def movie(self, dataset: dict[str, Any]) -> mrc.MrcFile:
        """The movie to read frames from: the archive (frame index from the record, or
        walked for a legacy archive), else the file as received. Close it after use."""
        form = self.form(dataset)
        try:
            if form.archive_key is not None:
                index = self.record(dataset, form).frame_index if form.record_key else None
                return mrc.MrcFile(self._source(form.archive_key, dataset), frame_index=index)
            return mrc.MrcFile(self._as_received_source(dataset, form))
        except mrc.MrcError as exc:
            raise from_core(exc) from None

    def _source(self, key: str, dataset: dict[str, Any]):
        try:
            return self.store.source(key)
        except ObjectMissing:
            raise missing(key, dataset) from None

    def _as_received_source(self, dataset: dict[str, Any], form: StoredForm):
        if form.original_key is not None:
            return self._source(form.original_key, dataset)
        if form.registered_path is not None:
            return open_registered(self.roots, dataset, form.registered_path).source()
        raise Conflict(f"dataset {dataset['id']} keeps no readable copy")

    def header(self, dataset: dict[str, Any]) -> tuple[Any, ExtendedHeader, int] | None:
        """(header record, extended header, frames) of the file as received, or None
        when nothing readable is kept."""
        form = self.form(dataset)
        try:
            if form.record_key is not None:
                record = self.record(dataset, form)
                order, _ = hdr.detect_byte_order(record.header)
                if order is None:
                    return None
                header = hdr.parse(record.header, order)
                ext, _ = decode_extended(record.extended, bytes(header["exttyp"]),
                                         int(header["nint"]), int(header["nreal"]), order,
                                         record.source.nz)
                return header, ext, record.source.nz
            with mrc.MrcFile(self._as_received_source(dataset, form)) as src:
                return src.header, src.extended, src.n_frames
        except (mrc.MrcError, OSError, Conflict):
            return None

    def as_received(self, dataset: dict[str, Any]) -> "Received":
        """The bytes as received, with their size; ranges read only what they touch."""
        form = self.form(dataset)
        if form.form == FORM_ARCHIVE and form.original_key is None:
            record = self.record(dataset, form)
            movie = self.movie(dataset)
            tail = (lambda offset, n: self.store.read_range(form.tail_key, offset, n)) \
                if form.tail_key else None
            rebuilt = AsReceived(record, movie.read_frame, tail,
                                 archive_frame_nbytes=movie.layout.frame_nbytes)
            return Received(rebuilt.size, None, movie.close, None, read=rebuilt.iter_range)
        if form.original_key is not None:
            key = form.original_key
            size = self.store.size(key)
            if size is None:
                raise missing(key, dataset)
            return Received(size, partial(self.store.read_range, key), lambda: None,
                            self.store.local_path(key))
        if form.registered_path is not None and form.form in (FORM_REGISTERED, FORM_LEGACY,
                                                              FORM_ARCHIVE):
            source = open_registered(self.roots, dataset, form.registered_path).source()
            # Served by Python from the checked descriptor, never again by path.
            return Received(source.size, source.read_at, source.close, None)
        raise Conflict(f"dataset {dataset['id']} keeps no copy of the file as received")


class Received:
    """The file as received: ``size``, ``read(start, stop)`` yielding its bytes, and a
    local path when the bytes are a plain local file (served without Python reading
    them). Built from a ``read_at(offset, n)``, or (a rebuilt stream) from its own
    ``read(start, stop)``."""

    def __init__(self, size: int, read_at: Callable[[int, int], bytes] | None,
                 close: Callable[[], None], local_path: Path | None,
                 read: Callable[..., Iterator[bytes]] | None = None):
        self.size, self.close, self.local_path = size, close, local_path
        self._read_at, self._read = read_at, read

    def read(self, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        stop = self.size if stop is None else min(stop, self.size)
        if self._read is not None:
            return self._read(start, stop)
        assert self._read_at is not None
        return read_blocks(self._read_at, start, stop)


def missing(key: str, dataset: dict[str, Any]) -> Conflict:
    return Conflict(f"stored object {key!r} of dataset {dataset['id']} is missing")
