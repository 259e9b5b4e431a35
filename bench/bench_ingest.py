"""Streaming ingest and archive-only storage (#13, #19): each figure beside a reference
measured in the same run, on the same disk.

* ready at full speed: ``curl -T`` of a ~1 GiB K3-size movie (5760 x 4092) to
  ``PUT /v1/uploads`` -- the response comes when the dataset is ready -- against
  ``cp`` + ``sync`` of the same file (goal <= 1.5x), for mode 101 and for mode 1,
  alternating, median of ``--repeat``;
* the server's peak RSS (VmHWM) through four such PUTs (goal < 300 MiB);
* ready after the last byte at 1 Gb/s: the same mode-101 movie sent by a client paced
  to 118 MB/s (what a 1 Gb/s link carries); seconds from its last byte handed to the
  socket to the answer (goal <= 1.0 s), against the same paced client sending to a
  plain receiver that only writes the bytes to a file on the same disk and fsyncs it
  before answering (the floor for "durable after the last byte");
* bytes stored / bytes received for Poisson counts as 4-bit (goal <= 0.6), int16 and
  float32 (< 0.7), and for random float32 (<= 1.01);
* as-received download (rebuilt from the archive) against ``sendfile(2)`` of the
  original file from page cache by a minimal HTTP server, both fetched by the same
  ``curl -o /dev/null`` (goal >= 0.5x), and against ``read()`` of that file in-process;
* a 64 KiB Range inside frame 37 (goal < 100 ms), median and p95 of 30.

Run: ``python bench/bench_ingest.py`` (about 6 min, ~6 GB scratch) or ``--quick``.
``--scratch DIR`` puts the files (and the servers' data) on that disk; ``--frames``
sets the mode-101 movie length (88 frames = 1.04 GB). Writes bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_service import Server  # noqa: E402
from bench.results import begin, save, seconds  # noqa: E402
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


def _reference_server(folder: str, serve_path: str, port_out) -> None:
    """A minimal HTTP/1.1 server, in its own process: ``PUT`` writes the body to a file
    in ``folder`` in 4 MiB writes and fsyncs it before answering 201 (nothing else: no
    hash, no parsing); ``GET`` sends ``serve_path`` with ``sendfile(2)``."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def answer(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_PUT(self) -> None:
            length = int(self.headers["Content-Length"])
            target = Path(folder) / "reference-received.bin"
            view = memoryview(bytearray(4 * MiB))
            with open(target, "wb", buffering=0) as f:
                left = length
                while left:
                    n = self.rfile.readinto(view[:min(left, len(view))])
                    if not n:
                        raise ConnectionError("the body ended early")
                    f.write(view[:n])
                    left -= n
                os.fsync(f.fileno())
            self.answer(201, json.dumps({"received": length}).encode())
            target.unlink()

        def do_GET(self) -> None:
            size = os.path.getsize(serve_path)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            with open(serve_path, "rb") as f:
                offset = 0
                while offset < size:
                    offset += os.sendfile(self.connection.fileno(), f.fileno(), offset,
                                          size - offset)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port_out.send(server.server_address[1])
    server.serve_forever()


class ReferenceServer:
    """:func:`_reference_server` in a child process; ``base`` is its URL."""

    def __init__(self, folder: Path, serve_path: Path | None = None):
        ours, theirs = multiprocessing.Pipe()
        self.proc = multiprocessing.get_context("fork").Process(
            target=_reference_server, args=(str(folder), str(serve_path or ""), theirs),
            daemon=True)
        self.proc.start()
        self.port = ours.recv()
        self.base = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.join(timeout=10)


def paced_put(base: str, url_path: str, movie: Path, rate: float) -> tuple[float, float, int]:
    """``PUT`` ``movie`` over one HTTP/1.1 connection at ``rate`` bytes/s: each 256 KiB
    is handed to the socket when a link of that rate would have delivered its last byte.
    Returns (seconds from the last byte handed over to the whole answer read, seconds of
    the whole request, HTTP status)."""
    host, port = base.removeprefix("http://").split(":")
    size = movie.stat().st_size
    chunk = 256 << 10
    sock = socket.create_connection((host, int(port)))
    try:
        sock.sendall((f"PUT {url_path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                      f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n"
                      "Connection: close\r\n\r\n").encode())
        view = memoryview(bytearray(chunk))
        sent = 0
        start = time.perf_counter()
        with open(movie, "rb", buffering=0) as f:
            while n := f.readinto(view):
                delay = start + (sent + n) / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                sock.sendall(view[:n])
                sent += n
        last_byte = time.perf_counter()
        answer = b""
        while data := sock.recv(1 << 16):  # Connection: close -> the answer ends at EOF
            answer += data
        done = time.perf_counter()
    finally:
        sock.close()
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    if status >= 300 or status == 0:
        raise RuntimeError(f"paced PUT {url_path}: {answer[:300]!r}")
    if url_path.startswith("/v1/uploads/"):
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert body["dataset"]["status"] == "ready", body
        drop_dataset(base, body["dataset"]["id"])
    return done - last_byte, done - start, status


