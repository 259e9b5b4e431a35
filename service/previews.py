"""PNG previews of one frame (read from the archive, one chunk decompressed) or of the
frame sum taken at ingest, with a small in-memory cache (datasets never change, so
entries never go stale; a deleted dataset's entries are dropped)."""

from __future__ import annotations

import io
import threading
import time
from collections import OrderedDict

import numpy as np
from PIL import Image

from .auth import Scope
from . import mrc
from .datastore import ObjectMissing
from .errors import Conflict, from_core
from .metrics import Metrics
from .mrc.preview import binned, contrast_u8, decode_sum
from .queries import Queries
from .readers import Readers


class PreviewCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            png = self._items.get(key)
            if png is not None:
                self._items.move_to_end(key)
            return png

    def put(self, key: tuple, png: bytes) -> None:
        with self._lock:
            self._items[key] = png
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def drop(self, dataset_id: str) -> None:
        with self._lock:
            for key in [k for k in self._items if k[0] == dataset_id]:
                del self._items[key]


def encode_png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image, mode="L").save(out, format="PNG", compress_level=1)
    return out.getvalue()


class Previews:
    def __init__(self, queries: Queries, readers: Readers, metrics: Metrics, capacity: int):
        self.queries, self.readers, self.metrics = queries, readers, metrics
        self.cache = PreviewCache(capacity)

    def frame_png(self, dataset_id: str, k: int, size: int, clip: float,
                  scope: Scope = Scope.ALL) -> bytes:
        started = time.perf_counter()
        dataset = self.queries.ready_dataset(dataset_id, scope)
        key = (dataset_id, "frame", k, size, clip)
        png = self.cache.get(key)
        cached = png is not None
        if png is None:
            try:
                with self.readers.movie(dataset) as src:
                    frame = src.read_frame(k)
            except mrc.MrcError as exc:
                raise from_core(exc) from None
            png = encode_png(contrast_u8(binned(frame, size), clip, 100 - clip))
            self.cache.put(key, png)
        self._observe("frame", cached, started)
        return png

    def sum_png(self, dataset_id: str, size: int, clip: float,
                scope: Scope = Scope.ALL) -> bytes:
        started = time.perf_counter()
        dataset = self.queries.ready_dataset(dataset_id, scope)
        key = (dataset_id, "sum", size, clip)
        png = self.cache.get(key)
        cached = png is not None
        if png is None:
            form = self.readers.form(dataset)
            if form.sum_key is None:
                raise Conflict(f"dataset {dataset_id} has no frame sum")
            try:
                raw = self.readers.store.get_bytes(form.sum_key)
            except ObjectMissing:
                raise Conflict(f"the frame sum of dataset {dataset_id} is missing") from None
            total = decode_sum(raw)
            png = encode_png(contrast_u8(binned(total, size), clip, 100 - clip))
            self.cache.put(key, png)
        self._observe("sum", cached, started)
        return png

    def _observe(self, kind: str, cached: bool, started: float) -> None:
        self.metrics.preview_seconds.labels(kind, str(cached).lower()).observe(
            time.perf_counter() - started)
