"""Load: 8 concurrent uploads of 1 GiB each while a dashboard client polls the catalog
and previews. Prints upload throughput, metadata/preview latency p50/p99 (goal: metadata
p99 < 50 ms while the uploads stream) and the number of errors (goal 0), next to the same
latencies on the idle deployment, for two deployments on this one machine, in one run:

* ``one process``: the embedded default, ``mrc-ingest serve`` on SQLite and the data
  folder; uploads and dashboard share it (the reference: how it ran before #14);
* ``split``: a PostgreSQL catalog and the same local folder; one ``serve`` process takes
  the uploads (and ingests them as they stream) under ``nice -n 10``, a second with
  ``MRC_INGEST_WORKERS=0`` answers the dashboard at normal priority. Same code, same
  machine, told apart by settings (and the scheduler's priority) alone.

Loopback only. Each upload streams the same 4-bit frames behind its own header label, so
every movie has its own SHA-256 (no de-duplication shortcut) while the disk holds one
source file. Run: ``python bench/bench_load.py`` (``--quick``: 8 x 128 MiB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.api_helpers import start_server  # noqa: E402
from tests.postgres import start_postgres  # noqa: E402
from tests.reference import raw_header  # noqa: E402

NX = NY = 4096
FRAME = NX * NY // 2  # packed 4-bit bytes per frame
MiB = 1 << 20


def write_frames(path: Path, frames: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for _ in range(frames):
            counts = np.minimum(rng.poisson(1.0, size=(NY, NX)), 15).astype(np.uint8)
            f.write((counts[:, 0::2] | (counts[:, 1::2] << 4)).tobytes())


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q)) if values else float("nan")


class Poller(threading.Thread):
    """The dashboard: list, one dataset, a frame preview, in a loop."""

    def __init__(self, base: str):
        super().__init__(daemon=True)
        self.base = base
        self.stop = threading.Event()
        self.metadata: list[float] = []
        self.previews: list[float] = []
        self.errors: list[str] = []
        self.ready_id: str | None = None

    def timed(self, client: httpx.Client, url: str, into: list[float], **params) -> None:
        t = time.perf_counter()
        try:
            r = client.get(url, params=params)
        except httpx.HTTPError as exc:
            self.errors.append(f"{url}: {exc!r}")
            return
        into.append(time.perf_counter() - t)
        if r.status_code >= 400:
            self.errors.append(f"{url}: {r.status_code} {r.text[:200]}")

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=60) as client:
            while not self.stop.is_set():
                self.timed(client, "/v1/datasets", self.metadata, limit=50)
                if self.ready_id:
                    self.timed(client, f"/v1/datasets/{self.ready_id}", self.metadata)
                    k = int(np.random.default_rng().integers(0, 8))
                    self.timed(client, f"/v1/datasets/{self.ready_id}/frames/{k}.png",
                               self.previews, size=256)
                time.sleep(0.02)


def upload(base: str, name: str, frames_file: Path, frames: int, out: dict) -> None:
    """One microscope PC: ``curl -T`` of its movie (header + frames piped by ``head``), so
    the client costs what a real one does, not a Python loop's CPU on our two cores."""
    header = frames_file.with_name(f"{name}.header")
    header.write_bytes(raw_header(nx=NX, ny=NY, nz=frames, mode=101,
                                  labels=(f"load test {name}",)))
    # From a pipe curl sends chunked (no Content-Length), which the server streams alike.
    command = (f"cat {header} <(head -c {frames * FRAME} {frames_file}) | curl -sS -T - "
               f"-w '\\n%{{http_code}}' {base}/v1/uploads/{name}")
    t = time.perf_counter()
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    body, _, code = done.stdout.rpartition("\n")
    try:
        out[name] = (int(code), elapsed, json.loads(body))
    except ValueError:
        out[name] = (0, elapsed, (done.stdout + done.stderr)[-300:])


