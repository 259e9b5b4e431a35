"""Sessions benchmark (issue #20): 1,000 sessions holding 1,000,000 datasets, on SQLite
and on PostgreSQL, each figure next to a reference measured in the same run.

* ``GET /v1/sessions`` latency over loopback from Python (httpx, one keep-alive
  connection): the default first page, ``?project=``, ``?sort=name`` and a cursor's next
  page; median, p95, p99; goal p99 < 50 ms. References, same server, same run:
  ``GET /healthz`` (the cheapest route) and ``GET /v1/datasets`` (its first page).
* the first rows of the dashboard's landing page (the sessions list) in headless
  Chromium: fresh loads (a new browser profile each, cache off), from navigation start
  to the first row laid out and painted (an observer installed before the page's own
  scripts records ``performance.now()``); median and p95; goal < 1 s. Reference: the
  page's own DOMContentLoaded and the list request as the browser timed it.
* what keeping the figures costs: ``catalog.refresh_session`` of a 1,000-dataset
  session (each arrival pays it), and ``catalog.refresh_all_sessions()`` of the whole
  catalog (a rebuild).

The catalog is filled through the schema's own tables (``Catalog(url)`` migrates an
empty one): sessions rows, then the datasets in bulk (SQLAlchemy executemany on SQLite,
COPY on PostgreSQL), the secondary indexes and triggers of ``datasets`` dropped for the
load and re-created from their own definitions after it, so the catalog ends exactly as
the migrations make it. The figures are then computed by ``refresh_all_sessions``.
PostgreSQL is a fresh cluster (initdb, default settings) on a free port, removed after:
loaded with fsync off, then restarted durable (fsync and synchronous commits on, as in
production) for everything measured; it is VACUUM ANALYZEd after the load, as autovacuum
would do; SQLite is not (the service never runs ANALYZE).

Run: ``python bench/bench_sessions.py`` (full size; writes bench/results/sessions.json)
or e.g. ``--sessions 20 --datasets 20000 --skip-browser`` (writes sessions.quick.json).
``--work DIR --keep`` keeps the filled catalogs; a later run with the same ``--work``
and sizes reuses them (skips the fill and the rebuild).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_service import latencies  # noqa: E402
from service.catalog import Catalog, SessionQuery, datasets, sessions  # noqa: E402
from tests.api_helpers import start_server  # noqa: E402

GOAL_P99_MS = 50.0
GOAL_FIRST_ROWS_MS = 1000.0
FULL = (1000, 1_000_000)

#: project -> share of the sessions
PROJECTS = {"ribosome-70S": 0.38, "membrane-transporters": 0.30, "spike-variants": 0.20,
            "apoferritin-standards": 0.12}


@dataclass(frozen=True)
class Scope:
    """A microscope + camera, and what its movies look like."""
    label: str
    camera: str
    voltage: float
    nx: int
    ny: int
    mode: int
    dtype: str
    bytes_per_pixel: float
    pixel_sizes: tuple[float, ...]
    frames: tuple[int, ...]


SCOPES = (
    Scope("krios1", "K3", 300.0, 5760, 4092, 101, "uint8", 0.5, (0.826, 0.652, 1.06),
          (40, 50, 60)),
    Scope("krios2", "Falcon 4i", 300.0, 4096, 4096, 101, "uint8", 0.5, (0.73, 0.921, 1.19),
          (40, 48)),
    Scope("glacios", "DE-64", 200.0, 8192, 8192, 6, "uint16", 2.0, (0.885, 1.16),
          (30, 40)),
)


@dataclass
class SessionPlan:
    index: int
    id: str
    name: str
    project: str
    source: str
    scope: Scope
    start_us: int               # microseconds since the epoch
    duration_s: float
    movies: int
    pixel_size: float
    dose: float                 # e-/Å² over the whole movie
    exposure_s: float
    frames: int
    magnification: float
    live: bool = False          # the newest session: movies still arriving


def plan_sessions(n_sessions: int, n_datasets: int, seed: int = 20) -> list[SessionPlan]:
    """Sessions of 3 microscopes over one year, hours to days long, sizes spread around
    the mean (lognormal) with one session of exactly 1,000 movies (the refresh probe)."""
    rng = np.random.default_rng(seed)
    mean = n_datasets / n_sessions
    sizes = np.clip(rng.lognormal(np.log(mean) - 0.18, 0.6, n_sessions), 5, 8 * mean)
    probe = 1000 if n_datasets - 1000 >= 5 * (n_sessions - 1) else int(mean)
    rest = n_datasets - probe
    sizes[1:] = sizes[1:] * rest / sizes[1:].sum()
    counts = np.floor(sizes).astype(int)
    counts[0] = probe
    counts[1:] = np.maximum(counts[1:], 1)
    short = n_datasets - counts.sum()
    order = np.argsort(-(sizes[1:] - counts[1:])) + 1
    for k in range(abs(int(short))):
        counts[order[k % len(order)]] += 1 if short > 0 else -1
    assert counts.sum() == n_datasets and counts.min() >= 1
    year_end = int(np.datetime64("2026-12-01T00:00:00", "us").astype(np.int64))
    year_us = 365 * 86400 * 10**6
    projects = list(PROJECTS)
    shares = np.array(list(PROJECTS.values()))
    plans = []
    for i in range(n_sessions):
        scope = SCOPES[int(rng.choice(3, p=[0.45, 0.35, 0.20]))]
        movies = int(counts[i])
        # hours to days; no faster than ~600 movies an hour
        duration = max(float(np.exp(rng.uniform(np.log(2 * 3600), np.log(72 * 3600)))),
                       movies / 600 * 3600)
        start = year_end - year_us + int(rng.uniform(0, year_us - duration * 1e6))
        plans.append(SessionPlan(
            index=i, id=f"s{i:05d}{rng.integers(16**14):014x}", name="", project=projects[
                int(rng.choice(len(projects), p=shares))],
            source="registration" if rng.random() < 0.2 else "upload", scope=scope,
            start_us=start, duration_s=duration, movies=movies,
            pixel_size=float(rng.choice(scope.pixel_sizes)),
            dose=float(rng.uniform(40, 65)), exposure_s=float(rng.choice([1.5, 2.0, 2.5, 3.2])),
            frames=int(rng.choice(scope.frames)),
            magnification=float(rng.choice([81000, 105000, 130000, 165000]))))
    plans.sort(key=lambda p: p.start_us)
    plans[-1].live = True
    grids: dict[tuple[str, str], int] = {}
    for p in plans:
        day = str(np.datetime64(p.start_us, "us"))[:10].replace("-", "")
        k = grids[(p.project, day)] = grids.get((p.project, day), 0) + 1
        p.name = f"{day}_{p.scope.label}_grid{k:02d}"
    return plans


def iso(us: np.ndarray) -> list[str]:
    """Catalog time text (fixed-width ISO 8601 UTC, microseconds)."""
    return [s + "+00:00" for s in np.datetime_as_string(us.astype("datetime64[us]"),
                                                        unit="us")]


FINDINGS = (
    ("data", "file holds {have:,} bytes of frame data; the header declares {nz} frames of "
             "{frame:,} bytes: {missing} frames missing (truncated transfer?)"),
    ("nz", "header declares 0 frames"),
    ("mode", "mode 101 (4-bit) needs an even NX; header says NX = {nx_odd}"),
    ("extended", "NSYMBT {nsymbt:,} runs past the end of the file"),
)


def session_rows(p: SessionPlan, seed: int = 7) -> list[dict[str, Any]]:
    """The datasets of one session, oldest first, as the catalog holds them once their
    ingest finished (the live session's last movies still in flight); the JSON columns
    as their JSON text."""
    rng = np.random.default_rng([seed, p.index])
    n, s = p.movies, p.scope
    offsets = np.sort(rng.uniform(0, p.duration_s, n))
    created_us = p.start_us + (offsets * 1e6).astype(np.int64)
    created = iso(created_us)
    updated = iso(created_us + rng.uniform(15e6, 120e6, n).astype(np.int64))
    status = rng.choice(np.array(["ready", "rejected", "failed"]), n,
                        p=[0.945, 0.04, 0.015]).astype("U10")
    if p.live:
        status[-min(n, 24):] = rng.choice(np.array(["receiving", "queued", "processing"]),
                                          min(n, 24))
    frames = np.full(n, p.frames)
    frames[rng.random(n) < 0.003] = p.frames // 2   # a few shorter exposures
    frame_bytes = int(s.nx * s.ny * s.bytes_per_pixel)
    size = 1024 + frames * frame_bytes
    truncated = (status == "rejected") & (rng.random(n) < 0.7)
    size[truncated] = (size[truncated] * rng.uniform(0.2, 0.95, truncated.sum())).astype(int)
    ratio = np.clip(rng.normal(0.27 if s.mode == 101 else 0.45, 0.03, n), 0.15, 0.8)
    stored = (size * ratio).astype(np.int64) + 4096
    pixel = np.round(p.pixel_size + rng.normal(0, 0.0004, n), 4)
    dose = np.round(p.dose * (1 + rng.normal(0, 0.015, n)), 3)
    hole0 = int(rng.integers(10**7, 9 * 10**7))
    acq = rng.integers(10**7, 10**8, n)
    falloff = rng.uniform(0.02, 0.12, n)
    counts_mean = p.dose / p.frames * p.pixel_size ** 2
    standout = np.zeros(n, dtype=int)
    standout[(status == "ready") & (rng.random(n) < 0.008)] = 1
    standout[standout.astype(bool) & (rng.random(n) < 0.3)] = 2
    ids = [f"{a:016x}{b:04x}" for a, b in rng.integers(0, 2**63, (n, 2)) % [2**64, 2**16]]
    sha = [f"{a:016x}{b:016x}{c:016x}{d:016x}" for a, b, c, d in rng.integers(0, 2**63, (n, 4))]
    maximum = 16 if s.mode == 101 else 400

    def series(falloff_: float, nz: int, blanked: int = 0) -> str:
        """A movie's per-frame statistics as the catalog keeps them (JSON text)."""
        means = counts_mean * (1 - falloff_ * np.arange(nz) / max(1, p.frames - 1)) * (
            1 + rng.normal(0, 0.002, nz))
        if blanked:
            means[rng.choice(nz, blanked, replace=False)] = 0.0
        return json.dumps({"mean": means.tolist(),
                           "std": np.sqrt(np.maximum(means, 1e-9) * 1.02).tolist(),
                           "min": [0] * nz, "max": rng.integers(9, maximum, nz).tolist()})

    # JSON-encoding 200 floats per movie would be most of the fill's time: most movies take
    # one of 48 series made for the session (same sizes, same shape of numbers); those with
    # frames standing out or another frame count get their own
    pool = [series(float(falloff[k]), p.frames) for k in range(min(n, 48))]
    timings = np.round(rng.uniform((2, 0.4, 1, 4), (9, 2, 6, 18), (n, 4)), 3).tolist()
    status, size, stored = status.tolist(), size.tolist(), stored.tolist()
    pixel, dose, frames, acq = pixel.tolist(), dose.tolist(), frames.tolist(), acq.tolist()
    inverse = np.round(1 / ratio, 4).tolist()
    truncated, standout = truncated.tolist(), standout.tolist()
    dmean, rms = round(counts_mean, 6), round(float(np.sqrt(counts_mean)), 6)
    rows = []
    for i in range(n):
        st = status[i]
        nz = frames[i]
        stamp = created[i]
        ds_id = ids[i]
        name = (f"FoilHole_{hole0 + i // 4}_Data_{p.index * 7 + 1000000 + i % 4}_{acq[i]}_"
                f"{stamp[0:4]}{stamp[5:7]}{stamp[8:10]}_{stamp[11:13]}{stamp[14:16]}"
                f"{stamp[17:19]}_fractions.mrc")
        fstats = None
        if st in ("ready", "rejected"):
            fstats = (pool[i % len(pool)] if nz == p.frames and not standout[i]
                      else series(float(falloff[i]), nz, standout[i]))
        findings = []
        if st == "rejected":
            field_, text = FINDINGS[0] if truncated[i] else FINDINGS[1 + i % 3]
            findings = [{"severity": "error", "field": field_, "message": text.format(
                have=size[i] - 1024, nz=nz, frame=frame_bytes, nx_odd=s.nx + 1,
                missing=max(1, nz - (size[i] - 1024) // frame_bytes),
                nsymbt=size[i] * 2)}]
        settled = st in ("ready", "rejected")
        info: dict[str, Any] = {"findings": findings}
        if settled:
            info.update({
                "storage": {"form": "archive" if p.source == "upload" else "registered",
                            "keys": {"archive": f"datasets/{ds_id}/archive.mrcz",
                                     "restore": f"datasets/{ds_id}/restore.json",
                                     "sum": f"datasets/{ds_id}/sum.npy"},
                            "bytes": {"archive": stored[i] - 4096, "restore": 612,
                                      "sum": 3484}, "received_bytes": size[i]},
                "timings": dict(zip(("receive_s", "validate_s", "archive_s", "total_s"),
                                    timings[i])),
                "file": {"nx": s.nx, "ny": s.ny, "nz": nz, "mode": s.mode,
                         "pixel_size_angstrom": [pixel[i]] * 3, "nsymbt": 0,
                         "exttyp": "", "nversion": 20140, "machst": "little-endian",
                         "labels": [f"EPU {p.scope.label} {stamp[:10]}"]},
                "default_mode": s.mode,
                "stats": {"dmin": 0.0, "dmax": 15.0, "dmean": dmean, "rms": rms},
                "sum": {"frames": nz, "bin": [4, 4]},
                "archive": {"codec": "zstd", "clevel": 1, "bytes": stored[i] - 4096,
                            "restorable": True, "reason": None,
                            "ratio_to_original": inverse[i]},
            })
        rows.append({
            "id": ds_id, "name": name, "source": p.source, "status": st,
            "created_at": stamp, "updated_at": updated[i] if settled or st == "failed"
            else stamp, "size_bytes": size[i], "sha256": sha[i] if settled else None,
            "path": (f"/facility/{p.project}/{p.name}/{name}" if p.source == "registration"
                     else f"uploads/{ds_id}/{name}"),
            "mode": s.mode if settled else None, "nx": s.nx if settled else None,
            "ny": s.ny if settled else None, "nz": nz if settled else None,
            "dtype": s.dtype if settled else None,
            "pixel_size": pixel[i] if settled else None,
            "stored_bytes": stored[i] if settled else None,
            "voltage_kv": s.voltage if settled else None,
            "total_dose": dose[i] if settled else None,
            "exposure_s": p.exposure_s if settled else None,
            "magnification": p.magnification if settled else None,
            "camera": s.camera if settled else None,
            "frame_stats": fstats,
            "progress": json.dumps({"phase": "processing", "done": 10, "total": nz,
                                    "unit": "frames"}) if st == "processing" else None,
            "info": json.dumps(info), "session_id": p.id, "project": p.project,
            "standout_frames": standout[i] if settled else None,
        })
    return rows


def rows_fingerprint() -> str:
    """What the filled rows depend on (a kept catalog is reused only if unchanged)."""
    import hashlib
    import inspect

    code = "".join(inspect.getsource(f) for f in (plan_sessions, session_rows, session_row))
    return hashlib.sha256((code + repr(SCOPES) + repr(PROJECTS)).encode()).hexdigest()[:12]


def session_row(p: SessionPlan) -> dict[str, Any]:
    stamp = iso(np.array([p.start_us - 60 * 10**6]))[0]
    return {"id": p.id, "name": p.name, "project": p.project, "source": p.source,
            "created_at": stamp, "updated_at": stamp, "summary": {}}


# -- filling -------------------------------------------------------------------------------

def _secondary_sqlite(conn: sa.Connection) -> list[tuple[str, str, str]]:
    return [tuple(r) for r in conn.exec_driver_sql(
        "SELECT type, name, sql FROM sqlite_master WHERE tbl_name = 'datasets' "
        "AND type IN ('index', 'trigger') AND sql IS NOT NULL").all()]


def _secondary_postgres(conn: sa.Connection) -> list[tuple[str, str, str]]:
    return [("index", name, sql) for name, sql in conn.exec_driver_sql(
        "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i "
        "WHERE i.indrelid = 'datasets'::regclass AND NOT i.indisprimary AND NOT EXISTS "
        "(SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)").all()]


def fill(url: str, plans: list[SessionPlan], log) -> dict[str, Any]:
    """Sessions rows, then every dataset in bulk; returns the phases' seconds."""
    catalog = Catalog(url)            # creates the schema by migrating
    engine = catalog.engine
    postgres = catalog.is_postgres
    t0 = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(sessions.insert(), [session_row(p) for p in plans])
        secondary = (_secondary_postgres if postgres else _secondary_sqlite)(conn)
        for kind, name, _sql in secondary:
            conn.exec_driver_sql(f'DROP {kind.upper()} "{name}"' if not postgres
                                 else f"DROP INDEX {name}")
    columns = [c.name for c in datasets.c]
    t_insert = time.perf_counter()
    written = 0
    generate_s = 0.0

    def batches(size: int) -> Iterator[list[tuple]]:
        nonlocal generate_s
        batch: list[tuple] = []
        for k, p in enumerate(plans):
            g = time.perf_counter()
            batch += [tuple(r[c] for c in columns) for r in session_rows(p)]
            generate_s += time.perf_counter() - g
            if len(batch) >= size or k == len(plans) - 1:
                yield batch
                batch = []

    if postgres:
        raw = engine.raw_connection()
        try:
            cur = raw.cursor()
            with cur.copy(f"COPY datasets ({', '.join(columns)}) FROM STDIN") as copy:
                for batch in batches(20_000):
                    for row in batch:
                        copy.write_row(row)
                    written += len(batch)
                    log(f"    {written:,} rows")
            raw.commit()
        finally:
            raw.close()
    else:
        insert = (f"INSERT INTO datasets ({', '.join(columns)}) "
                  f"VALUES ({', '.join('?' * len(columns))})")
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA cache_size=-1000000")
            for batch in batches(50_000):
                conn.exec_driver_sql(insert, batch)
                conn.commit()
                written += len(batch)
                log(f"    {written:,} rows")
    insert_s = time.perf_counter() - t_insert
    t_index = time.perf_counter()
    with engine.connect() as conn:
        if postgres:
            conn.exec_driver_sql("SET maintenance_work_mem = '1GB'")
        else:
            conn.exec_driver_sql("PRAGMA cache_size=-1000000")
        for kind, _name, sql in sorted(secondary, key=lambda s: s[0] != "index"):
            conn.exec_driver_sql(sql)
            conn.commit()
        index_s = time.perf_counter() - t_index
        t_fts = time.perf_counter()
        if not postgres and any(name == "datasets_name_ai" for _k, name, _s in secondary):
            conn.exec_driver_sql("INSERT INTO datasets_name(datasets_name) VALUES ('rebuild')")
            conn.commit()
        fts_s = time.perf_counter() - t_fts
    t_analyze = time.perf_counter()
    if postgres:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    else:
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    analyze_s = time.perf_counter() - t_analyze
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(datasets)).scalar() \
            == written
    catalog.close()
    return {"datasets": written, "total_s": round(time.perf_counter() - t0, 1),
            "insert_s": round(insert_s, 1), "of_which_generate_rows_s": round(generate_s, 1),
            "recreate_indexes_and_triggers_s": round(index_s, 1),
            "fts_rebuild_s": round(fts_s, 1),
            ("vacuum_analyze_s" if postgres else "wal_checkpoint_s"): round(analyze_s, 1),
            "secondary_objects_recreated": len(secondary)}


# -- measuring -----------------------------------------------------------------------------

def stats_ms(values: list[float]) -> dict[str, float]:
    a = np.array(values) * 1000
    return {"n": len(values), "p50": round(float(np.percentile(a, 50)), 2),
            "p95": round(float(np.percentile(a, 95)), 2),
            "p99": round(float(np.percentile(a, 99)), 2), "max": round(float(a.max()), 2)}


def capture_sql(catalog: Catalog, call) -> tuple[str, Any]:
    """The last SELECT ``call`` sends (statement, parameters) as the driver gets it."""
    seen: list[tuple[str, Any]] = []

    def hook(_conn, _cursor, statement, parameters, _context, _many):
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    sa.event.listen(catalog.engine, "before_cursor_execute", hook)
    try:
        call()
    finally:
        sa.event.remove(catalog.engine, "before_cursor_execute", hook)
    return seen[-1]


def explain(catalog: Catalog, statement: str, parameters: Any) -> list[str]:
    with catalog.engine.connect() as conn:
        if catalog.is_postgres:
            rows = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement,
                                        parameters).all()
            return [r[0] for r in rows]
        rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
        return [r[-1] for r in rows]


