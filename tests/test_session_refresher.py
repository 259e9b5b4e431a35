"""Session figures coalesced per session (service/catalog/refresher.py): the first change
after a quiet interval is recomputed at once, later ones within it together at its end;
none is lost, a stopping service runs what is due, and a recompute lost with its process
is found by the maintenance pass. Checked against a recount of the rows in plain SQL."""

from __future__ import annotations

import threading
import time

import sqlalchemy as sa

from service.catalog import Catalog
from service.catalog.refresher import SessionRefresher


def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


class Calls:
    def __init__(self):
        self.seen: list[tuple[str, float]] = []
        self.lock = threading.Lock()

    def __call__(self, session_id: str) -> None:
        with self.lock:
            self.seen.append((session_id, time.monotonic()))

    def of(self, session_id: str) -> int:
        with self.lock:
            return sum(1 for s, _ in self.seen if s == session_id)


def test_a_burst_is_one_recompute_now_and_one_at_the_end():
    calls = Calls()
    refresher = SessionRefresher(calls, interval=0.3)
    refresher.changed("a")
    assert calls.of("a") == 1  # the first change: at once, on the caller's thread
    for _ in range(200):
        refresher.changed("a")
        refresher.changed("b")
    assert calls.of("a") == 1 and calls.of("b") == 1
    until(lambda: calls.of("a") == calls.of("b") == 2)  # the burst: once, at its end
    refresher.flush()
    assert calls.of("a") == 2 and calls.of("b") == 2
    first, second = [t for s, t in calls.seen if s == "a"]
    assert second - first >= 0.3


def test_a_change_after_a_quiet_interval_runs_at_once():
    calls = Calls()
    refresher = SessionRefresher(calls, interval=0.05)
    refresher.changed("a")
    time.sleep(0.1)
    refresher.changed("a")
    assert calls.of("a") == 2


def test_flush_runs_what_is_due_now():
    calls = Calls()
    refresher = SessionRefresher(calls, interval=30.0)
    refresher.changed("a")
    refresher.changed("a")
    assert calls.of("a") == 1
    refresher.flush()  # what a stopping service does
    assert calls.of("a") == 2


def test_interval_zero_recomputes_after_every_change():
    calls = Calls()
    refresher = SessionRefresher(calls, interval=0.0)
    for _ in range(5):
        refresher.changed("a")
    assert calls.of("a") == 5


def recount(catalog: Catalog, session_id: str) -> tuple[int, int, int]:
    with catalog.engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT count(*), coalesce(sum(status = 'ready'), 0), "
            "coalesce(sum(size_bytes), 0) FROM datasets "
            "WHERE session_id = :s AND status != 'deleting'"), {"s": session_id}).one()


def figures(catalog: Catalog, session_id: str) -> tuple[int, int, int]:
    row = catalog.get_session(session_id)
    return row["movies"], row["ready"], row["bytes_received"]


def test_arrivals_in_a_burst_end_with_the_right_figures(tmp_path):
    catalog = Catalog(f"sqlite:///{tmp_path}/c.sqlite3", session_refresh_seconds=0.2)
    recomputes = Calls()
    inner = catalog.session_figures.refresh
    catalog.session_figures.refresh = lambda s: (recomputes(s), inner(s))
    session = catalog.session_for("p", "grid1", "upload")["id"]
    for i in range(60):
        catalog.add_dataset(id=f"d{i}", name=f"m{i}.mrc", source="upload",
                            status="receiving", size_bytes=1000 + i, path="",
                            session_id=session, project="p")
        catalog.update_dataset(f"d{i}", status="ready")
    until(lambda: figures(catalog, session) == recount(catalog, session))
    assert figures(catalog, session) == (60, 60, sum(1000 + i for i in range(60)))
    assert recomputes.of(session) < 40  # 120 changes, far fewer recomputes
    catalog.session_figures.flush()
    catalog.close()


def test_a_lost_recompute_is_found_by_the_maintenance_pass(tmp_path):
    catalog = Catalog(f"sqlite:///{tmp_path}/c.sqlite3")
    session = catalog.session_for("p", "grid1", "upload")["id"]
    catalog.add_dataset(id="d0", name="m.mrc", source="upload", status="ready",
                        size_bytes=10, path="", session_id=session, project="p")
    assert figures(catalog, session) == (1, 1, 10)
    with catalog.engine.begin() as conn:  # a change whose recompute died with its process
        conn.execute(sa.text("UPDATE datasets SET status = 'failed', size_bytes = 20, "
                             "updated_at = :later WHERE id = 'd0'"),
                     {"later": "9999-01-01T00:00:00.000000+00:00"})
    assert figures(catalog, session) == (1, 1, 10)
    assert catalog.refresh_stale_sessions() == 1
    assert figures(catalog, session) == recount(catalog, session) == (1, 0, 20)
    catalog.close()


def test_a_lost_recompute_after_a_removal_is_found_too(tmp_path):
    """A removed row (a cut-off upload dropped) leaves no newer row behind: the
    maintenance pass recomputes every session recomputed lately."""
    catalog = Catalog(f"sqlite:///{tmp_path}/c.sqlite3")
    session = catalog.session_for("p", "grid1", "upload")["id"]
    for i, status in enumerate(("ready", "receiving")):
        catalog.add_dataset(id=f"d{i}", name=f"m{i}.mrc", source="upload", status=status,
                            size_bytes=10, path="", session_id=session, project="p")
    assert figures(catalog, session) == (2, 1, 20)
    with catalog.engine.begin() as conn:  # dropped, and its recompute died with the process
        conn.execute(sa.text("DELETE FROM datasets WHERE id = 'd1'"))
    assert catalog.refresh_stale_sessions() == 1
    assert figures(catalog, session) == recount(catalog, session) == (1, 1, 10)
    assert catalog.get_session(session)["in_flight"] == 0
    catalog.close()