def bench_paced(server: Server, work: Path, movie: Path, repeat: int, rate: float) -> dict:
    """Ready after the last byte with the client paced to ``rate``; the reference
    receiver on the same disk, alternating with ours."""
    reference = ReferenceServer(work)
    tails, totals, ref_tails, ref_totals = [], [], [], []
    try:
        for i in range(repeat):
            os.sync()
            tail, total, _ = paced_put(reference.base, "/reference", movie, rate)
            ref_tails.append(tail)
            ref_totals.append(total)
            os.sync()
            tail, total, _ = paced_put(server.base, f"/v1/uploads/paced-{i}.mrc", movie, rate)
            tails.append(tail)
            totals.append(total)
    finally:
        reference.stop()
    size = movie.stat().st_size
    us, ref = statistics.median(tails), statistics.median(ref_tails)
    print(f"\n## ready after the last byte, client paced to {rate / 1e6:.0f} MB/s (1 Gb/s), "
          f"{size / 2**30:.2f} GiB mode-101 movie, {repeat} runs alternating")
    print(f"  plain receiver: write + fsync (reference): median {ref:6.3f} s, max "
          f"{max(ref_tails):.3f} s   runs {', '.join(f'{r:.3f}' for r in ref_tails)}")
    print(f"  PUT /v1/uploads -> dataset ready (ours)  : median {us:6.3f} s, max "
          f"{max(tails):.3f} s   runs {', '.join(f'{r:.3f}' for r in tails)}  (goal <= 1.0 s)")
    print(f"  whole request: ours median {statistics.median(totals):.2f} s, reference "
          f"{statistics.median(ref_totals):.2f} s ({size / statistics.median(ref_totals) / 1e6:.0f}"
          " MB/s achieved)")
    return {"rate_MB_s": rate / 1e6, "bytes": size, "runs": repeat,
            "ours_after_last_byte_s": {"median": round(us, 3), "max": round(max(tails), 3),
                                       "runs": seconds(tails)},
            "reference_write_fsync_after_last_byte_s": {
                "median": round(ref, 3), "max": round(max(ref_tails), 3),
                "runs": seconds(ref_tails)},
            "ours_whole_request_s": seconds(totals),
            "reference_whole_request_s": seconds(ref_totals),
            "goal": "ours median <= 1.0 s"}


class RssSampler:
    """The server's resident memory, sampled every 20 ms: peaks of anonymous memory
    (RssAnon: what the process allocated) and of file pages mapped into it (RssFile),
    which VmHWM adds together."""

    def __init__(self, pid: int):
        self.path = Path(f"/proc/{pid}/status")
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.done.wait(0.02):
            try:
                lines = self.path.read_text().splitlines()
            except OSError:
                return
            for line in lines:
                field = line.split(":", 1)[0]
                if field in self.peak:
                    self.peak[field] = max(self.peak[field], int(line.split()[1]))

    def stop(self) -> dict[str, float]:
        """The peaks in MiB, by field."""
        self.done.set()
        self.thread.join()
        return {k: v / 1024 for k, v in self.peak.items()}


