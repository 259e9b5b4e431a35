"""Load: 8 concurrent uploads of 1 GB each while a second client polls the catalog and
previews. Prints upload throughput, metadata/preview latency p50/p99 (goal: metadata p99
< 50 ms) and the number of errors (goal 0), next to the same latencies on an idle server.

Loopback only, bounded in time. Each upload streams the same 4-bit frames behind its own
header label, so every movie has its own SHA-256 (no de-duplication shortcut) while the
disk holds one source file. Run: ``python bench/bench_load.py`` (``--quick``: 8 x 128 MB).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--uploads", type=int, default=8)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    frames = 16 if args.quick else 128  # x 8 MiB: 128 MiB or 1 GiB per movie
    work = Path(tempfile.mkdtemp(prefix="bench-load-", dir=Path.cwd()))
    proc = None
    try:
        frames_file = work / "frames.bin"
        write_frames(frames_file, frames)
        proc, base = start_server(work / "data", "--workers", "2")
        seed: dict = {}
        upload(base, "seed.mrc", frames_file, 8 if args.quick else 16, seed)
        poller = Poller(base)
        poller.ready_id = seed["seed.mrc"][2]["dataset"]["id"]
        with httpx.Client(base_url=base) as client:  # wait for the seed to be previewable
            while client.get(f"/v1/datasets/{poller.ready_id}").json()["status"] != "ready":
                time.sleep(0.1)
        poller.start()
        time.sleep(3)
        idle_meta, idle_prev = list(poller.metadata), list(poller.previews)
        poller.metadata.clear()
        poller.previews.clear()

        results: dict = {}
        threads = [threading.Thread(target=upload, args=(base, f"movie{i}.mrc", frames_file,
                                                         frames, results))
                   for i in range(args.uploads)]
        started = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        upload_s = time.perf_counter() - started
        busy_meta, busy_prev = list(poller.metadata), list(poller.previews)
        job_ids = [r[2]["job"]["id"] for r in results.values() if r[0] == 202]
        with httpx.Client(base_url=base, timeout=60) as client:
            while any(client.get(f"/v1/jobs/{j}").json()["state"] in ("queued", "running")
                      for j in job_ids):
                time.sleep(0.5)
            ingest_s = time.perf_counter() - started
            states = [client.get(f"/v1/jobs/{j}").json()["state"] for j in job_ids]
        poller.stop.set()
        poller.join()
        after_meta = poller.metadata[len(busy_meta):]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)

    size = frames * FRAME + 1024
    ok = sum(1 for r in results.values() if r[0] == 202)
    upload_errors = [f"{n}: {r[0]} {r[2]}" for n, r in results.items() if r[0] != 202]
    print(f"## {args.uploads} concurrent uploads (curl -T) of {size / 1e9:.2f} GB each "
          f"(2 workers; the clients and the server share the 2 cores)")
    print(f"  all uploads done in {upload_s:.1f} s: {args.uploads * size / upload_s / 1e6:.0f} "
          f"MB/s aggregate; per upload {min(r[1] for r in results.values()):.1f}-"
          f"{max(r[1] for r in results.values()):.1f} s")
    print(f"  all ingests done {ingest_s:.1f} s after the start; job states: "
          f"{ {s: states.count(s) for s in set(states)} }")
    print(f"  metadata GETs while uploading: p50 {pct(busy_meta, 50):.1f} ms, p99 "
          f"{pct(busy_meta, 99):.1f} ms over {len(busy_meta)} (goal p99 < 50)")
    print(f"  metadata GETs while ingesting after: p50 {pct(after_meta, 50):.1f} ms, p99 "
          f"{pct(after_meta, 99):.1f} ms over {len(after_meta)}")
    print(f"  previews while uploading: p50 {pct(busy_prev, 50):.1f} ms, p99 "
          f"{pct(busy_prev, 99):.1f} ms over {len(busy_prev)}")
    print(f"  reference, idle server: metadata p50 {pct(idle_meta, 50):.1f} ms, p99 "
          f"{pct(idle_meta, 99):.1f} ms; previews p50 {pct(idle_prev, 50):.1f} ms")
    print(f"  errors: {len(upload_errors) + len(poller.errors)} (uploads accepted {ok}/"
          f"{args.uploads}) (goal 0)")
    for line in (upload_errors + poller.errors)[:10]:
        print(f"    {line}")


if __name__ == "__main__":
    main()