def run(upload_base: str, dashboard_base: str, frames_file: Path, frames: int,
        uploads: int, quick: bool) -> dict:
    """Seed one dataset, poll idle for 3 s, then stream ``uploads`` movies at once."""
    seed: dict = {}
    upload(upload_base, "seed.mrc", frames_file, 8 if quick else 16, seed)
    assert seed["seed.mrc"][0] == 201, seed
    poller = Poller(dashboard_base)
    poller.ready_id = seed["seed.mrc"][2]["dataset"]["id"]
    poller.start()
    time.sleep(3)
    idle_meta, idle_prev = list(poller.metadata), list(poller.previews)
    poller.metadata.clear()
    poller.previews.clear()
    results: dict = {}
    threads = [threading.Thread(target=upload, args=(upload_base, f"movie{i}.mrc",
                                                     frames_file, frames, results))
               for i in range(uploads)]
    started = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    upload_s = time.perf_counter() - started  # each answer comes once its movie is ready
    busy_meta, busy_prev = list(poller.metadata), list(poller.previews)
    poller.stop.set()
    poller.join()
    return {"idle_meta": idle_meta, "idle_prev": idle_prev, "busy_meta": busy_meta,
            "busy_prev": busy_prev, "results": results, "upload_s": upload_s,
            "errors": poller.errors}


def report(name: str, r: dict, uploads: int, size: int) -> None:
    results = r["results"]
    ok = sum(1 for v in results.values() if v[0] == 201 and
             v[2]["dataset"]["status"] == "ready")
    upload_errors = [f"{n}: {v[0]} {v[2]}" for n, v in results.items() if v[0] != 201]
    print(f"\n## {name}: {uploads} concurrent uploads (curl -T) of {size / 2**30:.2f} GiB "
          "each, ready on the answer (clients and servers share the 2 cores)")
    print(f"  all ready {r['upload_s']:.1f} s after the start: "
          f"{uploads * size / r['upload_s'] / 1e6:.0f} MB/s aggregate; per upload "
          f"{min(v[1] for v in results.values()):.1f}-{max(v[1] for v in results.values()):.1f} s")
    print(f"  metadata GETs while uploading: p50 {pct(r['busy_meta'], 50):.1f} ms, p99 "
          f"{pct(r['busy_meta'], 99):.1f} ms over {len(r['busy_meta'])} (goal p99 < 50)")
    print(f"  previews while uploading: p50 {pct(r['busy_prev'], 50):.1f} ms, p99 "
          f"{pct(r['busy_prev'], 99):.1f} ms over {len(r['busy_prev'])}")
    print(f"  reference, same deployment idle: metadata p50 {pct(r['idle_meta'], 50):.1f} ms, "
          f"p99 {pct(r['idle_meta'], 99):.1f} ms; previews p50 {pct(r['idle_prev'], 50):.1f} ms")
    print(f"  errors: {len(upload_errors) + len(r['errors'])} (ready {ok}/{uploads}) (goal 0)")
    for line in (upload_errors + r["errors"])[:10]:
        print(f"    {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--uploads", type=int, default=8)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    frames = 16 if args.quick else 128  # x 8 MiB: 128 MiB or 1 GiB per movie
    size = frames * FRAME + 1024
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    work.chmod(0o755)
    procs: list = []
    pg = None
    try:
        frames_file = work / "frames.bin"
        write_frames(frames_file, frames)

        proc, base = start_server(work / "data-one", "--workers", "2")
        procs.append(proc)
        one = run(base, base, frames_file, frames, args.uploads, args.quick)
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(work / "data-one", ignore_errors=True)

        pg = start_postgres(work / "pg", durable=True)
        env = {"MRC_INGEST_DATABASE_URL": pg.create_database()}
        ingest, ingest_base = start_server(work / "data-split", "--workers", "2", env=env,
                                           nice=10)
        procs.append(ingest)
        dashboard, dashboard_base = start_server(
            work / "data-split", env={**env, "MRC_INGEST_WORKERS": "0"})
        procs.append(dashboard)
        split = run(ingest_base, dashboard_base, frames_file, frames, args.uploads,
                    args.quick)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
        if pg is not None:
            pg.remove()
        shutil.rmtree(work, ignore_errors=True)
    report("one process (SQLite, embedded default)", one, args.uploads, size)
    report("split: PostgreSQL; uploads to one serve process (nice 10), dashboard on "
           "another with MRC_INGEST_WORKERS=0", split, args.uploads, size)


if __name__ == "__main__":
    main()
