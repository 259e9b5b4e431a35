"""Dashboard benchmark: each figure next to a reference measured in the same run.

* (a) the dashboard's first table rows with 100k datasets in the catalog, in headless
  Chromium, from navigation start to the rows rendered (the page's ``first-rows``
  performance mark); goal < 1 s. References: the same page against an empty catalog,
  and the list request alone (as the browser saw it, and from Python over loopback).
* (b) ``GET /v1/datasets/{id}/frames/stats`` of an 88-frame movie, median and p99 over a
  few hundred requests; goal < 20 ms. References: ``/healthz`` and the dataset's
  metadata ``GET``, same server, same run.

Run: ``python bench/bench_dashboard.py`` (``--quick``: 10k rows, fewer loads). Needs the
test dependencies and Debian's chromium + chromium-driver, like tests/test_dashboard.py.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_service import Server, latencies, pct  # noqa: E402
from service.catalog import Catalog, datasets, now  # noqa: E402
from service.config import Settings  # noqa: E402
from tests.api_helpers import start_server, wait_job  # noqa: E402
from tests.reference import counting_movie, write_raw_mrc  # noqa: E402
from tests.test_dashboard import chromium  # noqa: E402

#: What the page reports once the first list answer is on screen: ms since navigation
#: start for the mark, and the list request as the browser timed it.
TIMINGS = """
const mark = performance.getEntriesByName("first-rows")[0];
if (!mark) return null;
const list = performance.getEntriesByType("resource").find((e) => e.name.includes("/v1/datasets?"));
return {rows: document.querySelectorAll("tr.ds").length, first_rows: mark.startTime,
        list_start: list.startTime, list_ms: list.responseEnd - list.startTime};
"""


#: a page URL with four filters (every sixth row of fill_catalog matches them)
FILTERED = "?voltage_kv=200&camera=K3&min_pixel_size=0.8&max_pixel_size=0.9"


def fill_catalog(data_dir: Path, rows: int) -> None:
    """``rows`` datasets straight into the catalog table, as bench_service.py's list
    benchmark does, with the acquisition columns the dashboard shows filled in."""
    data_dir.mkdir()
    catalog = Catalog(Settings(data_dir=data_dir).catalog_url)
    rng = np.random.default_rng(2)
    statuses = ["ready"] * 17 + ["rejected", "failed", "processing"]
    cameras = ["K3", "Falcon 4i", "DE-64"]

    def row(i: int) -> dict:
        stamp = now()
        size = int(rng.integers(1e8, 5e9))
        return {"id": f"{i:020d}", "name": f"grid{i % 41}_sq{i % 13}_mov{i:06d}.mrc",
                "source": "upload", "status": statuses[i % len(statuses)],
                "created_at": stamp, "updated_at": stamp, "size_bytes": size,
                "stored_bytes": size // 4, "sha256": f"{i:064x}", "path": f"/x/{i}",
                "mode": 101, "nx": 4096, "ny": 4096, "nz": 40 + i % 50, "dtype": "uint8",
                "pixel_size": [0.83, 1.06, 0.52][i % 3], "voltage_kv": [300, 200][i % 2],
                "total_dose": 40 + i % 20, "exposure_s": 2.5, "camera": cameras[i % 3],
                "progress": {"phase": "processing", "done": 10, "total": 80,
                             "unit": "frames"} if i % 20 == 19 else None, "info": {}}

    with catalog.engine.begin() as conn:
        for start in range(0, rows, 5000):
            conn.execute(datasets.insert(), [row(i) for i in range(start, min(rows, start + 5000))])
    catalog.close()


def page_loads(driver, url: str, loads: int) -> list[dict]:
    """Load ``url`` ``loads`` times (the first one with a fresh browser cache)."""
    from selenium.webdriver.support.ui import WebDriverWait

    out = []
    for _ in range(loads):
        driver.get(url)
        out.append(WebDriverWait(driver, 30, poll_frequency=0.02).until(
            lambda d: d.execute_script(TIMINGS)))
        driver.get("about:blank")
        time.sleep(0.5)  # let the server finish the thumbnails of this load
    return out


def bench_first_rows(work: Path, rows: int, loads: int) -> None:
    fill_catalog(work / "data-100k", rows)
    (work / "data-empty").mkdir()
    # The fake rows have no sum image: their thumbnails fail (500), which the page ignores
    # and whose tracebacks would fill this output; so the servers' logs go nowhere.
    servers = {label: start_server(work / folder, stderr=subprocess.DEVNULL)
               for label, folder in (("full", "data-100k"), ("empty", "data-empty"))}
    try:
        results = {}
        for label, (_proc, base) in servers.items():
            driver = chromium(work / f"profile-{label}")
            try:
                results[label] = page_loads(driver, base + "/", loads)
                if label == "full":
                    results["filtered"] = page_loads(driver, base + "/" + FILTERED, loads)
            finally:
                driver.quit()
        with httpx.Client(base_url=servers["full"][1]) as client:
            python_list = latencies(client, "/v1/datasets", 300, sort="created_at",
                                    order="desc", limit=50)
    finally:
        for proc, _base in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    print(f"\n## Dashboard first rows, headless Chromium, navigation start -> rows rendered "
          f"({loads} loads each; the first of 100k and of empty in a fresh browser profile)")
    for label, title in (("full", f"{rows:,} datasets"), ("empty", "empty catalog (reference)"),
                         ("filtered", f"{rows:,}, filtered by the URL (1 row in 6 matches)")):
        runs = results[label]
        warm = [r["first_rows"] for r in runs[1:]] or [runs[0]["first_rows"]]
        goal = "  (goal < 1000 ms)" if label == "full" else ""
        print(f"  {title:52s} first load {runs[0]['first_rows']:6.0f} ms; then median "
              f"{statistics.median(warm):5.0f} ms, max {max(warm):5.0f} ms; "
              f"{runs[0]['rows']} rows{goal}")
        sent = statistics.median(r["list_start"] for r in runs)
        took = statistics.median(r["list_ms"] for r in runs)
        print(f"  {'':52s} list request sent at {sent:4.0f} ms, took median {took:5.1f} ms "
              "in the browser")
    print(f"  reference: GET /v1/datasets?limit=50 from Python ({rows:,} rows), p50 "
          f"{pct(python_list, 50):.1f} ms, p99 {pct(python_list, 99):.1f} ms")


def bench_frame_stats(work: Path, n: int) -> None:
    movie = write_raw_mrc(work / "frames88.mrc", counting_movie((88, 64, 64)), 101)
    server = Server(work / "data-stats")
    try:
        with httpx.Client(base_url=server.base, timeout=60) as client:
            accepted = client.put("/v1/uploads/frames88.mrc", content=movie.read_bytes()).json()
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
    for label, values in (("frames/stats", stats), ("reference /healthz", floor),
                          ("reference GET /v1/datasets/{id}", detail)):
        print(f"  {label:32s} p50 {pct(values, 50):6.2f} ms  p99 {pct(values, 99):6.2f} ms"
              + ("  (goal < 20)" if label == "frames/stats" else ""))


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dir", type=Path, default=None,
                        help="work folder (default: a temporary folder under the cwd)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-dashboard-", dir=args.dir or Path.cwd()))
    try:
        bench_first_rows(work, 10_000 if args.quick else 100_000, 4 if args.quick else 11)
        bench_frame_stats(work, 100 if args.quick else 400)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