def in_process(catalog: Catalog, queries: dict[str, SessionQuery], n: int) -> dict[str, Any]:
    """Where a list request's time goes, in this process: the catalog call whole
    (query, rows, JSON decode of ``summary``), the same statement's rows alone, and the
    summaries' JSON text size."""
    out: dict[str, Any] = {}
    for label, q in queries.items():
        statement, parameters = capture_sql(catalog, lambda: catalog.list_sessions(q))
        whole = []
        for _ in range(n):
            t = time.perf_counter()
            catalog.list_sessions(q)
            whole.append(time.perf_counter() - t)
        raw = []
        with catalog.engine.connect() as conn:
            for _ in range(n):
                t = time.perf_counter()
                rows = conn.exec_driver_sql(statement, parameters).all()
                raw.append(time.perf_counter() - t)
        summary_at = list(sessions.c.keys()).index("summary")
        texts = [r[summary_at] for r in rows]
        text_bytes = sum(len(t if isinstance(t, str) else json.dumps(t)) for t in texts)
        out[label] = {"catalog_list_sessions_ms": stats_ms(whole),
                      "sql_rows_only_ms": stats_ms(raw), "rows": len(rows),
                      "summary_json_bytes_per_page": text_bytes,
                      "plan": explain(catalog, statement, parameters)}
    return out


