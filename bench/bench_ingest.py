"""Streaming ingest and archive-only storage (#13): each figure beside a reference
measured in the same run, on the same disk.

* ready after the first byte: ``curl -T`` of a ~1 GiB K3-size movie (5760 x 4092) to
  ``PUT /v1/uploads`` -- the response comes when the dataset is ready -- against
  ``cp`` + ``sync`` of the same file (goal <= 1.5x), for mode 101 and for mode 1;
* the server's peak RSS (VmHWM) through that PUT (goal < 300 MiB);
* bytes stored / bytes received for Poisson counts as 4-bit (goal <= 0.6), int16 and
  float32 (< 0.7), and for random float32 (<= 1.01);
* as-received download (rebuilt from the archive) vs the same download of a dataset
  that kept its original file (``MRC_INGEST_KEEP_ORIGINAL``), and vs ``cat`` of the file
  (goal >= 0.5x);
* a 64 KiB Range inside frame 37 (goal < 100 ms).

Run: ``python bench/bench_ingest.py`` (about 5 min, ~6 GB scratch) or ``--quick``.
``--scratch DIR`` puts the files (and the servers' data) on that disk.
"""

from __future__ import annotations

import argparse
import hashlib
import os
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
from bench.bench_service import Server  # noqa: E402
from tests.reference import raw_header  # noqa: E402

K3 = (4092, 5760)  # ny, nx of a Gatan K3 counting-mode frame
MiB = 1 << 20
DISTINCT_FRAMES = 6  # frames are drawn once and cycled: drawing 1 GiB of Poisson is slow


def poisson_frames(shape: tuple[int, int], lam: float = 1.0) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [np.minimum(rng.poisson(lam, size=shape), 15).astype(np.uint8)
            for _ in range(DISTINCT_FRAMES)]


def write_movie(path: Path, shape: tuple[int, int], frames: int, mode: int,
                kind: str = "poisson") -> int:
    """A movie as a camera writes it: Poisson(1) counts in ``mode`` (101: 4-bit packed,
    1: int16, 2: float32); ``kind`` "random": uniform float32 in [0, 1), "noise": random
    bits, which nothing compresses."""
    ny, nx = shape
    rng = np.random.default_rng(11)
    counts = poisson_frames(shape) if kind == "poisson" else None
    with open(path, "wb") as f:
        f.write(raw_header(nx=nx, ny=ny, nz=frames, mode=mode, cella=(nx, ny, frames)))
        for z in range(frames):
            if kind == "random":  # uniform in [0, 1): its exponents still compress a little
                f.write(rng.random(size=shape, dtype=np.float32).tobytes())
                continue
            if kind == "noise":  # every bit random (NaN and inf included): incompressible
                f.write(rng.integers(0, 256, size=shape[0] * shape[1] * 4,
                                     dtype=np.uint8).tobytes())
                continue
            frame = counts[z % DISTINCT_FRAMES]
            if mode == 101:
                f.write((frame[:, 0::2] | (frame[:, 1::2] << 4)).tobytes())
            elif mode == 1:
                f.write(frame.astype("<i2").tobytes())
            else:
                f.write(frame.astype("<f4").tobytes())
        f.flush()
        os.fsync(f.fileno())
    return path.stat().st_size


def curl_put(base: str, movie: Path, name: str) -> tuple[float, dict]:
    """Seconds from the first byte sent until the answer (the dataset ready) arrives."""
    t = time.perf_counter()
    out = subprocess.run(["curl", "-sS", "--fail-with-body", "-T", str(movie),
                          f"{base}/v1/uploads/{name}"], capture_output=True, check=False)
    seconds = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"PUT {name} failed: {out.stdout.decode()} {out.stderr.decode()}")
    import json
    return seconds, json.loads(out.stdout)


def cp_sync(movie: Path, target: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["cp", str(movie), str(target)], check=True)
    os.sync()
    seconds = time.perf_counter() - t
    target.unlink()
    return seconds


