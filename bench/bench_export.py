"""Export benchmark (issue #20 item 4): ``GET /v1/sessions/{id}/movies.star`` and
``movies.csv`` of a 10,000-movie session, on SQLite and PostgreSQL, beside references
measured in the same run. Goal: movies.star in < 2 s, streamed.

The catalog is filled through the schema's own tables (``Catalog(url)`` migrates an
empty one): one session of ``--movies`` ready movies (EPU-style names, sizes of a few
hundred MB, one every ~15 s over two days with jitter, two optics groups: 0.83 Å and
1.06 Å at 300 kV, 4096 x 4096, mode 101) plus rejected, failed and in-flight ones
(3 % more, left out of the STAR file), and ``--others`` datasets in 20 other sessions, so
the session's rows are found through its index among others. Bulk inserts (SQLAlchemy
executemany); the session's figures are then computed by ``refresh_session``.

The real app runs as ``mrc-ingest serve`` in its own process (``--workers 0``,
``MRC_INGEST_DATABASE_URL``, ``MRC_INGEST_DATA_DIR``); each export is fetched over
loopback with httpx (one keep-alive connection), one warm-up then ``--repeats`` timed
requests: the median of the whole download and of the time to its first body byte
(headers come first; the first bytes arrive once the first pass has read the optics
groups, long before the last: it streams). Every download is checked: starfile reads
the STAR file back (groups, movie count), csv counts the CSV's rows.

References, same run, same catalog:

* ``select``: the same rows and columns in one plain ``SELECT ... ORDER BY created_at,
  id`` fetched whole, in-process (the floor of reading them once; the export reads
  them twice, in keyset pages);
* ``session_movies``: one pass of ``catalog.session_movies`` (keyset pages) in-process;
* ``starfile.write``: the same STAR content written by starfile (teamtomo) from pandas
  DataFrames built from rows already in memory (DataFrame building included);
* ``writer``: our writer alone over rows in memory (no catalog, no HTTP);
* ``healthz``: the HTTP round trip floor.

Run: ``python bench/bench_export.py`` (writes bench/results/export.json) or ``--quick``
(1,000 movies, SQLite only, export.quick.json).
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.results import begin, save  # noqa: E402
from service import export  # noqa: E402
from service.catalog import Catalog, datasets, sessions  # noqa: E402
from tests.api_helpers import start_server  # noqa: E402

GOAL_S = 2.0
OPTICS = {"cs_mm": 2.7, "amplitude_contrast": 0.1}
#: (pixel size, voltage, nx, ny, mode) of the two optics groups, and their shares
GROUPS = [((0.83, 300.0, 4096, 4096, 101), 0.6), ((1.06, 300.0, 4096, 4096, 101), 0.4)]
START = datetime(2026, 12, 3, 8, 0, tzinfo=timezone.utc)


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


def movie_rows(session_id: str, project: str, n_ready: int, seed: int) -> list[dict]:
    """``n_ready`` ready movies and 3 % more that are not (rejected, failed, in flight),
    one every ~15 s; the optics group changes with the grid square (blocks of 40)."""
    rng = np.random.default_rng(seed)
    extra = max(3, n_ready * 3 // 100)
    statuses = ["ready"] * n_ready + ["rejected"] * (extra // 2) + \
        ["failed"] * (extra // 6) + ["queued"] * (extra - extra // 2 - extra // 6)
    rng.shuffle(statuses)
    gaps = rng.gamma(4.0, 15.0 / 4.0, size=len(statuses))
    moments = np.cumsum(gaps)
    rows = []
    group_bounds = np.cumsum([share for _key, share in GROUPS])
    for i, status in enumerate(statuses):
        square = i // 40
        pick = float(np.random.default_rng(seed * 1_000_003 + square).random())
        group = min(int(np.searchsorted(group_bounds, pick, side="right")), len(GROUPS) - 1)
        key = GROUPS[group][0]
        stamp = START + timedelta(seconds=float(moments[i]))
        size = int(rng.integers(300, 900)) << 20
        done = status in ("ready", "rejected")
        rows.append({
            "id": uuid.uuid4().hex[:20],
            "name": f"FoilHole_{3_000_000 + square}_Data_{i % 40}_{i % 7}_"
                    f"{stamp:%Y%m%d_%H%M%S}_fractions.mrc",
            "source": "upload", "status": status,
            "created_at": iso(stamp), "updated_at": iso(stamp + timedelta(seconds=40)),
            "size_bytes": size, "sha256": uuid.uuid4().hex * 2, "path": "",
            "mode": key[4], "nx": key[2], "ny": key[3], "nz": 40 + i % 8,
            "dtype": "uint8", "stored_bytes": size // 3 if done else None,
            "pixel_size": key[0] if done else None,
            "voltage_kv": key[1] if done else None,
            "total_dose": round(float(rng.normal(50, 1.5)), 3) if done else None,
            "exposure_s": 2.5 if done else None, "magnification": 105000.0 if done else None,
            "camera": "Falcon 4i" if done else None,
            "frame_stats": None, "progress": {"phase": "queued"} if status == "queued" else None,
            "info": {}, "session_id": session_id, "project": project,
            "standout_frames": 0 if done else None})
    return rows


def fill(url: str, movies: int, others: int, log) -> dict[str, Any]:
    """The session under test and 20 others; returns its id and the phases' seconds."""
    catalog = Catalog(url)  # creates the schema by migrating
    t0 = time.perf_counter()
    stamp = iso(START)
    plan = [("krios2_20261203_grid7", "ribosome-70S", movies)] + \
        [(f"krios2_202612{d:02d}_grid{d}", "spike-variants", others // 20)
         for d in range(1, 21)]
    ids = [uuid.uuid4().hex[:20] for _ in plan]
    with catalog.engine.begin() as conn:
        conn.execute(sessions.insert(), [
            {"id": sid, "name": name, "project": project, "source": "upload",
             "created_at": stamp, "updated_at": stamp, "summary": {}}
            for sid, (name, project, _n) in zip(ids, plan)])
    written = 0
    for k, (sid, (_name, project, n)) in enumerate(zip(ids, plan)):
        rows = movie_rows(sid, project, n, seed=k + 1)
        with catalog.engine.begin() as conn:
            for start in range(0, len(rows), 5000):
                conn.execute(datasets.insert(), rows[start:start + 5000])
        written += len(rows)
    insert_s = time.perf_counter() - t0
    t = time.perf_counter()
    if catalog.is_postgres:
        with catalog.engine.connect().execution_options(
                isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    for sid in ids:
        catalog.refresh_session(sid)
    figures_s = time.perf_counter() - t
    session = catalog.get_session(ids[0])
    catalog.close()
    log(f"  filled {written:,} datasets in {insert_s:.1f} s; figures in {figures_s:.1f} s")
    return {"session_id": ids[0], "session": session, "datasets": written,
            "insert_s": round(insert_s, 2), "figures_s": round(figures_s, 2)}


def fetch(client: httpx.Client, url: str, params: dict) -> tuple[float, float, float, bytes]:
    """(seconds to the headers, to the first body byte, to the last) and the body."""
    t = time.perf_counter()
    with client.stream("GET", url, params=params) as response:
        headers_s = time.perf_counter() - t
        assert response.status_code == 200, response.read()
        first = None
        parts = []
        for chunk in response.iter_raw():
            if first is None:
                first = time.perf_counter() - t
            parts.append(chunk)
    return headers_s, first or 0.0, time.perf_counter() - t, b"".join(parts)


def timed(client, url: str, params: dict, repeats: int, check) -> dict[str, Any]:
    fetch(client, url, params)  # warm-up
    runs = [fetch(client, url, params) for _ in range(repeats)]
    for run in runs:
        check(run[3])
    return {"median_s": round(statistics.median(r[2] for r in runs), 4),
            "first_byte_median_s": round(statistics.median(r[1] for r in runs), 4),
            "headers_median_s": round(statistics.median(r[0] for r in runs), 4),
            "runs_s": [round(r[2], 4) for r in runs], "bytes": len(runs[0][3]),
            "chunks_note": "first byte = first body bytes received"}


def check_star(ready: int, tmp: Path):
    import starfile

    def check(body: bytes) -> None:
        path = tmp / "check.star"
        path.write_bytes(body)
        blocks = starfile.read(path, always_dict=True)
        assert len(blocks["optics"]) == len(GROUPS), blocks["optics"]
        assert len(blocks["movies"]) == ready, len(blocks["movies"])
    return check


def check_csv(rows: int):
    def check(body: bytes) -> None:
        read = list(csv.DictReader(io.StringIO(body.decode("utf-8"), newline="")))
        assert len(read) == rows, len(read)
    return check


def references(url: str, session_id: str, session: dict, repeats: int, tmp: Path
               ) -> dict[str, Any]:
    """In-process references over the same rows."""
    import pandas as pd
    import starfile

    catalog = Catalog(url)
    d = datasets.c
    out: dict[str, Any] = {}

    def median_of(call) -> float:
        call()
        values = []
        for _ in range(repeats):
            t = time.perf_counter()
            call()
            values.append(time.perf_counter() - t)
        return round(statistics.median(values), 4)

    query = sa.select(*export.STAR_COLUMNS).where(
        d.session_id == session_id, d.status != "deleting").order_by(d.created_at, d.id)

    def select_all():
        with catalog.engine.connect() as conn:
            return conn.execute(query).all()
    out["select_s"] = median_of(select_all)
    out["session_movies_one_pass_s"] = median_of(
        lambda: sum(1 for _ in catalog.session_movies(session_id, export.STAR_COLUMNS)))
    csv_query = sa.select(*export.CSV_DATASET_COLUMNS).where(
        d.session_id == session_id, d.status != "deleting").order_by(d.created_at, d.id)

    def select_csv():
        with catalog.engine.connect() as conn:
            return conn.execute(csv_query).all()
    out["select_csv_columns_s"] = median_of(select_csv)
    rows = list(catalog.session_movies(session_id, export.STAR_COLUMNS))
    catalog.close()

    base = "http://127.0.0.1:8000/v1/datasets/"

    def with_starfile():
        ready = [r for r in rows if r["status"] == "ready"]
        keys: dict[tuple, int] = {}
        for r in ready:
            keys.setdefault(tuple(r[k] for k in export.OPTICS_KEY), len(keys) + 1)
        optics = pd.DataFrame({
            "rlnOpticsGroupName": [f"opticsGroup{n}" for n in keys.values()],
            "rlnOpticsGroup": list(keys.values()),
            "rlnMicrographOriginalPixelSize": [k[0] for k in keys],
            "rlnVoltage": [k[1] for k in keys],
            "rlnSphericalAberration": [OPTICS["cs_mm"]] * len(keys),
            "rlnAmplitudeContrast": [OPTICS["amplitude_contrast"]] * len(keys)})
        movies = pd.DataFrame({
            "rlnMicrographMovieName": [f"{base}{r['id']}/download" for r in ready],
            "rlnOpticsGroup": [keys[tuple(r[k] for k in export.OPTICS_KEY)]
                               for r in ready]})
        starfile.write({"optics": optics, "movies": movies}, tmp / "reference.star",
                       overwrite=True)
    out["starfile_write_s"] = median_of(with_starfile)

    def ours():
        text = export.movies_star(
            lambda: rows, export.Optics(OPTICS["cs_mm"], OPTICS["amplitude_contrast"]),
            export.movie_url(f"{base}ID/download", "ID"), session)
        for _chunk in export.utf8(text):
            pass
    out["writer_only_s"] = median_of(ours)
    return out


def run_backend(backend: str, work: Path, args, log) -> dict[str, Any]:
    from tests.postgres import start_postgres

    folder = work / backend
    data = folder / "data"
    data.mkdir(parents=True)
    pg = None
    result: dict[str, Any] = {"backend": backend}
    try:
        if backend == "postgres":
            folder.chmod(0o755)
            pg = start_postgres(folder / "pg", durable=True)
            url = pg.create_database("mrc")
        else:
            url = f"sqlite:///{data / 'catalog.sqlite3'}"
        filled = fill(url, args.movies, args.others, log)
        session_id, session = filled.pop("session_id"), filled.pop("session")
        result["fill"] = filled
        result["session"] = {k: session[k] for k in ("movies", "ready", "rejected", "failed",
                                                     "in_flight")}
        env = {"MRC_INGEST_DATABASE_URL": url, "MRC_INGEST_WORKERS": "0"}
        with open(folder / "server.log", "ab") as server_log:
            proc, base = start_server(data, "--workers", "0", env=env, stderr=server_log,
                                      timeout=300)
        try:
            with httpx.Client(base_url=base, timeout=120) as client:
                healthz = []
                for _ in range(50):
                    t = time.perf_counter()
                    client.get("/healthz")
                    healthz.append(time.perf_counter() - t)
                result["healthz_median_s"] = round(statistics.median(healthz), 5)
                star_url = f"/v1/sessions/{session_id}/movies.star"
                result["movies_star"] = timed(client, star_url, OPTICS, args.repeats,
                                              check_star(session["ready"], folder))
                log(f"  movies.star: {result['movies_star']['median_s']} s, first byte "
                    f"{result['movies_star']['first_byte_median_s']} s")
                result["movies_star_prefix"] = timed(
                    client, star_url, {**OPTICS, "prefix": "/mnt/store/"}, args.repeats,
                    check_star(session["ready"], folder))
                result["movies_csv"] = timed(client, f"/v1/sessions/{session_id}/movies.csv",
                                             {}, args.repeats, check_csv(session["movies"]))
                log(f"  movies.csv: {result['movies_csv']['median_s']} s, first byte "
                    f"{result['movies_csv']['first_byte_median_s']} s")
                rss = [line for line in Path(f"/proc/{proc.pid}/status").read_text()
                       .splitlines() if line.startswith("VmHWM:")]
                result["server_peak_rss_kib"] = int(rss[0].split()[1]) if rss else None
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        result["references"] = references(url, session_id, session, args.repeats, folder)
        log(f"  references: {result['references']}")
    finally:
        if pg is not None:
            pg.remove()
    return result


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"\n{'':34}" + "".join(f"{r['backend']:>15}" for r in results))
    rows = [("session movies (ready)", lambda r: f"{r['session']['movies']} "
             f"({r['session']['ready']})"),
            ("movies.star median s", lambda r: r["movies_star"]["median_s"]),
            ("  first body byte s", lambda r: r["movies_star"]["first_byte_median_s"]),
            ("  bytes", lambda r: r["movies_star"]["bytes"]),
            ("movies.star ?prefix= median s", lambda r: r["movies_star_prefix"]["median_s"]),
            ("movies.csv median s", lambda r: r["movies_csv"]["median_s"]),
            ("  first body byte s", lambda r: r["movies_csv"]["first_byte_median_s"]),
            ("  bytes", lambda r: r["movies_csv"]["bytes"]),
            ("ref: plain SELECT (STAR cols) s", lambda r: r["references"]["select_s"]),
            ("ref: plain SELECT (CSV cols) s",
             lambda r: r["references"]["select_csv_columns_s"]),
            ("ref: session_movies 1 pass s",
             lambda r: r["references"]["session_movies_one_pass_s"]),
            ("ref: starfile.write s", lambda r: r["references"]["starfile_write_s"]),
            ("ref: our writer, no DB/HTTP s", lambda r: r["references"]["writer_only_s"]),
            ("ref: GET /healthz s", lambda r: r["healthz_median_s"]),
            ("server peak RSS MiB", lambda r: round((r["server_peak_rss_kib"] or 0) / 1024))]
    for label, value in rows:
        print(f"{label:34}" + "".join(f"{value(r)!s:>15}" for r in results))
    print(f"goal: movies.star < {GOAL_S} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--movies", type=int, default=10_000, help="ready movies")
    parser.add_argument("--others", type=int, default=40_000,
                        help="datasets in other sessions")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--wait-quiet", type=float, default=120.0)
    args = parser.parse_args()
    if args.quick:
        args.movies, args.others, args.backends = 1000, 2000, "sqlite"
    backends = args.backends.split(",")
    started = begin(wait_quiet=args.wait_quiet)
    work = Path(tempfile.mkdtemp(prefix="mrc-bench-export-"))
    work.chmod(0o755)  # the postgres user reaches its cluster's folder through it

    def log(message: str) -> None:
        print(message, flush=True)
    try:
        results = []
        for backend in backends:
            log(f"{backend}:")
            results.append(run_backend(backend, work, args, log))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    figures = {"goal_movies_star_s": GOAL_S,
               "results": {r["backend"]: r for r in results},
               "met": all(r["movies_star"]["median_s"] < GOAL_S for r in results)}
    save("export", figures, args=vars(args), quick=args.quick, started=started,
         extra_packages=("starfile", "pandas", "fastapi", "starlette", "uvicorn",
                         "httpx", "psycopg"))


if __name__ == "__main__":
    main()