def without_summary(catalog: Catalog, n: int) -> dict[str, Any]:
    """The default first page read two other ways, to size a fix: (a) every column but
    ``summary`` plus the three parts of it the list shows, extracted by the database
    (SQLAlchemy's JSON index operators: json_extract on SQLite, -> on PostgreSQL);
    (b) every column but ``summary`` (what small columns of their own would cost);
    (c) every column, ``summary`` fetched as text and not decoded (what the JSON decoding
    in Python costs: the difference with the whole call)."""
    c = sessions.c
    base = [col for col in c if col.name != "summary"]
    order = (c.last_movie_at.desc(), c.id.desc())
    variants = {
        "(b) without summary (what the service reads)": sa.select(*base),
        "(a) with the summary JSON decoded (before)": sa.select(*base, c.summary),
        "(c) summary as text, not decoded": sa.select(
            *base, sa.cast(c.summary, sa.Text).label("summary")),
    }
    out = {}
    for label, query in variants.items():
        query = query.where(c.last_movie_at.isnot(None)).order_by(*order).limit(51)
        values = []
        for _ in range(n):
            t = time.perf_counter()
            catalog._rows(query)
            values.append(time.perf_counter() - t)
        out[label] = stats_ms(values)
    return out


def time_refresh(catalog: Catalog, session_id: str, n: int) -> dict[str, Any]:
    values = []
    for _ in range(n):
        t = time.perf_counter()
        catalog.refresh_session(session_id)
        values.append(time.perf_counter() - t)
    return stats_ms(values)


