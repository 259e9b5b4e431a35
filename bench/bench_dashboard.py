"""Dashboard benchmark: each figure next to a reference measured in the same run.

* (a) the dashboard's first table rows with 100k datasets in the catalog
  (``/?view=datasets``, the datasets table), in headless Chromium, from navigation start to the rows rendered (the page's ``first-rows``
  performance mark); goal < 1 s. ``--cold`` loads (default 7), each in a fresh browser
  profile (nothing cached), and ``--warm`` loads (default 11) in one browser; median
  and p95 of each. References: the same page against an empty catalog, and the list
  request alone (as the browser saw it, and from Python over loopback).
  The 100k rows are realistic (fill_catalog): random 20-hex ids as the service makes
  them, EPU and SerialEM file names of varied length, random SHA-256 sums, creation
  dates spread over two years (so the newest-first walk is not insertion order), three
  cameras with their frame sizes, modes and frame counts, per-frame statistics for
  every frame, a mix of states, and a real frame sum behind every row's thumbnail (one
  real upload's ``sum.bin``, which all rows name), so the page's 50 thumbnails are
  rendered, not 500s.
* (b) ``GET /v1/datasets/{id}/frames/stats`` of an 88-frame movie, median, p95 and p99
  over a few hundred requests; goal < 20 ms. References: ``/healthz`` and the
  dataset's metadata ``GET``, same server, same run.

Run: ``python bench/bench_dashboard.py`` (about 5 min; ``--quick``: 10k rows, fewer
loads). Needs the test dependencies and Debian's chromium + chromium-driver, like
tests/test_dashboard.py. Writes bench/results/dashboard.json.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_service import Server, latencies, pct  # noqa: E402
from bench.results import begin, save  # noqa: E402
from service.catalog import Catalog, datasets  # noqa: E402
from service.config import Settings  # noqa: E402
from tests.api_helpers import start_server, wait_job  # noqa: E402
from tests.reference import counting_movie, write_raw_mrc  # noqa: E402
from tests.test_dashboard import chromium  # noqa: E402

#: What the page reports once the first list answer is on screen: ms since navigation
#: start for the mark, and the list request as the browser timed it.
TIMINGS = """
const mark = performance.getEntriesByName("first-rows")[0];
const list = performance.getEntriesByType("resource").find((e) => e.name.includes("/v1/datasets?"));
if (!mark || !list) return null;
return {rows: document.querySelectorAll("tr.ds").length, first_rows: mark.startTime,
        list_start: list.startTime, list_ms: list.responseEnd - list.startTime};