def bench_ready(work: Path, mode: int, frames: int, repeat: int, paced_repeat: int = 0,
                rate: float = 118e6) -> dict:
    movie = work / f"k3-mode{mode}.mrc"
    size = write_movie(movie, K3, frames, mode)
    server = Server(work / f"data-ready-{mode}")
    paced = None
    try:
        idle = server.status_kb("VmRSS") / 1024
        sampler = RssSampler(server.proc.pid)
        ours, refs = [], []
        for i in range(repeat + 1):  # the first round warms page cache and allocator
            ref = cp_sync(movie, work / "copy.mrc")
            took, answer = curl_put(server.base, movie, f"movie-{mode}-{i}.mrc")
            assert answer["dataset"]["status"] == "ready", answer
            drop_dataset(server.base, answer["dataset"]["id"])
            os.sync()
            if i:
                ours.append(took)
                refs.append(ref)
        peak = server.status_kb("VmHWM") / 1024  # through the repeat + 1 PUTs above
        sampled = {f"{k}_peak_mib": round(v) for k, v in sampler.stop().items()}
        if paced_repeat:
            paced = bench_paced(server, work, movie, paced_repeat, rate)
            paced["peak_rss_mib_after_paced_puts"] = round(server.status_kb("VmHWM") / 1024)
    finally:
        server.stop(remove=True)
        movie.unlink()
    us, ref = statistics.median(ours), statistics.median(refs)
    print(f"\n## ready at full speed: {size / 2**30:.2f} GiB K3 movie, mode {mode} "
          f"({frames} x {K3[1]}x{K3[0]}), median of {repeat}")
    print(f"  cp + sync of the file (reference)  : {ref:6.2f} s  {size / ref / 1e6:6.0f} MB/s"
          f"   runs {', '.join(f'{r:.2f}' for r in refs)}")
    print(f"  curl -T -> dataset ready (ours)    : {us:6.2f} s  {size / us / 1e6:6.0f} MB/s"
          f"   runs {', '.join(f'{r:.2f}' for r in ours)}")
    print(f"  -> {us / ref:.2f}x cp + sync (goal <= 1.5x)")
    print(f"  server RSS: peak (VmHWM) {peak:.0f} MiB through {repeat + 1} PUTs, idle "
          f"{idle:.0f} MiB (goal < 300 MiB); sampled peaks: anonymous "
          f"{sampled['RssAnon_peak_mib']} MiB, mapped files {sampled['RssFile_peak_mib']} MiB")
    out = {"mode": mode, "frames": frames, "bytes": size,
           "ours_curl_put_ready_s": {"median": round(us, 3), "runs": seconds(ours)},
           "reference_cp_sync_s": {"median": round(ref, 3), "runs": seconds(refs)},
           "ratio": round(us / ref, 2), "goal": "ratio <= 1.5",
           "peak_rss_mib": round(peak), "peak_rss_puts": repeat + 1,
           "idle_rss_mib": round(idle), "rss_goal": "< 300 MiB",
           "rss_sampled_every_20ms": sampled}
    if paced is not None:
        out["paced"] = paced
    return out


def bench_storage(work: Path, frames: int) -> dict:
    shape = (2048, 2048)
    cases = [("Poisson(1) 4-bit", 101, "poisson", "<= 0.6"),
             ("Poisson(1) int16", 1, "poisson", "< 0.7"),
             ("Poisson(1) float32", 2, "poisson", "< 0.7"),
             ("uniform float32", 2, "random", "<= 1.01"),
             ("random-bit float32", 2, "noise", "<= 1.01")]
    server = Server(work / "data-storage")
    out: dict = {"frames": frames, "shape": list(shape)}
    print(f"\n## bytes stored / bytes received ({frames} frames of 2048x2048)")
    try:
        for label, mode, kind, goal in cases:
            movie = work / f"storage-{mode}-{kind}.mrc"
            received = write_movie(movie, shape, frames, mode, kind)
            try:
                _, answer = curl_put(server.base, movie, movie.name)
            except RuntimeError as exc:  # a service failure is a finding, not the end
                print(f"  {label:20s}: FAILED {exc}")
                out[label] = {"error": str(exc)[:500], "received": received, "goal": goal}
                movie.unlink()
                continue
            ds = httpx.get(f"{server.base}/v1/datasets/{answer['dataset']['id']}").json()
            stored = ds["stored_bytes"]
            form = ds["storage"]["form"]
            print(f"  {label:20s}: {answer['dataset']['status']}, received {received / 1e6:7.1f} MB, stored "
                  f"{stored / 1e6:7.1f} MB ({form}) -> {stored / received:.3f} (goal {goal})")
            out[label] = {"status": answer["dataset"]["status"], "received": received,
                          "stored": stored, "form": form,
                          "ratio": round(stored / received, 3), "goal": goal}
            movie.unlink()
    finally:
        server.stop(remove=True)
    return out


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