# -- Chromium ------------------------------------------------------------------------------

#: installed before the page's own scripts: notes performance.now() when the first row
#: matching the selector is in the document with a size (laid out), and once the next
#: frame is painted (a message posted from its requestAnimationFrame callback)
OBSERVER = """
(() => {
  const selector = %s;
  const check = () => {
    if (window.__firstRow) return true;
    const el = document.querySelector(selector);
    if (!el) return false;
    const box = el.getBoundingClientRect();
    if (box.width <= 0 || box.height <= 0) return false;
    window.__firstRow = {dom: performance.now(), frame: null};
    // the next frame's rendering starts; a message posted from it runs once it is painted
    requestAnimationFrame(() => {
      const channel = new MessageChannel();
      channel.port1.onmessage = () => { window.__firstRow.frame = performance.now(); };
      channel.port2.postMessage(null);
    });
    return true;
  };
  const observer = new MutationObserver(() => { if (check()) observer.disconnect(); });
  observer.observe(document, {childList: true, subtree: true, attributes: true});
})();
"""

TIMINGS = """
const first = window.__firstRow;
if (!first || first.frame === null) return null;
const nav = performance.getEntriesByType("navigation")[0];
const list = performance.getEntriesByType("resource").find((e) => e.name.includes(arguments[0]));
const mark = performance.getEntriesByName("first-rows")[0];
return {first_row_dom: first.dom, first_row_painted: first.frame,
        page_mark_first_rows: mark ? mark.startTime : null,
        rows: document.querySelectorAll(arguments[1]).length,
        dom_content_loaded: nav ? nav.domContentLoadedEventEnd : null,
        document_response_end: nav ? nav.responseEnd : null,
        list_start: list ? list.startTime : null,
        list_ms: list ? list.responseEnd - list.startTime : null};
"""


