"""Ingest work below the requests: the threads that cut, measure, compress and write an
upload as it streams, and the job workers, run at a higher nice value than the event
loop and the threads that answer requests.

One ``serve`` both ingests and answers the dashboards. On two cores eight uploads keep
every core busy, and the event loop is one thread among many for the scheduler: a
metadata GET then waited for a core behind the frame work (p50 17.6 ms, p99 99.5 ms,
against 2.6 / 5.4 ms idle; bench_load.py). Linux schedules threads, and each thread
has its own nice value, which the threads it starts inherit (the archive writer's
encoder, the receiver's hashing thread, blosc's): lowering the few threads that start
the heavy work lowers all of it, as ``nice`` on a separate upload process did, without
a second process. Lowering only ever goes one way for an unprivileged process (a
thread cannot take its priority back), so the work runs on threads of its own, never
on the shared pool that also serves requests.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")

#: most uploads whose stream work runs at once (more wait their turn for a thread; the
#: frame work itself is bounded by ``PassDeps.frame_slots``)
WORK_THREADS = 32


def lower_this_thread(steps: int) -> None:
    """Raise the calling thread's nice value by ``steps`` (at most to 19). Linux only:
    elsewhere ``setpriority`` would lower the whole process, so nothing happens."""
    if steps <= 0 or not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    try:
        now = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, now + steps))
    except OSError:  # a sandbox that forbids it: the work runs at the loop's priority
        pass


class WorkThreads:
    """A pool of threads ``steps`` nicer than the process, for the stream work of
    uploads. :meth:`run` is called from a request's worker thread (inside
    ``anyio.to_thread.run_sync``, which keeps its cancellation rules) and waits."""

    def __init__(self, steps: int, max_workers: int = WORK_THREADS):
        self.steps = steps
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="mrc-work",
                                        initializer=lower_this_thread, initargs=(steps,))

    def run(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` on a work thread; its result, or its exception."""
        if self.steps <= 0:
            return fn(*args)
        return self._pool.submit(fn, *args).result()

    def wrap(self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn``, made to run on a work thread."""
        return lambda *args: self.run(fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
