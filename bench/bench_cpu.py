"""Server CPU per GiB on the ingest write path (issue #19 "Half the CPU per gigabyte").

Starts a real ``mrc-ingest serve`` (SQLite catalog, local data folder), PUTs (``curl -T``)
a ~1 GiB synthetic K3-sized movie (Poisson(1) counts as 4-bit, int16 and float32) and
measures the server process's user + system CPU seconds (``/proc/PID/stat``, all
threads) per GiB received, and its peak RSS (VmHWM). Beside them, measured in the same
run on the same file: ``cp`` + ``sync`` of it (CPU of ``cp`` and wall time) and the bare
library kernels per GiB of packed 4-bit (SHA-256, unpack, frame sum, exact statistics,
blosc1 zstd-1 and lz4 bitshuffle compress of the unpacked counts the archive holds, with
their ratio to the packed bytes, blosc1 and blosc2 decompress of those chunks).

    python bench/bench_cpu.py                 # ~1 GiB movies, 3 measured PUTs each
    python bench/bench_cpu.py --quick         # ~0.25 GiB, a smoke run
    python bench/bench_cpu.py --py-spy DIR    # also record the server (py-spy --native)
    python bench/bench_cpu.py --tree before=/tmp/base --tree now=.   # servers of two
        # source trees take turns on the same files (CPU-seconds on a shared machine
        # drift with its load: compare trees within one run, never across runs)
    python bench/bench_cpu.py --modes 101 --tree zstd=. --tree lz4=.,archive_codec=lz4 \
        --name cpu_codec                        # one tree, two archive codecs
    python bench/bench_cpu.py --modes none    # the kernels only

Writes bench/results/cpu.json (cores, CPU model, python/numpy/blosc versions, figures).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_commit import Server  # noqa: E402
from bench.bench_ingest import K3, RssSampler, poisson_frames, write_movie  # noqa: E402

GiB = 1 << 30
MODES = {101: "4-bit", 1: "int16", 2: "float32"}
GOAL_4BIT = 5.0
#: `perf record` settings for --perf: CPU-clock samples with frame-pointer stacks by
#: default; BENCH_PERF_EVENTS="-e page-faults" and BENCH_PERF_CALL_GRAPH=dwarf,16384
#: find where faults and copies come from (libc has no frame pointers)
PERF_EVENTS = os.environ.get("BENCH_PERF_EVENTS", "-F 499").split()
PERF_CALL_GRAPH = os.environ.get("BENCH_PERF_CALL_GRAPH", "fp")


from bench.results import _cpu_model as cpu_model  # noqa: E402


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def frames_for(mode: int, gib: float) -> int:
    ny, nx = K3
    frame = ny * {101: (nx + 1) // 2, 1: 2 * nx, 2: 4 * nx}[mode]
    return max(1, round(gib * GiB / frame))


def proc_counts(pid: int) -> tuple[float, float, int]:
    """(user CPU s, system CPU s, minor page faults) of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7])