def landing_page(selector: str | None = None) -> dict[str, str]:
    """What the landing page lists (read from service/web/ as it is now): the sessions
    table when the dashboard has one (rows ``<tr class="ses">`` in ``#s-rows``, made by
    dashboard.js's sessionRowOf), else the datasets table (bench_dashboard.py's)."""
    web = ROOT / "service" / "web"
    code = "".join(p.read_text() for p in sorted(web.glob("*.js")))
    if "/v1/sessions" in code or "v1/sessions?" in code:
        return {"list": "sessions", "selector": selector or "#s-rows tr.ses",
                "request": "/v1/sessions?"}
    return {"list": "datasets (the landing page had no sessions list yet)",
            "selector": selector or "tr.ds", "request": "/v1/datasets?"}


def first_rows(base: str, work: Path, loads: int, page: dict[str, str]) -> dict[str, Any]:
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.test_dashboard import chromium

    runs = []
    for k in range(loads):
        profile = work / f"profile-{k}"
        driver = chromium(profile)
        try:
            driver.execute_cdp_cmd("Network.enable", {})
            driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
            driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {
                "source": OBSERVER % json.dumps(page["selector"])})
            driver.get(base + "/")
            runs.append(WebDriverWait(driver, 30, poll_frequency=0.02).until(
                lambda d: d.execute_script(TIMINGS, page["request"], page["selector"])))
        finally:
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)
        time.sleep(0.5)  # let the server finish what this load asked for (thumbnails)

    def summary(key: str) -> dict[str, float] | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        if not values:
            return None
        return {"median": round(statistics.median(values), 1),
                "p95": round(float(np.percentile(values, 95)), 1),
                "min": round(min(values), 1), "max": round(max(values), 1)}

    return {"page": page, "loads": loads, "runs": runs,
            "first_row_painted_ms": summary("first_row_painted"),
            "first_row_dom_ms": summary("first_row_dom"),
            "page_mark_first_rows_ms": summary("page_mark_first_rows"),
            "reference_dom_content_loaded_ms": summary("dom_content_loaded"),
            "reference_list_request_in_browser_ms": summary("list_ms"),
            "list_request_sent_at_ms": summary("list_start"),
            "rows_shown": statistics.median([r["rows"] for r in runs])}