def drop_dataset(base: str, dataset_id: str) -> None:
    httpx.delete(f"{base}/v1/datasets/{dataset_id}", timeout=120)


def bench_ready(work: Path, mode: int, frames: int, repeat: int) -> None:
    movie = work / f"k3-mode{mode}.mrc"
    size = write_movie(movie, K3, frames, mode)
    server = Server(work / f"data-ready-{mode}")
    try:
        idle = server.status_kb("VmRSS") / 1024
        ours, refs = [], []
        for i in range(repeat + 1):  # the first round warms page cache and allocator
            ref = cp_sync(movie, work / "copy.mrc")
            seconds, answer = curl_put(server.base, movie, f"movie-{mode}-{i}.mrc")
            assert answer["dataset"]["status"] == "ready", answer
            drop_dataset(server.base, answer["dataset"]["id"])
            os.sync()
            if i:
                ours.append(seconds)
                refs.append(ref)
        peak = server.status_kb("VmHWM") / 1024
    finally:
        server.stop(remove=True)
        movie.unlink()
    us, ref = statistics.median(ours), statistics.median(refs)
    print(f"\n## ready after first byte: {size / 2**30:.2f} GiB K3 movie, mode {mode} "
          f"({frames} x {K3[1]}x{K3[0]}), median of {repeat}")
    print(f"  cp + sync of the file (reference)  : {ref:6.2f} s  {size / ref / 1e6:6.0f} MB/s"
          f"   runs {', '.join(f'{r:.2f}' for r in refs)}")
    print(f"  curl -T -> dataset ready (ours)    : {us:6.2f} s  {size / us / 1e6:6.0f} MB/s"
          f"   runs {', '.join(f'{r:.2f}' for r in ours)}")
    print(f"  -> {us / ref:.2f}x cp + sync (goal <= 1.5x)")
    print(f"  server RSS: peak (VmHWM) {peak:.0f} MiB through {repeat + 1} PUTs, idle "
          f"{idle:.0f} MiB (goal < 300 MiB)")


def bench_storage(work: Path, frames: int) -> None:
    shape = (2048, 2048)
    cases = [("Poisson(1) 4-bit", 101, "poisson", "<= 0.6"),
             ("Poisson(1) int16", 1, "poisson", "< 0.7"),
             ("Poisson(1) float32", 2, "poisson", "< 0.7"),
             ("uniform float32", 2, "random", "<= 1.01"),
             ("random-bit float32", 2, "noise", "<= 1.01")]
    server = Server(work / "data-storage")
    print(f"\n## bytes stored / bytes received ({frames} frames of 2048x2048)")
    try:
        for label, mode, kind, goal in cases:
            movie = work / f"storage-{mode}-{kind}.mrc"
            received = write_movie(movie, shape, frames, mode, kind)
            _, answer = curl_put(server.base, movie, movie.name)
            ds = httpx.get(f"{server.base}/v1/datasets/{answer['dataset']['id']}").json()
            stored = ds["stored_bytes"]
            form = ds["storage"]["form"]
            print(f"  {label:20s}: {answer['dataset']['status']}, received {received / 1e6:7.1f} MB, stored "
                  f"{stored / 1e6:7.1f} MB ({form}) -> {stored / received:.3f} (goal {goal})")
            movie.unlink()
    finally:
        server.stop(remove=True)