def loop_cpu(pid: int) -> float:
    """CPU seconds of the process's main thread: the event loop (uvicorn, the socket
    reads, the request body's chunks). Python does not name its threads for the OS, so
    the other threads (frames, hashing, blosc) are told apart only as the rest."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def put(server: Server, movie: Path, name: str) -> tuple[float, float, dict]:
    """(wall seconds, server CPU seconds, answer) of one ``curl -T``."""
    loop_before = loop_cpu(server.proc.pid)
    counts_before = proc_counts(server.proc.pid)
    before = server.cpu_seconds()
    t = time.perf_counter()
    out = subprocess.run(["curl", "-sS", "--fail-with-body", "-T", str(movie),
                          f"{server.base}/v1/uploads/{name}"], capture_output=True)
    seconds = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"PUT {name}: {out.stdout!r} {out.stderr!r}")
    answer = json.loads(out.stdout)
    time.sleep(0.3)  # threads that finish after the answer (the release) show in the count
    cpu = server.cpu_seconds() - before
    put.loop = loop_cpu(server.proc.pid) - loop_before
    put.counts = [a - b for a, b in zip(proc_counts(server.proc.pid), counts_before)]
    return seconds, cpu, answer


def put_checked(server: Server, movie: Path, name: str) -> tuple[float, float, dict]:
    """:func:`put`, then the dataset is checked (ready, stored as a restorable archive)
    and deleted."""
    seconds, cpu, answer = put(server, movie, name)
    dataset = answer["dataset"]
    assert dataset["status"] == "ready", dataset
    detail = httpx.get(f"{server.base}/v1/datasets/{dataset['id']}", timeout=60).json()
    archive = detail.get("archive") or {}
    assert archive.get("restorable"), detail
    httpx.delete(f"{server.base}/v1/datasets/{dataset['id']}", timeout=120)
    put_checked.archive = archive
    return seconds, cpu, answer


def cp_sync(movie: Path, target: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of cp) of ``cp`` + ``sync``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(["cp", str(movie), str(target)], check=True)
    os.sync()
    seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    target.unlink()
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def bench_puts(work: Path, servers: dict[str, Server], mode: int, gib: float, repeat: int,
               profile: Path | None, perf: Path | None = None) -> dict[str, dict]:
    """``repeat`` measured PUTs of one movie to each server, alternating (after one round
    that warms page cache and allocators), each beside a ``cp`` + ``sync`` of it."""
    frames = frames_for(mode, gib)
    movie = work / f"k3-{mode}.mrc"
    size = write_movie(movie, K3, frames, mode)
    os.sync()
    runs: dict[str, list] = {label: [] for label in servers}
    refs = []
    samplers = {label: RssSampler(server.proc.pid) for label, server in servers.items()}
    try:
        for i in range(repeat + 1):
            refs.append(cp_sync(movie, work / "copy.mrc"))
            for label, server in servers.items():
                seconds, cpu, _ = put_checked(server, movie, f"m{mode}-{i}.mrc")
                if i:
                    runs[label].append((seconds, cpu, put.loop, put.counts,
                                        put_checked.archive.get("ratio_to_original")))
        if profile is not None:  # one more PUT, not measured: py-spy --native pauses it
            for label, server in servers.items():
                spy = subprocess.Popen(
                    [str(Path(sys.executable).with_name("py-spy")), "record", "--native",
                     "--rate", "100", "--format", "raw", "--threads", "--pid",
                     str(server.proc.pid), "--output", str(profile / f"put-{mode}-{label}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
                put_checked(server, movie, f"m{mode}-profile.mrc")
                spy.send_signal(2)
                spy.wait(120)
        if perf is not None:  # one more PUT under `perf record`: CPU samples only (py-spy's
            # raw stacks sample every thread, waiting ones too)
            for label, server in servers.items():
                data = perf / f"put-{mode}-{label}.perf.data"
                recorder = subprocess.Popen(
                    ["perf", "record", *PERF_EVENTS, "--call-graph", PERF_CALL_GRAPH,
                     "-p", str(server.proc.pid), "-o", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
                put_checked(server, movie, f"m{mode}-perf.mrc")
                recorder.send_signal(2)
                recorder.wait(120)
                with open(perf / f"put-{mode}-{label}.txt", "w") as report:
                    subprocess.run(["perf", "report", "-i", str(data), "--no-children",
                                    "--sort", "dso,sym", "--stdio", "-g", "none",
                                    "--percent-limit", "0.3"],
                                   stdout=report, stderr=subprocess.DEVNULL, check=False)
    finally:
        movie.unlink()
        rss = {label: sampler.stop() for label, sampler in samplers.items()}
    g = size / GiB
    pixels = frames * K3[0] * K3[1]
    refs = refs[1:]
    out = {}
    for label, measured in runs.items():
        cpu = statistics.median(m[1] for m in measured)
        out[label] = {
            "mode": mode, "name": MODES[mode], "frames": frames, "bytes": size,
            "cpu_s_per_gib": cpu / g, "cpu_s_per_gpixel": cpu / (pixels / 2**30),
            "cpu_runs_s": [round(m[1], 3) for m in measured],
            "wall_s": statistics.median(m[0] for m in measured),
            "cp_sync_wall_s": statistics.median(r for r, _ in refs),
            "cp_cpu_s_per_gib": statistics.median(c for _, c in refs) / g,
            "ratio_to_archive": measured[-1][4],
            "event_loop_cpu_s_per_gib": statistics.median(m[2] for m in measured) / g,
            "user_s_per_gib": statistics.median(m[3][0] for m in measured) / g,
            "system_s_per_gib": statistics.median(m[3][1] for m in measured) / g,
            "minor_faults_per_gib": statistics.median(m[3][2] for m in measured) / g,
            "peak_rss_anon_mib": rss[label]["RssAnon"],
            "peak_rss_file_mib": rss[label]["RssFile"]}
    return out


def gil_stalls(calls: int = 12) -> dict[str, float]:
    """How long every other thread waits (ms, the longest gap between a main-thread
    loop's 0.5 ms naps) while a worker thread compresses or decompresses one unpacked
    K3 4-bit frame, at the service's one blosc thread and at one per core: with more
    than one, blosc keeps the GIL for the whole call, and in the service the thread
    that waits is the event loop."""
    from service.mrc import codec as codec_mod

    frame = poisson_frames(K3)[0].reshape(-1)
    out = np.empty_like(frame)
    chunk = codec_mod.compress_frame(frame, codec_mod.Codec.ZSTD, 1)

    def longest_gap(work) -> float:
        worker = threading.Thread(target=lambda: [work() for _ in range(calls)])
        gaps, last = [], time.perf_counter()
        worker.start()
        while worker.is_alive():
            time.sleep(0.0005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        worker.join()
        return round(max(gaps) * 1000, 2)

    stalls = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        previous = codec_mod.set_threads(threads)
        try:
            stalls[f"compress_threads_{threads}"] = longest_gap(
                lambda: codec_mod.compress_frame(frame, codec_mod.Codec.ZSTD, 1))
            stalls[f"decompress_threads_{threads}"] = longest_gap(
                lambda: codec_mod.decompress_into(chunk, out))
        finally:
            codec_mod.set_threads(previous)
    return stalls


def kernels(frames: int) -> dict:
    """The bare library kernels on packed 4-bit K3 frames, CPU seconds per GiB packed."""
    import blosc
    import blosc2

    from service.mrc import codec as codec_mod
    from service.mrc.modes import unpack_4bit
    from service.mrc.preview import BinnedSum
    from service.mrc.stats import StatsAccumulator

    ny, nx = K3
    packed = [(c[:, 0::2] | (c[:, 1::2] << 4)) for c in poisson_frames(K3)]
    stack = [packed[k % len(packed)] for k in range(frames)]
    nbytes = sum(p.nbytes for p in stack)
    g = nbytes / GiB

    def cpu(fn) -> float:
        t = time.process_time()
        fn()
        return (time.process_time() - t) / g

    out: dict[str, float] = {}
    h = hashlib.sha256()
    out["sha256"] = cpu(lambda: [h.update(p) for p in stack])
    buf = np.empty(ny * nx, np.uint8)
    out["numpy_unpack"] = cpu(lambda: [unpack_4bit(p, nx, buf) for p in stack])
    counts = unpack_4bit(stack[0], nx).copy()
    s = BinnedSum(ny, nx, 1024)
    out["frame_sum"] = cpu(lambda: [s.add(counts) for _ in stack])
    s2 = BinnedSum(ny, nx, 1024)
    out["frame_sum_small_counts"] = cpu(lambda: [s2.add(counts, counts_max=15)
                                                 for _ in stack])
    acc = StatsAccumulator()
    out["stats_unpacked_uint8"] = cpu(lambda: [acc.add(counts) for _ in stack])

    def histogram(packed: np.ndarray) -> None:
        """The issue's alternative: exact 4-bit statistics from a 256-bin histogram of
        the packed bytes (np.bincount; it widens its input to intp, in 64 Ki pieces)."""
        flat = packed.reshape(-1)
        hist = np.zeros(256, np.int64)
        for start in range(0, flat.size, 1 << 16):
            hist += np.bincount(flat[start:start + (1 << 16)], minlength=256)

    out["stats_packed_histogram"] = cpu(lambda: [histogram(p) for p in stack])
    # what the archive holds of a 4-bit movie: its counts unpacked (mode 0), one byte
    # per pixel, twice the packed bytes
    flat = [unpack_4bit(p, nx).copy().reshape(-1) for p in packed]
    codec_mod.set_threads(os.cpu_count() or 1)
    dst = np.empty(flat[0].size, np.uint8)
    blosc2.set_nthreads(os.cpu_count() or 1)
    for name, codec in (("zstd1", codec_mod.Codec.ZSTD), ("lz4", codec_mod.Codec.LZ4)):
        chunks: list[bytes] = []
        out[f"blosc1_{name}_compress"] = cpu(lambda: chunks.extend(
            codec_mod.compress_frame(flat[k % len(flat)], codec, 1) for k in range(frames)))
        out[f"ratio_{name}_to_packed"] = nbytes / sum(len(c) for c in chunks)
        if name == "zstd1":
            out["blosc1_decompress"] = cpu(lambda: [blosc.decompress_ptr(c, dst.ctypes.data)
                                                    for c in chunks])
            out["blosc2_decompress"] = cpu(lambda: [blosc2.decompress(c, dst=dst)
                                                    for c in chunks])
        else:
            out[f"blosc2_decompress_{name}"] = cpu(lambda: [blosc2.decompress(c, dst=dst)
                                                            for c in chunks])
    out["compare"] = cpu(lambda: [np.array_equal(dst, flat[0]) for _ in stack])
    # a sparser movie (0.1 counts per pixel per frame), for the storage side of the codec
    sparse = poisson_frames(K3, lam=0.1)[:2]
    for name, codec in (("zstd1", codec_mod.Codec.ZSTD), ("lz4", codec_mod.Codec.LZ4)):
        chunks = [codec_mod.compress_frame(f.reshape(-1), codec, 1) for f in sparse]
        out[f"ratio_{name}_to_packed_poisson0.1"] = \
            sum(f.size // 2 for f in sparse) / sum(len(c) for c in chunks)
    return {k: round(v, 3) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~0.25 GiB movies, 2 PUTs")
    parser.add_argument("--gib", type=float, default=None)
    parser.add_argument("--repeat", type=int, default=None, help="measured PUTs per movie")
    parser.add_argument("--modes", default="101,1,2")
    parser.add_argument("--scratch", type=Path, default=None)
    parser.add_argument("--py-spy", dest="profile", type=Path, default=None,
                        help="record the server during the first measured PUT of each movie")
    parser.add_argument("--perf", type=Path, default=None,
                        help="also record one PUT with `perf record` (CPU samples) into DIR")
    parser.add_argument("--mrcz", action="store_true",
                        help="also MRCZ write incl. exact stats vs mrcz.writeMRC (bench_core)")
    parser.add_argument("--tree", action="append", default=None,
                        metavar="[LABEL=]DIR[,SETTING=VALUE...]",
                        help="run the server of this source tree (with these settings, "
                             "e.g. archive_codec=lz4); given more than once, the servers "
                             "take turns (e.g. --tree before=/tmp/base --tree now=.)")
    parser.add_argument("--name", default="cpu",
                        help="results file bench/results/NAME.json (default: cpu)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the JSON here (default: bench/results/cpu.json through "
                             "bench/results.py)")
    args = parser.parse_args()
    gib = args.gib or (0.25 if args.quick else 1.0)
    repeat = args.repeat or (2 if args.quick else 3)
    import blosc
    import blosc2

    trees, tree_settings = {}, {}
    for spec in args.tree or [f"now={ROOT}"]:
        where, *settings = spec.split(",")
        label, _, folder = where.rpartition("=")
        label = label or Path(folder).name
        trees[label] = Path(folder).resolve()
        tree_settings[label] = dict(item.split("=", 1) for item in settings)
    meta = {"cores": os.cpu_count(), "cpu_model": cpu_model(),
            "python": platform.python_version(), "numpy": np.__version__,
            "blosc": blosc.__version__, "blosc2": blosc2.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "gib": gib,
            "repeat": repeat, "trees": {k: str(v) for k, v in trees.items()},
            "settings": tree_settings}
    print(" ".join(f"{k} {v}" for k, v in meta.items()))
    for folder in (args.profile, args.perf):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-cpu-", dir=args.scratch))
    results: dict = {"meta": meta, "puts": {label: [] for label in trees}, "kernels": {},
                     "server_idle_rss_mib": {}, "server_peak_rss_mib": {}}
    servers: dict[str, Server] = {}
    try:
        for label, tree in trees.items():
            servers[label] = Server(work / f"data-{label}", tree=tree,
                                    **tree_settings[label])
            results["server_idle_rss_mib"][label] = status_kb(servers[label].proc.pid,
                                                             "VmRSS") / 1024
        modes = [] if args.modes == "none" else [int(m) for m in args.modes.split(",")]
        for mode in modes:
            measured = bench_puts(work, servers, mode, gib, repeat, args.profile, args.perf)
            for label, r in measured.items():
                r["server_peak_rss_mib_so_far"] = status_kb(servers[label].proc.pid,
                                                            "VmHWM") / 1024
                results["puts"][label].append(r)
                print(f"[{label}] {r['name']:8s} {r['bytes'] / GiB:5.2f} GiB x{repeat}: "
                      f"server CPU {r['cpu_s_per_gib']:5.2f} s/GiB "
                      f"({r['cpu_s_per_gpixel']:5.2f} s/Gpixel) runs {r['cpu_runs_s']}; "
                      f"PUT {r['wall_s']:5.2f} s | cp+sync {r['cp_sync_wall_s']:5.2f} s, "
                      f"cp CPU {r['cp_cpu_s_per_gib']:4.2f} s/GiB")
                print(f"     event loop (main thread) {r['event_loop_cpu_s_per_gib']:.2f} "
                      f"s/GiB; user {r['user_s_per_gib']:.2f}, system "
                      f"{r['system_s_per_gib']:.2f} s/GiB; {r['minor_faults_per_gib']:.0f} "
                      f"minor faults/GiB; peak RSS so far "
                      f"{r['server_peak_rss_mib_so_far']:.0f} MiB (this movie: anon "
                      f"{r['peak_rss_anon_mib']:.0f} + file {r['peak_rss_file_mib']:.0f})")
        for label, server in servers.items():
            results["server_peak_rss_mib"][label] = status_kb(server.proc.pid, "VmHWM") / 1024
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    for label, puts in results["puts"].items():
        four = next((r for r in puts if r["mode"] == 101), None)
        if four is not None:
            print(f"-> [{label}] 4-bit {four['cpu_s_per_gib']:.2f} CPU-s/GiB "
                  f"(goal <= {GOAL_4BIT})")
            for r in puts:
                if r["mode"] != 101:
                    print(f"-> [{label}] {r['name']}: {r['cpu_s_per_gib']:.2f} CPU-s/GiB, "
                          f"{r['cpu_s_per_gib'] / four['cpu_s_per_gib']:.2f}x the 4-bit "
                          "figure (goal <= 1.5x)")
        print(f"-> [{label}] server peak RSS {results['server_peak_rss_mib'][label]:.0f} MiB "
              f"(idle {results['server_idle_rss_mib'][label]:.0f}; goal < 300)")
    results["kernels"] = kernels(frames_for(101, min(gib, 0.5)))
    results["gil_stall_ms"] = gil_stalls()
    print("longest wait of other threads (GIL) per K3 frame, ms: " + ", ".join(
        f"{k} {v}" for k, v in results["gil_stall_ms"].items()))
    print("kernels, CPU-s per GiB of packed 4-bit (one process, blosc on all cores):")
    for name, value in results["kernels"].items():
        print(f"  {name:28s} {value:6.2f}")
    if args.mrcz:
        from bench.bench_core import bench_mrcz
        folder = Path(tempfile.mkdtemp(prefix="bench-cpu-mrcz-", dir=args.scratch))
        try:
            results["mrcz_write"] = bench_mrcz(folder, 8 if args.quick else 40, 4096,
                                               "zstd", 1)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    if args.out is None:  # the repository's convention: bench/results/cpu.json
        try:
            from bench.results import save
        except ImportError:
            save = None
        if save is not None:
            save(args.name, results, args=vars(args), quick=args.quick,
                 extra_packages=("blosc2",))
            return
        args.out = ROOT / "bench" / "results" / f"{args.name}{'.quick' if args.quick else ''}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