# -- one backend ---------------------------------------------------------------------------

def run_backend(backend: str, work: Path, plans: list[SessionPlan], args, log
                ) -> dict[str, Any]:
    from tests.postgres import Postgres, start_postgres

    folder = work / backend
    marker = folder / "filled.json"
    sizes = {"sessions": len(plans), "datasets": sum(p.movies for p in plans),
             "rows_code": rows_fingerprint()}
    reuse = marker.exists() and json.loads(marker.read_text()).get("sizes") == sizes
    if not reuse and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pg = None
    result: dict[str, Any] = {"backend": backend, "sessions": sizes["sessions"],
                              "datasets": sizes["datasets"]}
    try:
        if backend == "postgres":
            pg_folder = folder / "pg"
            if reuse:
                pg = Postgres(pg_folder, durable=True)
                pg.start()
                url = pg.url("mrc")
            else:
                pg_folder.parent.chmod(0o755)
                # the load with fsync off; everything measured after a restart with it on
                pg = start_postgres(pg_folder, durable=False)
                url = pg.create_database("mrc")
            with pg_connection(pg) as conn:
                result["postgres_version"] = conn.execute("SHOW server_version").fetchone()[0]
        else:
            url = f"sqlite:///{folder / 'data' / 'catalog.sqlite3'}"
        if reuse:
            result.update(json.loads(marker.read_text())["fill"])
            result["reused_catalog_from"] = str(marker)
            log(f"  reusing the filled catalog in {folder}")
        else:
            log(f"  filling {sizes['datasets']:,} datasets in {sizes['sessions']:,} sessions")
            result["fill"] = fill(url, plans, log)
            if pg is not None:
                pg.stop()
                pg.durable = True
                pg.start()
            log(f"  filled in {result['fill']['total_s']} s; refresh_all_sessions() ...")
            catalog = Catalog(url)
            t = time.perf_counter()
            n = catalog.refresh_all_sessions()
            took = time.perf_counter() - t
            catalog.close()
            result["refresh_all_sessions"] = {"sessions": n, "seconds": round(took, 2),
                                              "ms_per_session": round(took / n * 1000, 2)}
            marker.write_text(json.dumps({"sizes": sizes, "fill": {
                k: result[k] for k in ("fill", "refresh_all_sessions")}}))
        if backend == "sqlite":
            db = folder / "data" / "catalog.sqlite3"
            result["catalog_bytes"] = db.stat().st_size
        else:
            with pg_connection(pg) as conn:
                result["catalog_bytes"] = conn.execute(
                    "SELECT pg_database_size('mrc')").fetchone()[0]
        log(f"  refresh_all_sessions: {result['refresh_all_sessions']}")
        result["machine_busy_before_measuring"] = wait_quiet(args.wait_quiet, log)
        result.update(measure(url, folder, plans, args, log))
    finally:
        if pg is not None:
            if args.keep:
                pg.stop()
            else:
                pg.remove()
    return result


def wait_quiet(seconds: float, log, below: float = 0.5) -> float | None:
    """Wait (up to ``seconds``) until other processes leave at least one of the cores
    free; returns the busy fraction of all cores measured last (0..1)."""
    try:
        from bench.results import busy_fraction
    except ImportError:
        return None
    deadline = time.monotonic() + seconds
    busy = busy_fraction(2.0)
    while busy >= below and time.monotonic() < deadline:
        log(f"  waiting for a quieter machine before measuring: {busy:.0%} of the CPUs busy")
        busy = busy_fraction(10.0)
    return round(busy, 3)


class pg_connection:
    def __init__(self, pg):
        import psycopg
        self.conn = psycopg.connect(f"host=127.0.0.1 port={pg.port} user=postgres "
                                    "dbname=mrc", autocommit=True)

    def __enter__(self):
        return self.conn

    def __exit__(self, *exc):
        self.conn.close()