def sha256_of(url: str) -> str:
    digest = hashlib.sha256()
    with httpx.stream("GET", url, timeout=600) as r:
        r.raise_for_status()
        for chunk in r.iter_raw(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def curl_get(url: str) -> float:
    t = time.perf_counter()
    subprocess.run(["curl", "-sS", "--fail", "-o", "/dev/null", url], check=True)
    return time.perf_counter() - t


def read_file(path: Path) -> float:
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(4 * MiB):
            pass
    return time.perf_counter() - t


def bench_download(work: Path, frames: int, repeat: int) -> None:
    movie = work / "k3-download.mrc"
    size = write_movie(movie, K3, frames, 101)
    truth = hashlib.sha256(movie.read_bytes()).hexdigest()
    archive = Server(work / "data-archive")
    kept = Server(work / "data-kept", keep_original="true")
    try:
        _, a = curl_put(archive.base, movie, "movie.mrc")
        _, k = curl_put(kept.base, movie, "movie.mrc")
        assert a["dataset"]["status"] == k["dataset"]["status"] == "ready"
        assert a["dataset"]["storage_ratio"] < 1 <= k["dataset"]["storage_ratio"]
        a_url = f"{archive.base}/v1/datasets/{a['dataset']['id']}/download"
        k_url = f"{kept.base}/v1/datasets/{k['dataset']['id']}/download"
        assert sha256_of(a_url) == sha256_of(k_url) == truth, "the rebuilt bytes differ"
        ours, kepts, files = [], [], []
        for i in range(repeat + 1):  # round 0 warms both servers and the page cache
            files.append(read_file(movie))
            kepts.append(curl_get(k_url))
            ours.append(curl_get(a_url))
        ours, kepts, files = ours[1:], kepts[1:], files[1:]
        # 64 KiB inside frame 37 (mode 101: frames of nx*ny/2 bytes after the header)
        frame_bytes = K3[0] * K3[1] // 2
        start = 1024 + 37 * frame_bytes + frame_bytes // 3
        with open(movie, "rb") as f:
            f.seek(start)
            expected = f.read(65536)
        ranges = []
        with httpx.Client(timeout=60) as client:
            for _ in range(20):
                t = time.perf_counter()
                r = client.get(a_url, headers={"Range": f"bytes={start}-{start + 65535}"})
                ranges.append(time.perf_counter() - t)
                assert r.status_code == 206 and r.content == expected
    finally:
        archive.stop(remove=True)
        kept.stop(remove=True)
        movie.unlink()
    us, ref, cat = (statistics.median(v) for v in (ours, kepts, files))
    print(f"\n## as-received download of a {size / 2**30:.2f} GiB mode-101 movie "
          f"(curl -o /dev/null; SHA-256 checked separately), median of {repeat}")
    print(f"  reading the original file (page cache)       : {cat:6.2f} s "
          f"{size / cat / 1e6:6.0f} MB/s")
    print(f"  original kept, served as a file (FileResponse): {ref:6.2f} s "
          f"{size / ref / 1e6:6.0f} MB/s")
    print(f"  rebuilt from archive + record (ours)         : {us:6.2f} s "
          f"{size / us / 1e6:6.0f} MB/s")
    print(f"  -> {ref / us:.2f}x the download of the kept original, {cat / us:.2f}x reading "
          f"the file (goal >= 0.5x)")
    print(f"  64 KiB Range inside frame 37: first {ranges[0] * 1000:.1f} ms, median "
          f"{statistics.median(ranges) * 1000:.1f} ms, max {max(ranges) * 1000:.1f} ms "
          f"(goal < 100 ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small movies, one repeat")
    parser.add_argument("--scratch", type=Path, default=None)
    args = parser.parse_args()
    if shutil.which("curl") is None:
        sys.exit("bench_ingest needs curl (the microscope PC's client)")
    k3_101 = 16 if args.quick else 88     # 88 x 11.8 MB = 1.04 GB
    k3_1 = 4 if args.quick else 22        # 22 x 47.1 MB = 1.04 GB
    repeat = 1 if args.quick else 3
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.scratch))
    try:
        print(f"scratch: {work} ({os.cpu_count()} CPUs)")
        bench_ready(work, 101, k3_101, repeat)
        bench_ready(work, 1, k3_1, repeat)
        bench_storage(work, 8 if args.quick else 32)
        bench_download(work, max(k3_101, 40), repeat)  # the Range goes to frame 37
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
