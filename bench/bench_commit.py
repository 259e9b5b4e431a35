"""The commit protocol under fire ("Nothing lost between the last byte and the answer"),
each figure beside its reference in the same run.

* **kill -9 across the last PATCH's window**: a tus client sends a 4-bit K3-size movie
  up to its last 48 MiB, then the last PATCH; the server is killed with SIGKILL at N
  instants spread evenly from the last byte sent to just past the answer's usual arrival
  (the window is measured first, with no kill: the reference). After each kill the
  server starts again and the client does what tus clients do (HEAD, send what is
  missing). Counted: movies lost (the client was told complete, no ready dataset after
  60 s) and duplicated (two live datasets of one content), and, after one sweep,
  whatever tests/invariants.py (plain SQL and the data folder's own listing) finds.
* **no regression**: server CPU-seconds per GiB and the time from first byte to ready
  for a ``curl -T`` PUT of the same movie, against the code before the commit protocol
  (``--baseline``, default the commit before it), side by side in one run.

Run: ``python bench/bench_commit.py`` (~6 min) or ``--quick``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_ingest import K3, write_movie  # noqa: E402
from tests.api_helpers import run_recover  # noqa: E402
from tests.conftest import clean_environment, free_port  # noqa: E402
from tests.invariants import Place, Sent, check, sha256_of  # noqa: E402

TUS = {"Tus-Resumable": "1.0.0"}
MiB = 1 << 20
LAST_PATCH = 48 * MiB


#: runs ``service.cli`` from the tree on PYTHONPATH, whatever is installed: an editable
#: install's import hook would otherwise map ``service.*`` back to this checkout
BOOT = ("import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path "
        "if 'editable' not in repr(f).lower()]; sys.argv[0] = 'mrc-ingest'; "
        "runpy.run_module('service.cli', run_name='__main__', alter_sys=True)")


class Server:
    """``mrc-ingest serve`` of the tree at ``tree`` (this one, or the baseline's)."""

    def __init__(self, data_dir: Path, tree: Path = ROOT, **settings: str):
        self.data_dir, self.tree = data_dir, tree
        self.port = free_port()
        env = clean_environment({f"MRC_INGEST_{k.upper()}": str(v)
                                 for k, v in settings.items()})
        env["PYTHONPATH"] = str(tree)  # the tree's own service package, not the installed
        self.proc = subprocess.Popen(
            [sys.executable, "-c", BOOT, "serve", "--port", str(self.port),
             "--data-dir", str(data_dir), "--log-level", "warning"], cwd=tree, env=env)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.base}/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                raise RuntimeError(f"the server of {tree} did not start")
            time.sleep(0.1)

    def cpu_seconds(self) -> float:
        """user + system CPU of the server process, all threads."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


# -- kill -9 across the last PATCH's window ------------------------------------------------

def tus_create(base: str, length: int, name: str) -> str:
    created = httpx.post(f"{base}/v1/tus/", headers={
        **TUS, "Upload-Length": str(length),
        "Upload-Metadata": "filename " + base64.b64encode(name.encode()).decode()})
    created.raise_for_status()
    return created.headers["location"]


def tus_patch(base: str, location: str, raw: memoryview, offset: int, stop: int,
              on_last_byte=None) -> httpx.Response:
    def body():
        for start in range(offset, stop, 4 * MiB):
            yield bytes(raw[start:min(stop, start + 4 * MiB)])
        if on_last_byte is not None:
            on_last_byte()
    return httpx.patch(f"{base}{location}", content=body(), timeout=300, headers={
        **TUS, "Upload-Offset": str(offset), "Content-Length": str(stop - offset),
        "Content-Type": "application/offset+octet-stream"})


def tus_resume(base: str, location: str, raw: memoryview) -> bool:
    """A tus client after a broken PATCH: HEAD, then send the rest; True when the server
    says every byte is in."""
    head = httpx.head(f"{base}{location}", headers=TUS)
    if head.status_code != 200:
        return False
    offset = int(head.headers["upload-offset"])
    if offset < len(raw):
        response = tus_patch(base, location, raw, offset, len(raw))
        if response.status_code != 204:
            return False
    head = httpx.head(f"{base}{location}", headers=TUS)
    return head.status_code == 200 and int(head.headers["upload-offset"]) == len(raw)


def bench_kills(work: Path, frames: int, kills: int) -> None:
    movie = work / "k3.mrc"
    size = write_movie(movie, K3, frames, 101)
    template = bytearray(movie.read_bytes())
    data_dir = work / "data-kills"
    settings = {"recovery_seconds": "1", "workers": "2"}
    place = Place(f"sqlite:///{data_dir.resolve() / 'catalog.sqlite3'}", data_dir=data_dir)
    windows, sent, lost, duplicated = [], [], 0, 0

    def variant(i: int) -> memoryview:
        raw = bytearray(template)
        raw[-1] = i % 256
        raw[-2] = i // 256
        return memoryview(raw)

    server = Server(data_dir, **settings)
    try:  # the reference: the window from the last byte to the answer, no kill
        for i in range(3):
            raw = variant(60000 + i)
            location = tus_create(server.base, len(raw), f"ref{i}.mrc")
            tus_patch(server.base, location, raw, 0, len(raw) - LAST_PATCH)
            marks = {}
            response = tus_patch(server.base, location, raw, len(raw) - LAST_PATCH, len(raw),
                                 lambda: marks.setdefault("last", time.perf_counter()))
            assert response.status_code == 204, response.text
            windows.append(time.perf_counter() - marks["last"])
            sent.append(Sent(f"ref{i}.mrc", sha256_of(raw), told_complete=True))
        window = statistics.median(windows)
        print(f"\n## kill -9 across the last PATCH's window: {size / 2**30:.2f} GiB 4-bit "
              f"movie, last PATCH {LAST_PATCH // MiB} MiB")
        print(f"  last byte -> 204 with no kill (reference): median {window * 1000:.0f} ms "
              f"(runs {', '.join(f'{w * 1000:.0f}' for w in windows)})")
        for k in range(kills):
            at = window * 1.2 * k / max(1, kills - 1)
            raw = variant(k)
            location = tus_create(server.base, len(raw), f"kill{k}.mrc")
            tus_patch(server.base, location, raw, 0, len(raw) - LAST_PATCH)
            victim = server

            def kill_later() -> None:
                threading.Timer(at, victim.kill).start()
            try:
                answered = tus_patch(server.base, location, raw, len(raw) - LAST_PATCH,
                                     len(raw), kill_later).status_code == 204
            except httpx.TransportError:
                answered = False
            victim.proc.wait()  # the timer always fires: the server is dead now
            server = Server(data_dir, **settings)
            told = answered or tus_resume(server.base, location, raw)
            movie_sent = Sent(f"kill{k}.mrc", sha256_of(raw), told_complete=told)
            sent.append(movie_sent)
            deadline = time.monotonic() + 60
            while True:
                rows = [r for r in place.datasets() if r["sha256"] == movie_sent.sha256]
                if any(r["status"] == "ready" for r in rows) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            live = [r for r in rows if r["status"] in ("receiving", "queued", "processing",
                                                          "ready")]
            lost += told and not any(r["status"] == "ready" for r in rows)
            duplicated += len(live) > 1
            print(f"  kill at +{at * 1000:4.0f} ms: {'answered 204' if answered else 'no answer'}"
                  f", told complete: {told}, datasets: "
                  f"{sorted(r['status'] for r in rows)}")
    finally:
        server.stop()
    run_recover(data_dir)
    server = Server(data_dir, **settings)
    try:
        problems = check(place, sent, base_url=server.base)
    finally:
        server.stop()
    told = sum(m.told_complete for m in sent) - len(windows)
    print(f"  -> {kills} kills (goal >= 20): {told} told complete, {lost} lost, "
          f"{duplicated} duplicated (goal 0 and 0); invariant checker: "
          f"{len(problems)} problems")
    for problem in problems:
        print(f"     {problem}")
    shutil.rmtree(data_dir, ignore_errors=True)
    movie.unlink()


# -- no regression against the code before the commit protocol ----------------------------

def baseline_tree(work: Path, revision: str) -> Path:
    """A worktree of ``revision`` (its own checkout, removed afterwards)."""
    tree = work / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force",
                    str(tree), revision], check=True, capture_output=True)
    return tree


def put_once(server: Server, movie: Path, name: str) -> tuple[float, float]:
    before = server.cpu_seconds()
    t = time.perf_counter()
    out = subprocess.run(["curl", "-sS", "--fail-with-body", "-T", str(movie),
                          f"{server.base}/v1/uploads/{name}"], capture_output=True)
    seconds = time.perf_counter() - t
    assert out.returncode == 0, out.stdout
    answer = json.loads(out.stdout)
    assert answer["dataset"]["status"] == "ready", answer
    time.sleep(0.3)  # let the threads that finish after the answer show in the count
    cpu = server.cpu_seconds() - before
    httpx.delete(f"{server.base}/v1/datasets/{answer['dataset']['id']}", timeout=120)
    return seconds, cpu


def bench_regression(work: Path, frames: int, rounds: int, revision: str) -> None:
    revision = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", revision],
                              capture_output=True, text=True, check=True).stdout.strip()
    movie = work / "k3-put.mrc"
    size = write_movie(movie, K3, frames, 101)
    tree = baseline_tree(work, revision)
    servers = {"before": Server(work / "data-before", tree), "now": Server(work / "data-now")}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
    try:
        for i in range(rounds + 1):  # the first round warms caches; alternate the two
            for name, server in servers.items():
                measured = put_once(server, movie, f"{name}-{i}.mrc")
                if i:
                    results[name].append(measured)
    finally:
        for server in servers.values():
            server.stop()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                       capture_output=True)
        movie.unlink()
    gib = size / 2**30
    print(f"\n## no regression: curl -T of a {gib:.2f} GiB 4-bit movie, median of {rounds}, "
          f"servers of both trees alternating")
    medians = {}
    for name, runs in results.items():
        ready = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs) / gib
        medians[name] = (ready, cpu)
        label = f"before ({revision[:10]}, reference)" if name == "before" else "now"
        print(f"  {label:32s}: ready {ready:5.2f} s, server CPU {cpu:5.2f} s/GiB")
    (r0, c0), (r1, c1) = medians["before"], medians["now"]
    print(f"  -> ready {r1 / r0:.3f}x, CPU per GiB {c1 / c0:.3f}x the code before "
          f"(goal within 5 %: <= 1.05x)")


def default_baseline() -> str:
    """The commit before the commit protocol came in (the parent of the first commit
    that touched service/arrival/), else HEAD."""
    first = subprocess.run(["git", "-C", str(ROOT), "log", "--format=%H", "--",
                            "service/arrival/"], capture_output=True, text=True).stdout.split()
    return f"{first[-1]}^" if first else "HEAD"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller movies, 20 kills")
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--baseline", default=None, help="git revision to compare with")
    parser.add_argument("--scratch", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-commit-", dir=args.scratch))
    try:
        bench_kills(work, 8 if args.quick else 14, 20 if args.quick else args.kills)
        bench_regression(work, 24 if args.quick else 48, 3 if args.quick else 5,
                         args.baseline or default_baseline())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
