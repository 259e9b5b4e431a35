"""Service benchmark: each number next to a reference measured in the same run.

(Upload speed, time to ready and the server's memory are bench/bench_ingest.py's.)

* preview latency for a 4096 x 4096 frame (goal < 150 ms), against /healthz (the HTTP
  floor) and reading the frame's bytes in-process;
* GET /v1/datasets p99 with 100k rows in the catalog (goal < 20 ms), against /healthz;
* a metadata GET while four conversions run, against the same GET idle.

Run: ``python bench/bench_service.py`` or ``--quick`` (10k rows).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.catalog import Catalog, now  # noqa: E402
from service.config import Settings  # noqa: E402
from tests.api_helpers import start_server  # noqa: E402
from tests.reference import raw_header  # noqa: E402

NX = NY = 4096
MiB = 1 << 20


def write_movie(path: Path, frames: int, mode: int = 101) -> None:
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(raw_header(nx=NX, ny=NY, nz=frames, mode=mode, cella=(NX, NY, frames)))
        for _ in range(frames):
            if mode == 101:  # Poisson(1) counts, as a counting camera writes them
                counts = np.minimum(rng.poisson(1.0, size=(NY, NX)), 15).astype(np.uint8)
                f.write((counts[:, 0::2] | (counts[:, 1::2] << 4)).tobytes())
            else:
                f.write(rng.normal(100, 10, size=(NY, NX)).astype("<f4").tobytes())
        f.flush()
        os.fsync(f.fileno())


class Server:
    """``mrc-ingest serve`` in its own process; ``settings`` become MRC_INGEST_* variables."""

    def __init__(self, data_dir: Path, workers: int = 2, **settings: str):
        env = {f"MRC_INGEST_{k.upper()}": str(v) for k, v in settings.items()}
        self.proc, self.base = start_server(data_dir, "--workers", str(workers), env=env)
        self.data_dir = data_dir

    def status_kb(self, field: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def stop(self, remove: bool = False) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        if remove:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def wait_job(client: httpx.Client, job_id: str) -> dict:
    while (job := client.get(f"/v1/jobs/{job_id}").json())["state"] not in ("done", "failed"):
        time.sleep(0.1)
    return job


def latencies(client: httpx.Client, url: str, n: int, **params) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = client.get(url, params=params)
        out.append(time.perf_counter() - t)
        assert r.status_code == 200, r.text
    return out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


def bench_previews(work: Path) -> None:
    movie = work / "float.mrc"
    write_movie(movie, 8, mode=2)
    server = Server(work / "data-preview")
    try:
        with httpx.Client(base_url=server.base, timeout=600) as client:
            r = client.put("/v1/uploads/float.mrc", content=movie.read_bytes())
            wait_job(client, r.json()["job"]["id"])
            ds_id = r.json()["dataset"]["id"]
            floor = latencies(client, "/healthz", 50)
            cold = []
            for k in range(8):  # each frame once: nothing cached
                cold += latencies(client, f"/v1/datasets/{ds_id}/frames/{k}.png", 1)
            warm = latencies(client, f"/v1/datasets/{ds_id}/frames/0.png", 30)
            sums = latencies(client, f"/v1/datasets/{ds_id}/sum.png", 1, size=1024)
    finally:
        server.stop()
    t = time.perf_counter()
    with open(movie, "rb") as f:
        f.seek(1024 + 3 * NX * NY * 4)
        np.frombuffer(f.read(NX * NY * 4), dtype="<f4").reshape(NY, NX).copy()
    read_ms = (time.perf_counter() - t) * 1000
    print(f"\n## Preview of a {NX}x{NY} float32 frame (size=512)")
    print(f"  uncached: median {pct(cold, 50):.1f} ms, max {max(cold) * 1000:.1f} ms "
          "(goal < 150)")
    print(f"  cached:   median {pct(warm, 50):.1f} ms;  sum.png (1024) {sums[0] * 1000:.1f} ms")
    print(f"  reference: /healthz median {pct(floor, 50):.1f} ms; reading the frame's 64 MB "
          f"in-process {read_ms:.1f} ms")


def bench_list(work: Path, rows: int) -> None:
    data = work / "data-list"
    data.mkdir()
    catalog = Catalog(Settings(data_dir=data).catalog_url)
    rng = np.random.default_rng(1)
    modes = [0, 1, 2, 6, 101]
    statuses = ["ready"] * 8 + ["rejected", "failed"]
    batch = []
    with catalog.engine.begin() as conn:
        from service.catalog import datasets
        for i in range(rows):
            stamp = now()
            batch.append({"id": f"{i:020d}", "name": f"grid{i % 37}_sq{i % 11}_mov{i}.mrc",
                          "source": "upload" if i % 5 else "registration",
                          "status": statuses[i % len(statuses)], "created_at": stamp,
                          "updated_at": stamp, "size_bytes": int(rng.integers(1e8, 5e9)),
                          "sha256": f"{i:064x}", "path": f"/x/{i}", "mode": modes[i % 5],
                          "nx": 4096, "ny": 4096, "nz": 40, "dtype": "int8",
                          "pixel_size": 0.83, "stored_bytes": 10**8, "info": {}})
            if len(batch) == 5000:
                conn.execute(datasets.insert(), batch)
                batch = []
        if batch:
            conn.execute(datasets.insert(), batch)
    catalog.close()
    server = Server(data)
    n = 300
    try:
        with httpx.Client(base_url=server.base, timeout=60) as client:
            floor = latencies(client, "/healthz", n)
            cases = {
                "newest 50": {},
                "status=ready": {"status": "ready"},
                "mode=101, source=registration": {"mode": 101, "source": "registration"},
                "sort=size_bytes asc": {"sort": "size_bytes", "order": "asc"},
                "name contains 'sq7_mov99'": {"name": "sq7_mov99"},
                "name matching no row": {"name": "no-such-grid"},
                "name contains 'GRID3_SQ' (~3%) ": {"name": "GRID3_SQ"},
            }
            results = {label: latencies(client, "/v1/datasets", n, **params)
                       for label, params in cases.items()}
            cursor = client.get("/v1/datasets", params={"limit": 50}).json()["next_cursor"]
            results["page 2 via cursor"] = latencies(client, "/v1/datasets", n, cursor=cursor)
            some = client.get("/v1/datasets", params={"limit": 1}).json()["items"][0]["id"]
            results["GET one dataset"] = latencies(client, f"/v1/datasets/{some}", n)
    finally:
        server.stop()
    print(f"\n## GET /v1/datasets with {rows:,} rows ({n} requests each)")
    print(f"  reference /healthz: p50 {pct(floor, 50):.2f} ms, p99 {pct(floor, 99):.2f} ms")
    for label, values in results.items():
        print(f"  {label:32s} p50 {pct(values, 50):6.2f} ms  p99 {pct(values, 99):6.2f} ms"
              f"  (goal p99 < 20)")


def bench_busy_loop(work: Path) -> None:
    movie = work / "busy.mrc"
    write_movie(movie, 64)
    server = Server(work / "data-busy", workers=4)
    try:
        with httpx.Client(base_url=server.base, timeout=600) as client:
            r = client.put("/v1/uploads/busy.mrc", content=movie.read_bytes())
            wait_job(client, r.json()["job"]["id"])
            ds_id = r.json()["dataset"]["id"]
            idle = latencies(client, f"/v1/datasets/{ds_id}", 100)
            targets = [{"mode": 1}, {"mode": 6}, {"mode": 2}, {"codec": "lz4", "clevel": 5}]
            threads = [threading.Thread(target=lambda p=p: httpx.get(
                f"{server.base}/v1/datasets/{ds_id}/download", params=p, timeout=600))
                for p in targets]
            for th in threads:
                th.start()
            time.sleep(0.3)
            busy = []
            while any(th.is_alive() for th in threads):
                busy += latencies(client, f"/v1/datasets/{ds_id}", 1)
                time.sleep(0.01)
            for th in threads:
                th.join()
    finally:
        server.stop()
    print(f"\n## Metadata GET while four conversions of a {movie.stat().st_size / 1e6:.0f} MB "
          "movie run (4 workers, 2 cores)")
    print(f"  idle: p50 {pct(idle, 50):.1f} ms, p99 {pct(idle, 99):.1f} ms")
    print(f"  busy: p50 {pct(busy, 50):.1f} ms, p99 {pct(busy, 99):.1f} ms over {len(busy)} "
          "requests")


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dir", type=Path, default=None,
                        help="work folder (default: a temporary folder under the cwd)")
    parser.add_argument("--only", nargs="+", default=["preview", "list", "busy"],
                        choices=["preview", "list", "busy"])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-service-", dir=args.dir or Path.cwd()))
    try:
        if "preview" in args.only:
            bench_previews(work)
        if "list" in args.only:
            bench_list(work, 10_000 if args.quick else 100_000)
        if "busy" in args.only:
            bench_busy_loop(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