"""


#: the datasets table (the page opens on the sessions list since #20; an older page
#: ignores the parameter and opens on the datasets table anyway)
DATASETS = "?view=datasets"

#: a page URL with four filters (about one row in 18 of fill_catalog matches them)
FILTERED = "?voltage_kv=200&camera=K3&min_pixel_size=0.8&max_pixel_size=0.9"


#: camera -> (nx, ny, mode, dtype, pixel sizes in Å)
CAMERAS = {"K3": (5760, 4092, 101, "uint8", (0.83, 1.06, 0.652)),
           "Falcon 4i": (4096, 4096, 1, "int16", (0.73, 0.95, 1.2)),
           "DE-64": (8192, 8192, 2, "float32", (0.52, 0.8))}


def real_sum(data_dir: Path, work: Path) -> dict:
    """Upload one small real movie into ``data_dir`` through a real server; its row's
    ``info.storage`` (which names its frame sum, ``sum.bin``) is what every fake row
    carries, so every thumbnail the page asks for is rendered from a real sum."""
    movie = write_raw_mrc(work / "real-sum.mrc", counting_movie((16, 512, 512)), 101)
    proc, base = start_server(data_dir, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=base, timeout=120) as client:
            accepted = client.put("/v1/uploads/real-sum.mrc", content=movie.read_bytes()).json()
            if accepted.get("job"):
                assert wait_job(client, accepted["job"]["id"])["state"] == "done"
            dataset_id = accepted["dataset"]["id"]
            assert client.get(f"/v1/datasets/{dataset_id}/sum.png",
                              params={"size": 96}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    catalog = Catalog(Settings(data_dir=data_dir).catalog_url)
    try:
        with catalog.engine.connect() as conn:
            info = conn.execute(sa.select(datasets.c.info).where(
                datasets.c.id == dataset_id)).scalar_one()
    finally:
        catalog.close()
    return {"storage": info["storage"]}


def fill_catalog(data_dir: Path, rows: int, work: Path) -> None:
    """``rows`` realistic datasets straight into the catalog table (see the module
    notes), with the acquisition columns the dashboard shows filled in."""
    data_dir.mkdir()
    info = real_sum(data_dir, work)
    catalog = Catalog(Settings(data_dir=data_dir).catalog_url)
    rng = np.random.default_rng(2)
    statuses = ["ready"] * 37 + ["rejected", "failed", "processing"]
    cameras = list(CAMERAS)
    end = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc)
    span_s = 2 * 365 * 86400  # two years of acquisitions, in random order

    def name(i: int, camera: str, stamp: datetime.datetime) -> str:
        if camera == "K3":  # SerialEM: grid_square_number_date_time
            return (f"{['apoF', 'GPCR_b2ar', 'ribosome70S', 'TRPV1_nd'][i % 4]}_g{i % 6}"
                    f"_sq{int(rng.integers(1, 99)):02d}_{i % 997:05d}_"
                    f"{stamp:%b%d_%H.%M.%S}.mrc")
        return (f"FoilHole_{int(rng.integers(1e7, 1e8))}_Data_{int(rng.integers(1e7, 1e8))}_"
                f"{int(rng.integers(1, 60))}_{stamp:%Y%m%d_%H%M%S}_fractions.mrc")

    def row(i: int) -> dict:
        camera = cameras[int(rng.integers(0, 3))]
        nx, ny, mode, dtype, pixels = CAMERAS[camera]
        nz = int(rng.integers(30, 101))
        bytes_per = {101: 0.5, 1: 2, 2: 4}[mode]
        size = int(1024 + nx * ny * nz * bytes_per)
        created = end - datetime.timedelta(seconds=float(rng.uniform(0, span_s)))
        updated = created + datetime.timedelta(seconds=float(rng.uniform(5, 120)))
        status = statuses[int(rng.integers(0, len(statuses)))]
        means = rng.normal(1.0, 0.02, nz)
        stats = {"mean": np.round(means, 5).tolist(),
                 "std": np.round(np.sqrt(means) + rng.normal(0, 0.01, nz), 5).tolist(),
                 "min": [0.0] * nz, "max": rng.integers(9, 16, nz).astype(float).tolist()}
        return {"id": rng.bytes(10).hex(), "name": name(i, camera, created),
                "source": "upload" if i % 9 else "registration", "status": status,
                "created_at": created.isoformat(timespec="microseconds"),
                "updated_at": updated.isoformat(timespec="microseconds"),
                "size_bytes": size, "stored_bytes": int(size * rng.uniform(0.1, 0.6)),
                "sha256": rng.bytes(32).hex(), "path": "", "mode": mode, "nx": nx,
                "ny": ny, "nz": nz, "dtype": dtype,
                "pixel_size": pixels[int(rng.integers(0, len(pixels)))],
                "voltage_kv": [300.0, 200.0][int(rng.integers(0, 2))],
                "total_dose": round(float(rng.uniform(30, 70)), 2),
                "exposure_s": round(float(rng.uniform(1, 5)), 2),
                "magnification": [105000.0, 130000.0, 165000.0][int(rng.integers(0, 3))],
                "camera": camera, "frame_stats": stats if status == "ready" else None,
                "progress": {"phase": "processing", "done": int(nz // 2), "total": nz,
                             "unit": "frames"} if status == "processing" else None,
                "info": info}

    with catalog.engine.begin() as conn:
        for start in range(0, rows, 5000):
            conn.execute(datasets.insert(), [row(i) for i in range(start, min(rows, start + 5000))])
    catalog.close()


def page_loads(driver, url: str, loads: int) -> list[dict]:
    """Load ``url`` ``loads`` times in this browser."""
    from selenium.webdriver.support.ui import WebDriverWait

    out = []
    for _ in range(loads):
        driver.get(url)
        out.append(WebDriverWait(driver, 30, poll_frequency=0.02).until(
            lambda d: d.execute_script(TIMINGS)))
        driver.get("about:blank")
        time.sleep(0.5)  # let the server finish the thumbnails of this load
    return out


def cold_loads(work: Path, label: str, url: str, loads: int) -> list[dict]:
    """Load ``url`` ``loads`` times, each in a new browser with a fresh profile."""
    out = []
    for k in range(loads):
        driver = chromium(work / f"profile-{label}-cold-{k}")
        try:
            out += page_loads(driver, url, 1)
        finally:
            driver.quit()
        shutil.rmtree(work / f"profile-{label}-cold-{k}", ignore_errors=True)
    return out


def spread(values: list[float]) -> dict:
    a = np.array(values)
    return {"n": len(values), "median": round(float(np.median(a)), 1),
            "p95": round(float(np.percentile(a, 95)), 1), "max": round(float(a.max()), 1),
            "runs": [round(float(v), 1) for v in values]}


def bench_first_rows(work: Path, rows: int, cold: int, warm: int) -> dict:
    t = time.perf_counter()
    fill_catalog(work / "data-100k", rows, work)
    fill_s = time.perf_counter() - t
    (work / "data-empty").mkdir()
    servers = {label: start_server(work / folder, stderr=subprocess.DEVNULL)
               for label, folder in (("full", "data-100k"), ("empty", "data-empty"))}
    try:
        results: dict[str, dict[str, list[dict]]] = {}
        for label, (_proc, base) in servers.items():
            urls = {label: base + "/" + DATASETS}
            if label == "full":
                urls["filtered"] = base + "/" + FILTERED
            for key, url in urls.items():
                results[key] = {"cold": cold_loads(work, key, url, cold)}
                driver = chromium(work / f"profile-{key}-warm")
                try:
                    # the first load of this profile is a cold one: not counted as warm
                    results[key]["warm"] = page_loads(driver, url, warm + 1)[1:]
                finally:
                    driver.quit()
        with httpx.Client(base_url=servers["full"][1]) as client:
            python_list = latencies(client, "/v1/datasets", 300, sort="created_at",
                                    order="desc", limit=50)
            thumbs = latencies(client, f"/v1/datasets/{first_id(client)}/sum.png", 1, size=96)
    finally:
        for proc, _base in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    print(f"\n## Dashboard first rows, headless Chromium, navigation start -> rows rendered "
          f"({cold} loads each in a fresh browser profile, {warm} in one warm browser); "
          f"catalog filled in {fill_s:.0f} s")
    figures: dict = {"rows": rows, "fill_s": round(fill_s, 1), "goal": "full cold p95 < 1000 ms"}
    for label, title in (("full", f"{rows:,} realistic datasets"),
                         ("empty", "empty catalog (reference)"),
                         ("filtered", f"{rows:,}, filtered by the URL (~1 row in 18)")):
        entry = {}
        for kind in ("cold", "warm"):
            runs = results[label][kind]
            entry[kind] = spread([r["first_rows"] for r in runs])
            entry[kind]["rows_shown"] = runs[0]["rows"]
            entry[kind]["list_request_ms"] = spread([r["list_ms"] for r in runs])
            entry[kind]["list_sent_at_ms"] = round(statistics.median(
                r["list_start"] for r in runs), 1)
            e = entry[kind]
            goal = "  (goal < 1000 ms)" if label == "full" else ""
            print(f"  {title:44s} {kind}: median {e['median']:6.0f} ms, p95 {e['p95']:6.0f} ms, "
                  f"max {e['max']:6.0f} ms; {e['rows_shown']} rows; list request sent at "
                  f"{e['list_sent_at_ms']:.0f} ms, took median "
                  f"{e['list_request_ms']['median']:.1f} ms{goal}")
        figures[label] = entry
    figures["python_list_ms"] = {"p50": round(pct(python_list, 50), 2),
                                 "p95": round(pct(python_list, 95), 2),
                                 "p99": round(pct(python_list, 99), 2), "n": len(python_list)}
    figures["one_thumbnail_ms"] = round(thumbs[0] * 1000, 1)
    print(f"  reference: GET /v1/datasets?limit=50 from Python ({rows:,} rows), p50 "
          f"{pct(python_list, 50):.1f} ms, p95 {pct(python_list, 95):.1f} ms, p99 "
          f"{pct(python_list, 99):.1f} ms; one 96-px thumbnail {thumbs[0] * 1000:.1f} ms")
    return figures


def first_id(client: httpx.Client) -> str:
    return client.get("/v1/datasets", params={"limit": 1}).json()["items"][0]["id"]


def bench_frame_stats(work: Path, n: int) -> dict:
    movie = write_raw_mrc(work / "frames88.mrc", counting_movie((88, 64, 64)), 101)
    server = Server(work / "data-stats")
    try:
        with httpx.Client(base_url=server.base, timeout=60) as client:
            accepted = client.put("/v1/uploads/frames88.mrc", content=movie.read_bytes()).json()
            if accepted.get("job"):
                assert wait_job(client, accepted["job"]["id"])["state"] == "done"
            dataset_id = accepted["dataset"]["id"]
            body = client.get(f"/v1/datasets/{dataset_id}/frames/stats").json()
            assert body["frames"] == 88 and len(body["mean"]) == 88
            floor = latencies(client, "/healthz", n)
            stats = latencies(client, f"/v1/datasets/{dataset_id}/frames/stats", n)
            detail = latencies(client, f"/v1/datasets/{dataset_id}", n)
    finally:
        server.stop()
    print(f"\n## GET /v1/datasets/{{id}}/frames/stats, 88 frames ({n} requests each)")
    out = {"requests": n, "goal": "frames_stats p99 < 20 ms"}
    for key, label, values in (("frames_stats", "frames/stats", stats),
                               ("healthz", "reference /healthz", floor),
                               ("detail", "reference GET /v1/datasets/{id}", detail)):
        print(f"  {label:32s} p50 {pct(values, 50):6.2f} ms  p95 {pct(values, 95):6.2f} ms  "
              f"p99 {pct(values, 99):6.2f} ms" + ("  (goal < 20)" if key == "frames_stats" else ""))
        out[key] = {q: round(pct(values, int(q[1:])), 2) for q in ("p50", "p95", "p99")}
    return out


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--cold", type=int, default=7, help="loads in fresh profiles")
    parser.add_argument("--warm", type=int, default=11, help="loads in one warm browser")
    parser.add_argument("--dir", type=Path, default=None,
                        help="work folder (default: a temporary folder under the cwd)")
    args = parser.parse_args()
    started = begin()
    work = Path(tempfile.mkdtemp(prefix="bench-dashboard-", dir=args.dir or Path.cwd()))
    figures = {}
    try:
        figures["first_rows"] = bench_first_rows(
            work, 10_000 if args.quick else args.rows, 2 if args.quick else args.cold,
            3 if args.quick else args.warm)
        figures["frame_stats"] = bench_frame_stats(work, 100 if args.quick else 400)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save("dashboard", figures, args=vars(args), quick=args.quick, started=started,
         extra_packages=("selenium", "uvicorn", "fastapi"))


if __name__ == "__main__":
    main()
