"""One place where a benchmark run is written down: ``bench/results/<name>.json``.

Every figure the README quotes comes from one of these files. Each holds the machine
(cores, CPU model from /proc/cpuinfo, memory, kernel), the versions that matter (Python,
numpy, blosc, SQLAlchemy, and any the bench adds), the git commit of the tree that ran
and whether service/ had uncommitted changes at the time, the command line, and the
figures, each beside the reference measured in the same run.

    from bench.results import save
    from bench.results import begin, save
    begin()   # waits for a quiet machine, notes the CPU counters
    ...
    save("ingest", {"ready": {...}, ...}, args=vars(args))

``--quick`` runs write ``<name>.quick.json`` so a smoke run never overwrites a real one.

To measure a committed tree while the work tree holds other people's unfinished edits,
run the benchmark from an exported snapshot (bench/README.md): ``MRC_BENCH_COMMIT`` names
the commit the snapshot was exported from (the snapshot has no .git) and
``MRC_BENCH_RESULTS`` the folder the JSON goes to.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("MRC_BENCH_RESULTS") or ROOT / "bench" / "results")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True,
                              text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine(extra_packages: tuple[str, ...] = ()) -> dict[str, Any]:
    """What ran the benchmark: enough to tell two runs' machines and code apart."""
    snapshot = os.environ.get("MRC_BENCH_COMMIT")
    if snapshot:  # an exported tree of that commit: service/ is exactly the commit's
        commit, dirty = snapshot, []
    else:
        commit = _git("rev-parse", "HEAD").strip()
        dirty = [line[3:] for line in _git("status", "--porcelain", "--", "service",
                                           "pyproject.toml").splitlines() if line.strip()]
    digest = hashlib.sha256()
    for path in sorted(dirty):  # the uncommitted service code that ran, fingerprinted
        try:
            digest.update(path.encode() + (ROOT / path).read_bytes())
        except OSError:
            digest.update(path.encode())
    packages = ("numpy", "blosc", "sqlalchemy", *extra_packages)
    return {
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _mem_total_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in packages},
        "git_commit": commit,
        "tree": f"git archive of {snapshot}" if snapshot else str(ROOT),
        "service_uncommitted": dirty,
        "bench_sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16]
                         for p in (Path(sys.argv[0]).resolve(), Path(__file__).resolve())
                         if p.is_file()},
        "service_uncommitted_sha256": digest.hexdigest() if dirty else None,
        "load_average_at_save": list(os.getloadavg()),
    }


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])       # guest time is already in user
    return total - idle, total


def busy_fraction(seconds: float = 3.0) -> float:
    """How busy the whole machine was over the next ``seconds`` (0..1 of all cores)."""
    b0, t0 = _busy_jiffies()
    time.sleep(seconds)
    b1, t1 = _busy_jiffies()
    return (b1 - b0) / max(1, t1 - t0)


def _own_cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for children only
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


_RUN: dict[str, Any] = {}


def begin(wait_quiet: float | None = None, quiet_below: float = 0.15) -> str:
    """Call at the start of a benchmark: waits (up to ``wait_quiet`` s) until the
    machine is quiet -- other processes' benchmarks would share our cores -- then
    notes the time and the CPU counters that :func:`save` compares with.
    ``MRC_BENCH_WAIT_QUIET`` (seconds) overrides the wait; 0 starts at once."""
    if wait_quiet is None:
        wait_quiet = float(os.environ.get("MRC_BENCH_WAIT_QUIET", 600))
    deadline = time.monotonic() + wait_quiet
    busy = busy_fraction()
    while busy > quiet_below and time.monotonic() < deadline:
        print(f"waiting for a quiet machine: {busy:.0%} of the CPUs busy", flush=True)
        busy = busy_fraction(10.0)
    _RUN.update(started=now(), busy_before=round(busy, 3), jiffies=_busy_jiffies(),
                own_cpu=_own_cpu_s(), clock=time.monotonic())
    return _RUN["started"]


def _run_cpu() -> dict[str, Any]:
    """The machine's CPU use over the run, and how much of it was not this benchmark's
    own processes (a rough sign of interference: servers a bench does not wait for,
    such as PostgreSQL, count as others)."""
    if not _RUN:
        return {}
    b1, _ = _busy_jiffies()
    tick = os.sysconf("SC_CLK_TCK")
    machine_s = (b1 - _RUN["jiffies"][0]) / tick
    own_s = _own_cpu_s() - _RUN["own_cpu"]
    wall = time.monotonic() - _RUN["clock"]
    return {"wall_s": round(wall, 1), "machine_busy_cpu_s": round(machine_s, 1),
            "own_cpu_s": round(own_s, 1),
            "others_cpu_s_approx": round(max(0.0, machine_s - own_s), 1),
            "machine_busy_before_start": _RUN["busy_before"]}


def save(name: str, figures: dict[str, Any], *, args: dict[str, Any] | None = None,
         quick: bool = False, started: str | None = None,
         extra_packages: tuple[str, ...] = ()) -> Path:
    """Write ``bench/results/<name>.json`` (``<name>.quick.json`` for a smoke run) and
    return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}{'.quick' if quick else ''}.json"
    record = {
        "benchmark": name,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in (args or {}).items()},
        "started": started or _RUN.get("started"),
        "finished": now(),
        "cpu_during_run": _run_cpu(),
        "machine": machine(extra_packages),
        "figures": figures,
    }
    path.write_text(json.dumps(record, indent=2, default=_plain) + "\n")
    print(f"\nresults: {path}")
    return path


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _plain(value: Any) -> Any:
    """numpy scalars and the like, as JSON."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def seconds(values: list[float], digits: int = 3) -> list[float]:
    return [round(v, digits) for v in values]
