"""Absurd requests against a real ``mrc-ingest serve``: each is answered (refused with a
4xx JSON error, or ingested) in bounded time and memory, next to an ordinary small upload
measured in the same run.

* the 2,000,000-frame 1x1 file (2 MB; before the frame limits: one Python object per
  frame, still working after 60 s), by PUT and by multipart;
* NZ = 10^9 with tiny data; NX x NY huge with NZ = 1; 20,000 frames of 4 bytes;
* a multipart body of 1000 tiny parts;
* a 100 MB JSON body (chunked, and with Content-Length) to POST /v1/conversions and
  POST /v1/registrations.

For each: the status, the error code, the time to the answer, and the server's peak RSS
(VmHWM) during the request; the peak is reset before each request through
``/proc/<pid>/clear_refs`` (Linux), so each figure is that request's own.

Run: ``python bench/bench_absurd_headers.py`` (under a minute). ``--without-limits``
also sends the 2,000,000-frame file to a second server whose frame limits are lifted (as
before they existed), with a 60 s client timeout.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_service import Server  # noqa: E402
from tests.api_helpers import multipart  # noqa: E402
from tests.reference import raw_header  # noqa: E402

MiB = 1 << 20


def absurd(nx: int, ny: int, nz: int, mode: int, data: int) -> bytes:
    return raw_header(nx=nx, ny=ny, nz=nz, mode=mode) + bytes(range(256)) * (data // 256) \
        + bytes(data % 256)


def ordinary_movie(frames: int = 20, side: int = 1024) -> bytes:
    """A small 4-bit movie of Poisson(1) counts, as a counting camera writes one."""
    rng = np.random.default_rng(3)
    body = bytearray(raw_header(nx=side, ny=side, nz=frames, mode=101,
                                cella=(side, side, frames)))
    for _ in range(frames):
        counts = np.minimum(rng.poisson(1.0, size=(side, side)), 15).astype(np.uint8)
        body += (counts[:, 0::2] | (counts[:, 1::2] << 4)).tobytes()
    return bytes(body)


def json_stream(total: int, head: bytes, chunk: int = 256 << 10) -> Iterator[bytes]:
    """``total`` bytes of JSON-ish body (``head`` then spaces), chunk by chunk."""
    yield head
    sent = len(head)
    while sent < total:
        piece = b" " * min(chunk, total - sent)
        sent += len(piece)
        yield piece


class Probe:
    def __init__(self, server: Server):
        self.server = server
        self.clear = Path(f"/proc/{server.proc.pid}/clear_refs")
        self.resettable = True

    def reset_peak(self) -> None:
        """VmHWM back to the current RSS, so the next reading is this request's peak."""
        if not self.resettable:
            return
        try:
            self.clear.write_text("5")
        except OSError:
            self.resettable = False

    def run(self, label: str, send: Callable[[], httpx.Response]) -> None:
        self.reset_peak()
        before = self.server.status_kb("VmRSS") / 1024
        started = time.perf_counter()
        try:
            response = send()
            status = str(response.status_code)
            try:
                code = response.json().get("error") or \
                    (response.json().get("dataset") or {}).get("status", "")
            except ValueError:
                code = response.text[:40]
        except httpx.HTTPError as exc:  # the server hung up mid-body without an answer
            status, code = "-", f"{type(exc).__name__}"
        seconds = time.perf_counter() - started
        peak = self.server.status_kb("VmHWM") / 1024
        print(f"  {label:58s} {status:>4s} {code:22s} {seconds * 1000:9.1f} ms "
              f"{before:7.0f} {peak:7.0f} MiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json-mb", type=int, default=100, help="size of the JSON bodies")
    parser.add_argument("--without-limits", action="store_true",
                        help="also the 2,000,000-frame file with the frame limits lifted")
    args = parser.parse_args()
    json_total = args.json_mb * MiB
    with tempfile.TemporaryDirectory(prefix="bench-absurd-") as work:
        shared = Path(work) / "shared"
        shared.mkdir()
        server = Server(Path(work) / "data", workers=1,
                        allowed_roots=f'["{shared}"]')
        probe = Probe(server)
        base = server.base
        put = f"{base}/v1/uploads"
        movie = ordinary_movie()
        two_million = absurd(1, 1, 2_000_000, 0, 2_000_000)
        print("defaults: MRC_INGEST_MAX_FRAMES=100000, MRC_INGEST_MAX_SMALL_FRAMES=10000 "
              "under MRC_INGEST_MIN_FRAME_BYTES=256, MRC_INGEST_MAX_MULTIPART_PARTS=16, "
              "MRC_INGEST_MAX_JSON_BYTES=1 MiB")
        print(f"server pid {server.proc.pid}; peak RSS reset before each request: "
              f"{probe.resettable and probe.clear.exists()}")
        print(f"\n  {'request':58s} {'HTTP':>4s} {'error / status':22s} {'answer':>12s} "
              f"{'RSS before':>7s} {'peak':>7s}")
        try:
            with httpx.Client(timeout=600) as client:
                client.get(f"{base}/healthz")
                probe.run(f"reference: ordinary 4-bit movie PUT ({len(movie) / MiB:.0f} MiB, "
                          "20 frames)",
                          lambda: client.put(f"{put}/ordinary.mrc", content=movie))
                form, headers = multipart([("file", "ordinary2.mrc", movie[:-1] + b"\x01"),
                                           ("mdoc", "ordinary2.mrc.mdoc", b"[ZValue = 0]\n")])
                probe.run("reference: the same as multipart + .mdoc",
                          lambda: client.post(put, content=form, headers=headers))
                probe.run("reference: GET /healthz", lambda: client.get(f"{base}/healthz"))
                probe.run("2,000,000 frames of 1x1 (2 MB), PUT",
                          lambda: client.put(f"{put}/two-million.mrc", content=two_million))
                form, headers = multipart([("file", "two-million.mrc", two_million)])
                probe.run("2,000,000 frames of 1x1 (2 MB), multipart",
                          lambda: client.post(put, content=form, headers=headers))
                probe.run("NZ = 10^9 with 1000 bytes of data, PUT",
                          lambda: client.put(f"{put}/billion.mrc",
                                             content=absurd(1, 1, 10 ** 9, 0, 1000)))
                probe.run("NX x NY = 65536 x 65536 float32, NZ = 1, 1 MB, PUT",
                          lambda: client.put(f"{put}/huge-frame.mrc",
                                             content=absurd(65536, 65536, 1, 2, MiB)))
                probe.run("20,000 frames of 2x2 bytes (80 kB), PUT",
                          lambda: client.put(f"{put}/tiny-frames.mrc",
                                             content=absurd(2, 2, 20_000, 0, 80_000)))
                probe.run("10,000 frames of 1x1 (at the small-frame limit), PUT",
                          lambda: client.put(f"{put}/ten-thousand.mrc",
                                             content=absurd(1, 1, 10_000, 0, 10_000)))
                form, headers = multipart([("file", "parts.mrc", movie[:-1] + b"\x02")] +
                                          [(f"f{i}", None, b"x") for i in range(999)])
                probe.run("100,000 frames of 16x16 bytes (25.6 MB: the worst allowed)",
                          lambda: client.put(f"{put}/worst-allowed.mrc",
                                             content=absurd(16, 16, 100_000, 0, 25_600_000)))
                probe.run("multipart of 1000 tiny parts (movie first)",
                          lambda: client.post(put, content=form, headers=headers))
                for route, head in (("/v1/conversions", b'{"dataset_id": "x", "p": "'),
                                    ("/v1/registrations", b'{"path": "/x", "p": "')):
                    probe.run(f"{args.json_mb} MB JSON to {route}, chunked",
                              lambda: client.post(f"{base}{route}",
                                                  content=json_stream(json_total, head),
                                                  headers={"Content-Type": "application/json"}))
                    probe.run(f"{args.json_mb} MB JSON to {route}, Content-Length",
                              lambda: client.post(f"{base}{route}",
                                                  content=json_stream(json_total, head),
                                                  headers={"Content-Type": "application/json",
                                                           "Content-Length": str(json_total)}))
                probe.run("reference again: GET /healthz", lambda: client.get(f"{base}/healthz"))
            print(f"\nserver idle RSS at the end: {server.status_kb('VmRSS') / 1024:.0f} MiB")
        finally:
            server.stop()
        if args.without_limits:
            unbounded = Server(Path(work) / "unbounded", workers=1, max_frames=2 ** 31 - 1,
                               min_frame_bytes=0)
            probe = Probe(unbounded)
            print("\nwithout the frame limits (MRC_INGEST_MAX_FRAMES=2147483647, "
                  "MRC_INGEST_MIN_FRAME_BYTES=0), 60 s client timeout:")
            try:
                with httpx.Client(timeout=60) as client:
                    probe.run("2,000,000 frames of 1x1 (2 MB), PUT",
                              lambda: client.put(f"{unbounded.base}/v1/uploads/2m.mrc",
                                                 content=two_million))
            finally:
                unbounded.proc.kill()  # its request may still be working
                unbounded.proc.wait(timeout=60)


if __name__ == "__main__":
    main()
