"""Load: 8 concurrent uploads of 1 GiB each while a dashboard client polls the catalog
and previews. Prints upload throughput, metadata/preview latency p50/p95/p99 (goal:
metadata p99 < 50 ms while the uploads stream) and the number of errors (goal 0), next
to the same latencies on the idle deployment, for five deployments on this one machine
in one run, each differing from the one before it in ONE thing:

1. ``sqlite-flat``: the embedded default, one ``mrc-ingest serve`` on SQLite and the
   data folder, uploads and dashboard sharing it, the ingest work at the event loop's
   priority (``MRC_INGEST_WORK_NICE=0``: how it ran before service/priority.py);
2. ``sqlite``: the same with the ingest work 10 nicer than the event loop (the default);
3. ``postgres``: the same single process on a PostgreSQL catalog (the database changed);
4. ``split``: PostgreSQL; one ``serve`` takes the uploads (and ingests them as they
   stream), a second with ``MRC_INGEST_WORKERS=0`` answers the dashboard, both at the
   same priority (the process split added);
5. ``split-nice``: the same, the upload process under ``nice -n 10`` (nice added).

(A split on SQLite is not possible: one process per embedded catalog, ARCHITECTURE.md
invariant 7.) Loopback only. Each upload streams the same 4-bit frames behind its own
header label, so every movie has its own SHA-256 (no de-duplication shortcut) while the
disk holds one source file. Run: ``python bench/bench_load.py`` (about 10 min);
``--size-mib`` per upload (default 1024), ``--configs sqlite,split-nice`` for a subset,
``--quick``: 8 x 128 MiB. Writes bench/results/load.json.
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
from bench.results import begin, save  # noqa: E402
from tests.api_helpers import start_server  # noqa: E402
from tests.postgres import start_postgres  # noqa: E402
from tests.reference import raw_header  # noqa: E402

NX = NY = 4096
FRAME = NX * NY // 2  # packed 4-bit bytes per frame
MiB = 1 << 20


DISTINCT_FRAMES = 8  # drawn once and cycled: drawing GiBs of Poisson counts is slow


def write_frames(path: Path, frames: int) -> None:
    rng = np.random.default_rng(0)
    packed = []
    for _ in range(DISTINCT_FRAMES):
        counts = np.minimum(rng.poisson(1.0, size=(NY, NX)), 15).astype(np.uint8)
        packed.append((counts[:, 0::2] | (counts[:, 1::2] << 4)).tobytes())
    with open(path, "wb") as f:
        for z in range(frames):
            f.write(packed[z % DISTINCT_FRAMES])


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


def summary(r: dict, uploads: int, size: int) -> dict:
    """The figures of one deployment, as they go into the results file."""
    results = r["results"]
    ok = sum(1 for v in results.values() if v[0] == 201 and
             v[2]["dataset"]["status"] == "ready")
    upload_errors = [f"{n}: {v[0]} {v[2]}" for n, v in results.items() if v[0] != 201]
    per = sorted(v[1] for v in results.values())

    def lat(values: list[float]) -> dict:
        return {"n": len(values), "p50_ms": round(pct(values, 50), 2),
                "p95_ms": round(pct(values, 95), 2), "p99_ms": round(pct(values, 99), 2),
                "max_ms": round(max(values) * 1000, 2) if values else None}

    return {"uploads": uploads, "upload_bytes": size, "all_ready_s": round(r["upload_s"], 2),
            "aggregate_MB_s": round(uploads * size / r["upload_s"] / 1e6, 1),
            "per_upload_s": [round(v, 2) for v in per], "ready": ok,
            "metadata_busy": lat(r["busy_meta"]), "previews_busy": lat(r["busy_prev"]),
            "metadata_idle": lat(r["idle_meta"]), "previews_idle": lat(r["idle_prev"]),
            "errors": len(upload_errors) + len(r["errors"]),
            "error_samples": (upload_errors + r["errors"])[:10]}


def report(title: str, f: dict) -> None:
    b, i = f["metadata_busy"], f["metadata_idle"]
    print(f"\n## {title}: {f['uploads']} concurrent uploads (curl -T) of "
          f"{f['upload_bytes'] / 2**30:.2f} GiB each, ready on the answer")
    print(f"  all ready {f['all_ready_s']:.1f} s after the start: {f['aggregate_MB_s']:.0f} MB/s "
          f"aggregate; per upload {f['per_upload_s'][0]:.1f}-{f['per_upload_s'][-1]:.1f} s")
    print(f"  metadata GETs while uploading: p50 {b['p50_ms']:.1f} ms, p95 {b['p95_ms']:.1f} ms, "
          f"p99 {b['p99_ms']:.1f} ms over {b['n']} (goal p99 < 50)")
    p = f["previews_busy"]
    print(f"  previews while uploading: p50 {p['p50_ms']:.1f} ms, p99 {p['p99_ms']:.1f} ms "
          f"over {p['n']}")
    print(f"  reference, same deployment idle: metadata p50 {i['p50_ms']:.1f} ms, p99 "
          f"{i['p99_ms']:.1f} ms; previews p50 {f['previews_idle']['p50_ms']:.1f} ms")
    print(f"  errors: {f['errors']} (ready {f['ready']}/{f['uploads']}) (goal 0)")
    for line in f["error_samples"]:
        print(f"    {line}")


#: name -> (title, database, split, nice of the upload process, nice of the ingest work
#: inside it: MRC_INGEST_WORK_NICE); each differs from the one before it in one setting
CONFIGS = {
    "sqlite-flat": ("one process, SQLite, ingest work at the event loop's priority "
                    "(MRC_INGEST_WORK_NICE=0: how it ran before)", "sqlite", False, 0, 0),
    "sqlite": ("one process, SQLite, ingest work 10 nicer than the event loop (the "
               "default: work nice added)", "sqlite", False, 0, 10),
    "postgres": ("one process, PostgreSQL (database changed)", "postgres", False, 0, 10),
    "split": ("PostgreSQL, uploads and dashboard in two serve processes, same priority "
              "(split added)", "postgres", True, 0, 10),
    "split-nice": ("PostgreSQL, two processes, the upload one under nice 10 (nice added)",
                   "postgres", True, 10, 10),
}


def deploy(name: str, work: Path, pg, procs: list) -> tuple[str, str]:
    """Start deployment ``name``; returns (upload base URL, dashboard base URL)."""
    _title, database, split, nice, work_nice = CONFIGS[name]
    env = {"MRC_INGEST_DATABASE_URL": pg.create_database()} if database == "postgres" else {}
    env["MRC_INGEST_WORK_NICE"] = str(work_nice)
    data = work / f"data-{name}"
    ingest, ingest_base = start_server(data, "--workers", "2", env=env, nice=nice)
    procs.append(ingest)
    if not split:
        return ingest_base, ingest_base
    dashboard, dashboard_base = start_server(data, env={**env, "MRC_INGEST_WORKERS": "0"})
    procs.append(dashboard)
    return ingest_base, dashboard_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 x 128 MiB")
    parser.add_argument("--uploads", type=int, default=8)
    parser.add_argument("--size-mib", type=int, default=1024, help="per upload (x 8 MiB frames)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated subset of {', '.join(CONFIGS)}")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    started = begin()
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        sys.exit(f"unknown configs: {', '.join(sorted(unknown))}")
    frames = 16 if args.quick else max(1, args.size_mib * MiB // FRAME)
    size = frames * FRAME + 1024
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    work.chmod(0o755)
    figures: dict = {}
    pg = None
    try:
        frames_file = work / "frames.bin"
        write_frames(frames_file, frames)
        # one cluster for every deployment (idle while SQLite runs), a fresh database each
        pg = start_postgres(work / "pg", durable=True)
        for name in names:
            procs: list = []
            try:
                upload_base, dashboard_base = deploy(name, work, pg, procs)
                r = run(upload_base, dashboard_base, frames_file, frames, args.uploads,
                        args.quick)
            finally:
                for proc in procs:
                    if proc.poll() is None:
                        proc.terminate()
                        proc.wait(timeout=60)
                shutil.rmtree(work / f"data-{name}", ignore_errors=True)
            title, database, split, nice, work_nice = CONFIGS[name]
            figures[name] = {"title": title, "database": database, "split": split,
                             "nice": nice, "work_nice": work_nice,
                             **summary(r, args.uploads, size)}
            report(title, figures[name])
    finally:
        if pg is not None:
            pg.remove()
        shutil.rmtree(work, ignore_errors=True)
    print("\n## metadata p99 while uploading, one change at a time (goal < 50 ms)")
    previous = None
    for name in names:
        f = figures[name]
        step = (f"  {f['metadata_busy']['p99_ms'] / figures[previous]['metadata_busy']['p99_ms']:.2f}x "
                f"the step before" if previous else "")
        print(f"  {name:12s} p99 {f['metadata_busy']['p99_ms']:6.1f} ms (idle "
              f"{f['metadata_idle']['p99_ms']:.1f}), all ready {f['all_ready_s']:.1f} s, "
              f"errors {f['errors']}{step}")
        previous = name
    save("load", figures, args=vars(args), quick=args.quick, started=started,
         extra_packages=("psycopg", "uvicorn", "fastapi"))


if __name__ == "__main__":
    main()
