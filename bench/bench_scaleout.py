"""Scale-out (#14): each figure beside a reference measured in the same run, on this
machine, with a real PostgreSQL (fsync on) and a real SeaweedFS.

* ingest throughput of 16 registered movies with 1 and with 2 worker processes
  (``mrc-ingest worker --workers 1`` each, an API process with no workers), catalog
  on PostgreSQL, storage in the local folder (goal: 2 processes >= 1.5x one), and the
  same with SeaweedFS as the store;
* takeover: kill -9 of the worker holding a job; seconds until another worker has
  finished it, against the lease length (goal <= lease + 5 s);
* claim + complete rate of no-op jobs with 4 workers (goal >= 200 jobs/s), as 4
  threads of one process and as 4 processes.

Metadata latency under 8 concurrent uploads is bench/bench_load.py; S3 PUT against
boto3 is bench/bench_s3.py.

Run: ``python bench/bench_scaleout.py`` (about 4 min) or ``--quick``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.api_helpers import start_server  # noqa: E402
from tests.conftest import clean_environment  # noqa: E402
from tests.postgres import start_postgres  # noqa: E402
from tests.reference import raw_header  # noqa: E402
from tests.servers import start_seaweedfs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NX = NY = 4096


def write_movies(folder: Path, count: int, frames: int) -> list[Path]:
    """``count`` 4-bit movies of Poisson(1) counts, each with its own bytes (frame 0
    carries the movie's number) so none is a duplicate of another."""
    rng = np.random.default_rng(1)
    distinct = [np.minimum(rng.poisson(1.0, size=(NY, NX)), 15).astype(np.uint8)
                for _ in range(4)]
    packed = [(c[:, 0::2] | (c[:, 1::2] << 4)) for c in distinct]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"movie{i:02d}.mrc"
        with open(path, "wb") as f:
            f.write(raw_header(nx=NX, ny=NY, nz=frames, mode=101))
            for z in range(frames):
                frame = packed[z % len(packed)]
                if z == 0:
                    frame = frame.copy()
                    frame.flat[:2] = (i & 0xFF, i >> 8)
                f.write(frame.tobytes())
        paths.append(path)
    return paths


class Deployment:
    """One API process (no workers) and worker processes, on one catalog and store."""

    def __init__(self, root: Path, database_url: str, shared: Path,
                 storage_url: str | None = None, s3=None, **settings: str):
        self.root = root
        self.env = {"MRC_INGEST_DATABASE_URL": database_url,
                    "MRC_INGEST_ALLOWED_ROOTS": f'["{shared}"]',
                    **{f"MRC_INGEST_{k.upper()}": v for k, v in settings.items()}}
        if storage_url:
            self.env.update({"MRC_INGEST_STORAGE_URL": storage_url,
                             "MRC_INGEST_S3_ENDPOINT_URL": s3.endpoint_url, **s3.env})
        self.shared_store = storage_url is None  # the local folder: one for all
        self.api, self.base = start_server(self.data_dir("api"),
                                           env={**self.env, "MRC_INGEST_WORKERS": "0"})
        self.workers: list[subprocess.Popen] = []

    def data_dir(self, name: str) -> Path:
        return self.root / ("data" if self.shared_store else name)

    def start_worker(self) -> subprocess.Popen:
        name = f"worker{len(self.workers)}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--workers", "1",
             "--data-dir", str(self.data_dir(name)), "--log-level", "warning"],
            cwd=ROOT, env=clean_environment(self.env))
        self.workers.append(proc)
        return proc

    def stop(self) -> None:
        for proc in [self.api, *self.workers]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [self.api, *self.workers]:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy so far (/proc/stat: all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def register_all(base: str, paths: list[Path]) -> list[str]:
    ids = []
    with httpx.Client(base_url=base, timeout=60) as client:
        for path in paths:
            r = client.post("/v1/registrations", json={"path": str(path)})
            assert r.status_code == 202, r.text
            ids.append(r.json()["dataset"]["id"])
    return ids


def wait_ready(base: str, ids: list[str], timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base, timeout=60) as client:
        pending = set(ids)
        while pending:
            for dataset_id in list(pending):
                status = client.get(f"/v1/datasets/{dataset_id}").json()["status"]
                if status == "ready":
                    pending.discard(dataset_id)
                elif status in ("failed", "rejected"):
                    raise RuntimeError(f"dataset {dataset_id} is {status}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} datasets not ready")
            time.sleep(0.1)


def bench_throughput(work: Path, pg, movies: list[Path], s3=None) -> None:
    where = "SeaweedFS" if s3 else "local folder"
    total = sum(p.stat().st_size for p in movies)
    results = {}
    for processes in (1, 2):
        root = work / f"run-{where[:5]}-{processes}"
        storage = s3.url(f"bench{processes}{os.urandom(3).hex()}") if s3 else None
        deployment = Deployment(root, pg.create_database(), movies[0].parent, storage, s3)
        try:
            for _ in range(processes):
                deployment.start_worker()
            time.sleep(1.5)  # the workers are up and polling
            cpu_before = sum(cpu_seconds(p.pid) for p in deployment.workers)
            machine_before = machine_busy_seconds()
            started = time.perf_counter()
            wait_ready(deployment.base, register_all(deployment.base, movies))
            elapsed = time.perf_counter() - started
            cpu = sum(cpu_seconds(p.pid) for p in deployment.workers) - cpu_before
            machine = machine_busy_seconds() - machine_before
            results[processes] = (elapsed, cpu / elapsed, machine / elapsed)
        finally:
            deployment.stop()
            shutil.rmtree(root, ignore_errors=True)
    (one, one_cores, one_all), (two, two_cores, two_all) = results[1], results[2]
    print(f"\n## ingest of {len(movies)} registered 4-bit movies ({total / 1e9:.2f} GB), "
          f"PostgreSQL catalog, {where}, {os.cpu_count()} cores")
    print(f"  1 worker process  : {one:6.2f} s  {total / one / 1e6:5.0f} MB/s; worker busy "
          f"{one_cores:.2f} cores, the machine {one_all:.2f}")
    print(f"  2 worker processes: {two:6.2f} s  {total / two / 1e6:5.0f} MB/s; workers busy "
          f"{two_cores:.2f} cores, the machine {two_all:.2f}  -> {one / two:.2f}x "
          "(goal >= 1.5x)")


def bench_takeover(work: Path, pg, movie: Path, lease: float) -> None:
    root = work / f"takeover-{lease:g}"
    deployment = Deployment(root, pg.create_database(), movie.parent,
                            job_lease_seconds=f"{lease:g}")
    engine = sa.create_engine(deployment.env["MRC_INGEST_DATABASE_URL"])
    try:
        # the job's own length, undisturbed, in the same run
        solo = deployment.start_worker()
        time.sleep(1.5)
        t = time.perf_counter()
        wait_ready(deployment.base, register_all(deployment.base, [movie]))
        job_seconds = time.perf_counter() - t
        solo.terminate()
        solo.wait()
        deployment.workers.clear()
        with engine.begin() as conn:  # the same file again: a fresh catalog row
            conn.execute(sa.text("DELETE FROM datasets"))
            conn.execute(sa.text("DELETE FROM jobs"))
        a, b = deployment.start_worker(), deployment.start_worker()
        time.sleep(1.5)
        (dataset_id,) = register_all(deployment.base, [movie])
        while True:  # which of the two holds it?
            with engine.connect() as conn:
                owner = conn.execute(sa.text(
                    "SELECT lease_owner FROM jobs WHERE dataset_id = :d AND state = "
                    "'running'"), {"d": dataset_id}).scalar()
            if owner:
                break
            time.sleep(0.02)
        holder = a if f":{a.pid}:" in owner else b
        time.sleep(min(0.5, job_seconds / 3))  # mid-job
        killed = time.perf_counter()
        os.kill(holder.pid, signal.SIGKILL)
        wait_ready(deployment.base, [dataset_id], timeout=lease * 3 + 60)
        takeover = time.perf_counter() - killed
        with engine.connect() as conn:
            count = conn.execute(sa.text("SELECT count(*) FROM datasets")).scalar()
            attempts = conn.execute(sa.text("SELECT attempts FROM jobs WHERE dataset_id = :d "
                                            "AND kind = 'ingest'"), {"d": dataset_id}).scalar()
        assert count == 1
    finally:
        engine.dispose()
        deployment.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n## takeover after kill -9, lease {lease:g} s")
    print(f"  the job alone (reference): {job_seconds:.2f} s")
    print(f"  kill -9 of its worker -> done by the other: {takeover:.2f} s "
          f"(attempt {attempts}; goal <= lease + 5 = {lease + 5:g} s)")


def _noop_worker(url: str, threads: int, seconds: float, ready, go) -> None:
    from service.catalog import Catalog
    from service.jobs import JobQueue

    catalog = Catalog(url, migrate=False, pool_size=threads + 2)
    queue = JobQueue(catalog, threads, lambda job, ctx: None, lease_seconds=30)
    ready.set()
    go.wait()
    queue.start()
    time.sleep(seconds)
    queue.shutdown()
    catalog.engine.dispose()


def bench_claims(pg, jobs: int) -> None:
    from service.catalog import Catalog
    from service.catalog.clock import text_now
    from service.catalog.schema import jobs as jobs_table

    print(f"\n## claim + complete of {jobs} no-op jobs, PostgreSQL with fsync on")
    for processes, threads in ((1, 4), (4, 1)):
        url = pg.create_database()
        catalog = Catalog(url)
        now = text_now()
        rows = [{"id": f"noop{i:08d}", "kind": "noop", "dataset_id": f"d{i % 97}",
                 "state": "queued", "done": 0, "total": 0, "attempts": 0, "max_attempts": 3,
                 "priority": 100, "cancel_requested": False, "created_at": now,
                 "run_after": now} for i in range(jobs)]
        with catalog.engine.begin() as conn:
            conn.execute(jobs_table.insert(), rows)
        context = multiprocessing.get_context("spawn")
        go = context.Event()
        readies = [context.Event() for _ in range(processes)]
        procs = [context.Process(target=_noop_worker, args=(url, threads, 120.0, r, go))
                 for r in readies]
        for p in procs:
            p.start()
        for r in readies:
            r.wait(60)
        started = time.perf_counter()
        go.set()
        with catalog.engine.connect() as conn:
            while conn.execute(sa.text("SELECT count(*) FROM jobs WHERE state = 'done'")
                               ).scalar() < jobs:
                time.sleep(0.05)
                conn.commit()
        seconds = time.perf_counter() - started
        for p in procs:
            p.terminate()
            p.join()
        catalog.engine.dispose()
        label = f"{processes} process{'es' if processes > 1 else ''} x {threads} " \
                f"thread{'s' if threads > 1 else ''}"
        print(f"  {label:22s}: {seconds:6.2f} s -> {jobs / seconds:6.0f} jobs/s "
              f"(goal >= 200)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    frames = 4 if args.quick else 16        # x 8 MiB: 16 x 134 MB = 2.1 GB
    work = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    work.chmod(0o755)
    pg = start_postgres(work / "pg", durable=True)
    s3 = start_seaweedfs()
    try:
        print(f"work: {work} ({os.cpu_count()} CPUs)")
        movies = write_movies(work / "shared", 16, frames)
        bench_throughput(work, pg, movies)
        bench_throughput(work, pg, movies, s3)
        long_movie = write_movies(work / "shared-long", 1, 24 if args.quick else 48)[0]
        for lease in ((5.0,) if args.quick else (30.0, 10.0)):
            bench_takeover(work, pg, long_movie, lease)
        bench_claims(pg, 500 if args.quick else 3000)
    finally:
        s3.stop()
        pg.remove()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