def bench_download(work: Path, frames: int, repeat: int) -> dict:
    movie = work / "k3-download.mrc"
    size = write_movie(movie, K3, frames, 101)
    truth = hashlib.sha256(movie.read_bytes()).hexdigest()
    archive = Server(work / "data-archive")
    reference = ReferenceServer(work, serve_path=movie)
    try:
        _, a = curl_put(archive.base, movie, "movie.mrc")
        assert a["dataset"]["status"] == "ready"
        assert a["dataset"]["storage_ratio"] < 1, "the original was kept, not rebuilt"
        a_url = f"{archive.base}/v1/datasets/{a['dataset']['id']}/download"
        r_url = f"{reference.base}/movie.mrc"
        assert sha256_of(a_url) == sha256_of(r_url) == truth, "the rebuilt bytes differ"
        ours, sendfiles, files = [], [], []
        for i in range(repeat + 1):  # round 0 warms both servers and the page cache
            files.append(read_file(movie))
            sendfiles.append(curl_get(r_url))
            ours.append(curl_get(a_url))
        ours, sendfiles, files = ours[1:], sendfiles[1:], files[1:]
        # 64 KiB inside frame 37 (mode 101: frames of nx*ny/2 bytes after the header)
        frame_bytes = K3[0] * K3[1] // 2
        start = 1024 + 37 * frame_bytes + frame_bytes // 3
        with open(movie, "rb") as f:
            f.seek(start)
            expected = f.read(65536)
        ranges = []
        with httpx.Client(timeout=60) as client:
            for _ in range(30):
                t = time.perf_counter()
                r = client.get(a_url, headers={"Range": f"bytes={start}-{start + 65535}"})
                ranges.append(time.perf_counter() - t)
                assert r.status_code == 206 and r.content == expected
    finally:
        archive.stop(remove=True)
        reference.stop()
        movie.unlink()
    us, ref, cat = (statistics.median(v) for v in (ours, sendfiles, files))
    print(f"\n## as-received download of a {size / 2**30:.2f} GiB mode-101 movie "
          f"(curl -o /dev/null; SHA-256 checked separately), median of {repeat}")
    print(f"  read() of the original file (page cache), in-process: {cat:6.2f} s "
          f"{size / cat / 1e6:6.0f} MB/s")
    print(f"  sendfile(2) of the original from page cache (reference): {ref:6.2f} s "
          f"{size / ref / 1e6:6.0f} MB/s   runs {', '.join(f'{r:.2f}' for r in sendfiles)}")
    print(f"  rebuilt from archive + record (ours)                   : {us:6.2f} s "
          f"{size / us / 1e6:6.0f} MB/s   runs {', '.join(f'{r:.2f}' for r in ours)}")
    print(f"  -> {ref / us:.2f}x sendfile (goal >= 0.5x), {cat / us:.2f}x read()")
    rq = np.array(ranges) * 1000
    print(f"  64 KiB Range inside frame 37: first {rq[0]:.1f} ms, median "
          f"{np.median(rq):.1f} ms, p95 {np.percentile(rq, 95):.1f} ms, max {rq.max():.1f} ms "
          f"(goal < 100 ms)")
    return {"bytes": size, "frames": frames,
            "ours_rebuilt_s": {"median": round(us, 3), "runs": seconds(ours)},
            "reference_sendfile_s": {"median": round(ref, 3), "runs": seconds(sendfiles)},
            "reference_read_page_cache_s": {"median": round(cat, 3), "runs": seconds(files)},
            "ratio_vs_sendfile": round(ref / us, 2), "ratio_vs_read": round(cat / us, 2),
            "goal": "ratio_vs_sendfile >= 0.5",
            "range_64k_frame37_ms": {"first": round(rq[0], 1),
                                     "median": round(float(np.median(rq)), 1),
                                     "p95": round(float(np.percentile(rq, 95)), 1),
                                     "max": round(float(rq.max()), 1), "n": len(ranges),
                                     "goal": "< 100 ms"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small movies, one repeat")
    parser.add_argument("--scratch", type=Path, default=None)
    parser.add_argument("--frames", type=int, default=88,
                        help="mode-101 K3 frames (88 x 11.8 MB = 1.04 GB)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="measured full-speed PUTs per mode (one more warms up)")
    parser.add_argument("--paced-repeat", type=int, default=3,
                        help="paced PUTs (and as many reference ones)")
    parser.add_argument("--rate-mb", type=float, default=118.0,
                        help="paced client rate, MB/s (1 Gb/s carries ~118)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    if shutil.which("curl") is None:
        sys.exit("bench_ingest needs curl (the microscope PC's client)")
    started = begin()
    k3_101 = 16 if args.quick else args.frames
    k3_1 = max(1, k3_101 // 4)           # the same bytes in int16: 22 x 47.1 MB = 1.04 GB
    repeat = 1 if args.quick else args.repeat
    paced_repeat = 1 if args.quick else args.paced_repeat
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.scratch))
    figures: dict = {}
    try:
        print(f"scratch: {work} ({os.cpu_count()} CPUs)")
        figures["ready_mode101"] = bench_ready(work, 101, k3_101, repeat, paced_repeat,
                                               args.rate_mb * 1e6)
        figures["ready_mode1"] = bench_ready(work, 1, k3_1, repeat)
        figures["storage"] = bench_storage(work, 8 if args.quick else 32)
        # the Range goes to frame 37
        figures["download"] = bench_download(work, max(k3_101, 40), repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save("ingest", figures, args=vars(args), quick=args.quick, started=started,
         extra_packages=("uvicorn", "fastapi", "starlette"))


if __name__ == "__main__":
    main()