def measure(url: str, folder: Path, plans: list[SessionPlan], args, log) -> dict[str, Any]:
    out: dict[str, Any] = {}
    env = {"MRC_INGEST_DATABASE_URL": url, "MRC_INGEST_WORKERS": "0"}
    server_dir = folder / "server-data"
    server_dir.mkdir(exist_ok=True)
    with open(folder / "server.log", "ab") as server_log:
        proc, base = start_server(server_dir, "--workers", "0", env=env, stderr=server_log,
                                  timeout=300)
    n = args.requests
    try:
        projects = {}
        for p in plans:
            projects[p.project] = projects.get(p.project, 0) + 1
        project = min(projects, key=projects.get)   # the fewest sessions: the sparsest filter
        with httpx.Client(base_url=base, timeout=60) as client:
            first = client.get("/v1/sessions")
            assert first.status_code == 200, first.text
            cursor, page_limit = first.json()["next_cursor"], {}
            if cursor is None:  # a small catalog: pages of 5 to have a next one
                page_limit = {"limit": 5}
                cursor = client.get("/v1/sessions", params=page_limit).json()["next_cursor"]
            out["first_page"] = {"items": len(first.json()["items"]),
                                 "response_bytes": len(first.content)}
            cases = {
                "GET /v1/sessions (first page)": ("/v1/sessions", {}),
                f"GET /v1/sessions?project={project}": ("/v1/sessions", {"project": project}),
                "GET /v1/sessions?sort=name": ("/v1/sessions", {"sort": "name"}),
                "GET /v1/sessions?cursor= (next page)": ("/v1/sessions", {"cursor": cursor, **page_limit}),
                "reference GET /healthz": ("/healthz", {}),
                "reference GET /v1/datasets (first page)": ("/v1/datasets", {}),
            }
            for path, params in cases.values():        # warm-up
                latencies(client, path, 30, **params)
            lat = {}
            for label, (path, params) in cases.items():
                lat[label] = stats_ms(latencies(client, path, n, **params))
                log(f"  {label:44s} {lat[label]}")
            out["latency_ms"] = lat
            out["project_filtered"] = {"project": project, "sessions": projects[project]}
        catalog = Catalog(url, migrate=False)
        try:
            probe = next(p for p in plans if p.index == 0)
            largest = max(plans, key=lambda p: p.movies)
            out["refresh_session_ms"] = {
                f"{probe.movies}-dataset session": time_refresh(catalog, probe.id, 20),
                f"largest session ({largest.movies} datasets)":
                    time_refresh(catalog, largest.id, 20)}
            log(f"  refresh_session: {out['refresh_session_ms']}")
            last_page = SessionQuery()
            out["in_process"] = in_process(catalog, {
                "first page": SessionQuery(),
                "project": SessionQuery(project=project),
                "sort=name": SessionQuery(sort="name"),
                "next page": SessionQuery(cursor=catalog.list_sessions(last_page)[1]),
            }, 100)
            out["in_process_first_page_alternatives"] = without_summary(catalog, 100)
        finally:
            catalog.close()
        if not args.skip_browser:
            page = landing_page(args.row_selector)
            log(f"  Chromium: {args.loads} fresh loads of / ({page['list']})")
            try:
                out["chromium"] = first_rows(base, folder, args.loads, page)
                log(f"  first row painted: {out['chromium']['first_row_painted_ms']}")
            except Exception as exc:  # the API figures stand without it; say what failed
                out["chromium_error"] = f"{page}: {exc!r}"
                log(f"  Chromium failed: {out['chromium_error']}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return out


# -- report --------------------------------------------------------------------------------

def print_table(r: dict[str, Any]) -> None:
    print(f"\n## {r['backend']}: {r['sessions']:,} sessions, {r['datasets']:,} datasets"
          f"{' (PostgreSQL ' + r['postgres_version'] + ')' if 'postgres_version' in r else ''}"
          f", catalog {r['catalog_bytes'] / 2**30:.2f} GiB")
    f = r["fill"]
    print(f"  fill {f['total_s']:.0f} s: insert {f['insert_s']:.0f} s (rows generated in "
          f"{f['of_which_generate_rows_s']:.0f} s of it), {f['secondary_objects_recreated']} "
          f"indexes/triggers re-created {f['recreate_indexes_and_triggers_s']:.0f} s"
          + (f", FTS rebuild {f['fts_rebuild_s']:.0f} s" if f['fts_rebuild_s'] else ""))
    busy = r.get("machine_busy_before_measuring")
    if busy is not None:
        print(f"  (all cores {busy:.0%} busy just before measuring)")
    ra = r["refresh_all_sessions"]
    print(f"  refresh_all_sessions() (a rebuild): {ra['seconds']:.1f} s for {ra['sessions']:,}"
          f" sessions ({ra['ms_per_session']:.1f} ms each)")
    print(f"  {'latency over loopback, ms':46s} {'n':>4s} {'p50':>7s} {'p95':>7s} {'p99':>7s}"
          f" {'max':>7s}")
    for label, s in r["latency_ms"].items():
        goal = "" if label.startswith("reference") else (
            "  ok" if s["p99"] < GOAL_P99_MS else f"  MISSES p99 < {GOAL_P99_MS:.0f}")
        print(f"  {label:46s} {s['n']:4d} {s['p50']:7.2f} {s['p95']:7.2f} {s['p99']:7.2f} "
              f"{s['max']:7.2f}{goal}")
    print(f"  first page: {r['first_page']['items']} sessions, "
          f"{r['first_page']['response_bytes']:,} bytes")
    for label, s in r["refresh_session_ms"].items():
        print(f"  refresh_session, {label:38s} {s['n']:4d} {s['p50']:7.2f} {s['p95']:7.2f} "
              f"{s['p99']:7.2f} {s['max']:7.2f}")
    for label, s in r["in_process"].items():
        print(f"  in-process {label:12s}: list_sessions p50 "
              f"{s['catalog_list_sessions_ms']['p50']:.2f} ms, its SQL rows alone p50 "
              f"{s['sql_rows_only_ms']['p50']:.2f} ms, summaries "
              f"{s['summary_json_bytes_per_page']:,} bytes of JSON per page; plan: "
              + " | ".join(line.strip() for line in s["plan"] if r["backend"] == "sqlite"
                           or "Scan" in line or "Sort" in line or "Execution" in line))
    for label, s in r["in_process_first_page_alternatives"].items():
        print(f"  in-process first page, {label}: p50 {s['p50']:.2f} ms, p99 {s['p99']:.2f} ms")
    if "chromium_error" in r:
        print(f"  Chromium: FAILED {r['chromium_error']}")
    c = r.get("chromium")
    if c:
        fr = c["first_row_painted_ms"]
        ok = "ok" if fr["median"] < GOAL_FIRST_ROWS_MS and fr["p95"] < GOAL_FIRST_ROWS_MS \
            else f"MISSES < {GOAL_FIRST_ROWS_MS:.0f}"
        print(f"  Chromium, {c['loads']} fresh loads of / ({c['page']['list']}, first "
              f"'{c['page']['selector']}'): first row painted median {fr['median']:.0f} ms, "
              f"p95 {fr['p95']:.0f} ms, max {fr['max']:.0f} ms  {ok}")
        dom, dcl = c["first_row_dom_ms"], c["reference_dom_content_loaded_ms"]
        lr, sent = c["reference_list_request_in_browser_ms"], c["list_request_sent_at_ms"]
        print(f"    in the DOM median {dom['median']:.0f} ms; reference: DOMContentLoaded "
              f"median {dcl['median']:.0f} ms; list request sent at median "
              f"{sent['median'] if sent else float('nan'):.0f} ms, took median "
              f"{lr['median'] if lr else float('nan'):.1f} ms; {c['rows_shown']:.0f} rows")


def _begin(wait_quiet: float = 0.0) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


def _save(name: str, figures: dict[str, Any], *, args: dict[str, Any], quick: bool,
          started: str, extra_packages: tuple[str, ...] = ()) -> Path:
    import platform
    import subprocess
    from importlib import metadata

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    versions = {}
    for package in ("sqlalchemy", "numpy", *extra_packages):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    record = {"benchmark": name, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in args.items()},
              "started": started, "finished": _begin(),
              "machine": {"cores": os.cpu_count(), "cpu_model": cpu,
                          "python": platform.python_version(), "versions": versions,
                          "git_commit": commit, "load_average_at_save": os.getloadavg()},
              "figures": figures}
    path = ROOT / "bench" / "results" / f"{name}{'.quick' if quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\nresults: {path}")
    return path


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=FULL[0])
    parser.add_argument("--datasets", type=int, default=FULL[1])
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--skip-browser", action="store_true")
    parser.add_argument("--requests", type=int, default=300, help="per latency figure")
    parser.add_argument("--loads", type=int, default=7, help="fresh Chromium loads")
    parser.add_argument("--row-selector", default=None, help="CSS selector of the landing "
                        "page's first row (default: the sessions table's, read from the "
                        "dashboard's code)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a "
                        "new temporary one, removed after unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the filled catalogs")
    parser.add_argument("--wait-quiet", type=float, default=120.0,
                        help="before each backend's measurements, wait up to this long "
                        "for other processes to leave a core free")
    args = parser.parse_args()
    try:
        from bench.results import begin, save
    except ImportError:   # bench/results.py not there: the same record, written here
        begin, save = _begin, _save

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    assert set(backends) <= {"sqlite", "postgres"}, backends
    started = begin(wait_quiet=0.0)  # the fill needs no quiet machine; measuring does
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-sessions-"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)   # the postgres user reaches its cluster's folder through it
    t0 = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - t0:7.1f} s] {message}", flush=True)

    plans = plan_sessions(args.sessions, args.datasets)
    results = {}
    try:
        for backend in backends:
            log(f"{backend}:")
            results[backend] = run_backend(backend, work, plans, args, log)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    for r in results.values():
        print_table(r)
    movies = [p.movies for p in plans]
    figures = {
        "goals": {"sessions_p99_ms": GOAL_P99_MS, "first_rows_ms": GOAL_FIRST_ROWS_MS},
        "catalog": {"sessions": len(plans), "datasets": sum(movies),
                    "projects": sorted({p.project for p in plans}),
                    "movies_per_session": {"min": min(movies), "median": statistics.median(
                        movies), "max": max(movies)},
                    "probe_session_movies": plans[[p.index for p in plans].index(0)].movies},
        "backends": results,
    }
    quick = (args.sessions, args.datasets) != FULL
    save("sessions", figures, args=vars(args), quick=quick, started=started,
         extra_packages=("psycopg", "httpx", "selenium", "fastapi", "uvicorn"))


if __name__ == "__main__":
    main()
