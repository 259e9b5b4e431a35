"""Session figures recomputed at most once per interval per session.

A session's figures are one indexed pass over its datasets (tens of milliseconds for a
10,000-movie session, holding the session row's lock). Recomputing after every change
would cost that two or three times per movie and grow with the session; instead the
first change after a quiet interval is recomputed at once, on the caller's thread, and
further changes within the interval are coalesced into one recompute at its end, on
this refresher's thread. A dashboard polling every second sees every movie within that
second, whatever the arrival rate; the cost per session is bounded by the interval.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import sqlalchemy as sa

log = logging.getLogger("mrc_ingest.catalog")


class SessionRefresher:
    def __init__(self, refresh: Callable[[str], object], interval: float):
        self.refresh, self.interval = refresh, interval
        self._last: dict[str, float] = {}   # session -> when its last recompute began
        self._due: dict[str, float] = {}    # session -> when its coalesced one is due
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def changed(self, session_id: str) -> None:
        """A dataset of ``session_id`` changed (its change is committed)."""
        moment = time.monotonic()
        with self._wake:
            if session_id in self._due:
                return  # a recompute after this change is already coming
            last = self._last.get(session_id)
            if last is not None and moment - last < self.interval and not self._stopping:
                self._due[session_id] = last + self.interval
                self._start()
                self._wake.notify()
                return
            self._last[session_id] = moment
        self._run(session_id)

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="session-figures",
                                            daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and (
                        not self._due or min(self._due.values()) > time.monotonic()):
                    timeout = (min(self._due.values()) - time.monotonic()
                               if self._due else None)
                    self._wake.wait(timeout)
                moment = time.monotonic()
                ready = [s for s, when in self._due.items()
                         if self._stopping or when <= moment]
                for session_id in ready:
                    del self._due[session_id]
                    self._last[session_id] = moment
                # forget sessions quiet for a whole interval: their next change runs at once
                for session_id in [s for s, when in self._last.items()
                                   if moment - when > self.interval and s not in self._due]:
                    del self._last[session_id]
                stopping = self._stopping
            for session_id in ready:
                self._run(session_id)
            if stopping:
                return

    def _run(self, session_id: str) -> None:
        try:
            self.refresh(session_id)
        except sa.exc.SQLAlchemyError:  # the catalog away: the next change recomputes
            log.warning("session figures not refreshed", exc_info=True,
                        extra={"session_id": session_id})

    def flush(self) -> None:
        """Run every coalesced recompute now, and stop the thread (service stop)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._wake:
            self._stopping = False
