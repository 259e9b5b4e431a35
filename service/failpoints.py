"""Named fault points in the write path (as etcd's gofail and FoundationDB's buggify):
a crash test arms one and the process fails exactly there, instead of being killed
after a guessed sleep. Unarmed, a point costs one dictionary lookup.

Armed through the environment of the process (read at start)::

    MRC_INGEST_FAULT="commit.after_store:kill"
    MRC_INGEST_FAULT="commit.after_commit:error,tus.after_settle:sleep=2"

or from a test in the same process with :func:`arm`. Actions:

``kill``         SIGKILL to this process (what ``kill -9`` does: no cleanup runs)
``error``        raise :class:`FaultInjected` (an unexpected failure at that point)
``unavailable``  raise ServiceUnavailable (an outage of the catalog or store: 503, retried)
``sleep=S``      wait S seconds, then go on
``pause=DIR``    create ``DIR/<point>.reached``, then wait until ``DIR/<point>.go`` exists
                 (the test stops the catalog or the store meanwhile, then lets it go on)

A point fires every time it is passed while armed; ``@once`` after the action
(``error@once``) makes it fire only the first time. The points are listed in
:data:`POINTS` and in ARCHITECTURE.md's crash-point table.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

ENVIRONMENT = "MRC_INGEST_FAULT"

#: every point the code passes, in protocol order (ARCHITECTURE.md)
POINTS = (
    "commit.before_store",   # the last byte is in and proven; nothing stored yet
    "commit.after_store",    # objects durable and read back; the catalog not written
    "commit.answer_lost",    # the catalog transaction landed but its answer is lost
    "commit.after_commit",   # the catalog transaction committed; bytes not released
    "commit.after_release",  # received bytes released; the answer not sent
    "tus.after_settle",      # a PATCH's bytes durable and its offset recorded
)


class FaultInjected(RuntimeError):
    """The failure an ``error`` fault point raises."""


_armed: dict[str, str] = {}
_fired: set[str] = set()
_lock = threading.Lock()


def arm(point: str, action: str) -> None:
    if point not in POINTS:
        raise ValueError(f"no fault point {point!r}; the points are {POINTS}")
    with _lock:
        _armed[point] = action
        _fired.discard(point)


def disarm(point: str | None = None) -> None:
    with _lock:
        if point is None:
            _armed.clear()
            _fired.clear()
        else:
            _armed.pop(point, None)


def arm_from_environment(value: str | None = None) -> None:
    """Arm what ``MRC_INGEST_FAULT`` names (``point:action`` pairs, comma-separated)."""
    value = os.environ.get(ENVIRONMENT, "") if value is None else value
    for item in filter(None, (part.strip() for part in value.split(","))):
        point, _, action = item.partition(":")
        arm(point, action or "error")


def hit(point: str) -> None:
    """Pass the fault point ``point``: a no-op unless it is armed."""
    action = _armed.get(point)
    if action is None:
        return
    action, _, mode = action.partition("@")
    with _lock:
        if mode == "once" and point in _fired:
            return
        _fired.add(point)
    name, _, argument = action.partition("=")
    if name == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # the signal is delivered at once; never go on
    elif name == "error":
        raise FaultInjected(f"fault injected at {point}")
    elif name == "unavailable":
        from .errors import ServiceUnavailable

        raise ServiceUnavailable(f"fault injected at {point}")
    elif name == "sleep":
        time.sleep(float(argument or 1))
    elif name == "pause":
        folder = Path(argument)
        (folder / f"{point}.reached").touch()
        while not (folder / f"{point}.go").exists():
            time.sleep(0.02)
    else:
        raise ValueError(f"fault point {point}: unknown action {action!r}")


arm_from_environment()
