"""Format-core benchmark: prints each number issue #2 asks for, next to a reference
measured in the same run on the same machine.

    python bench/bench_core.py            # full sizes (about 2-3 minutes, ~8 GB of disk)
    python bench/bench_core.py --quick    # small sizes, a smoke run

1. mode-101 unpack, GB/s of output on one core, vs python-mrcz's unpack and memcpy;
2. MRCZ write of a 40-frame 4096x4096 counting movie (Poisson, lambda=1): throughput and
   compression ratio vs ``mrcz.writeMRC`` with the same codec, level and threads;
3. frame 20 of 40 from that MRCZ vs ``mrcz.readMRC`` of the whole file;
4. peak RSS while converting a >= 2 GiB mode-101 movie (to mode 0 MRC and to MRCZ), each
   in a fresh process, vs the RSS of a process that only imports the library.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.mrc import Codec, MrcFile, MrcWriter  # noqa: E402
from service.mrc import codec as codec_mod  # noqa: E402
from service.mrc.modes import unpack_4bit  # noqa: E402
from service.mrc.stats import StatsAccumulator  # noqa: E402
from tests.reference import counting_movie, raw_header  # noqa: E402


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def row(name: str, ours: str, ref: str, ratio: str, goal: str) -> None:
    print(f"{name:<44} {ours:>16} {ref:>22} {ratio:>9}  {goal}")


def header_line() -> None:
    row("measure", "ours", "reference", "ratio", "goal")
    print("-" * 110)


# 1 -------------------------------------------------------------------------------

def mrcz_style_unpack(packed: np.ndarray) -> np.ndarray:
    """python-mrcz 0.6's unpack: one flat interleave of the whole buffer."""
    flat = packed.reshape(-1)
    out = np.empty(flat.size * 2, dtype=np.uint8)
    out[0::2] = np.bitwise_and(flat, 0x0F)
    out[1::2] = np.right_shift(flat, 4)
    return out


def bench_unpack(ny: int, nx: int) -> None:
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 256, size=(ny, nx // 2), dtype=np.uint8)
    out_bytes = ny * nx
    ours = best_of(lambda: unpack_4bit(packed, nx), 7)
    ref = best_of(lambda: mrcz_style_unpack(packed), 7)
    dst = np.empty(out_bytes, np.uint8)
    src = np.ones(out_bytes, np.uint8)
    memcpy = best_of(lambda: np.copyto(dst, src), 7)
    assert np.array_equal(unpack_4bit(packed, nx).reshape(-1), mrcz_style_unpack(packed))
    row(f"101 unpack {nx}x{ny}, GB/s out, 1 core", f"{out_bytes / ours / 1e9:.2f}",
        f"mrcz-style {out_bytes / ref / 1e9:.2f}", f"{ref / ours:.2f}x", ">= 1.5 GB/s")
    row("  (memcpy of the same bytes, ceiling)", "", f"{out_bytes / memcpy / 1e9:.2f}",
        f"{memcpy / ours:.2f}", "")


# 2, 3 ------------------------------------------------------------------------------

def bench_mrcz(folder: Path, nz: int, n: int, codec: str, clevel: int) -> dict:
    import mrcz

    movie = counting_movie((nz, n, n), lam=1.0).astype(np.int8)
    raw = movie.nbytes
    codec_mod.set_threads(os.cpu_count() or 1)
    ours_path, ref_path = folder / "ours.mrcz", folder / "ref.mrcz"

    codec_enum = Codec.from_name(codec)

    def ours() -> None:
        with MrcWriter(ours_path, nx=n, ny=n, nz=nz, mode=0, codec=codec_enum,
                       clevel=clevel) as w:
            for frame in movie:
                w.write_frame(frame, owned=True)

    known = StatsAccumulator()
    for frame in movie:
        known.add(frame)
    known_stats = known.result()

    def ours_known_stats() -> None:
        with MrcWriter(ours_path, nx=n, ny=n, nz=nz, mode=0, codec=codec_enum,
                       clevel=clevel, known_stats=known_stats) as w:
            for frame in movie:
                w.write_frame(frame, owned=True)

    def ours_encode_only() -> None:
        for frame in movie:
            codec_mod.compress_frame(frame, codec_enum, clevel)

    def stats_only() -> None:
        acc = StatsAccumulator()
        for frame in movie:
            acc.add(frame)

    def ref() -> None:
        mrcz.writeMRC(movie, ref_path, compressor=codec, clevel=clevel,
                      n_threads=os.cpu_count() or 1)
        codec_mod.set_threads(os.cpu_count() or 1)

    t_ours, t_ref = best_of(ours, 3), best_of(ref, 3)
    t_encode, t_stats = best_of(ours_encode_only, 3), best_of(stats_only, 3)
    t_known = best_of(ours_known_stats, 3)
    size_ours, size_ref = ours_path.stat().st_size, ref_path.stat().st_size
    label = f"{codec}-{clevel}"
    row(f"MRCZ write {nz}x{n}^2 lam=1 {label}, MB/s", f"{raw / t_ours / 1e6:.0f}",
        f"mrcz {raw / t_ref / 1e6:.0f}", f"{t_ref / t_ours:.2f}x", ">= 1.0x")
    row("  stats known (ingest's archive), MB/s", f"{raw / t_known / 1e6:.0f}",
        f"mrcz {raw / t_ref / 1e6:.0f}", f"{t_ref / t_known:.2f}x", ">= 1.0x")
    row("  of which: encode only (blosc chunks), MB/s", f"{raw / t_encode / 1e6:.0f}",
        f"mrcz {raw / t_ref / 1e6:.0f}", f"{t_ref / t_encode:.2f}x",
        "mrcz: stats of frame 0 only")
    row("  of which: exact stats of every frame, MB/s", f"{raw / t_stats / 1e6:.0f}", "", "",
        "")
    row(f"MRCZ compression ratio {label}", f"{raw / size_ours:.3f}",
        f"mrcz {raw / size_ref:.3f}", f"{size_ref / size_ours:.3f}x", ">= 1.0x")
    image, _ = mrcz.readMRC(str(ours_path))
    assert np.array_equal(image, movie), "mrcz must read our file bit-exact"
    return {"path": str(ours_path), "codec": label, "write_ratio": t_ref / t_ours,
            "known_stats_ratio": t_ref / t_known, "encode_only_ratio": t_ref / t_encode,
            "stats_mb_s": raw / t_stats / 1e6, "size_ratio": size_ref / size_ours}


def bench_frame_read(path: Path, k: int) -> None:
    import mrcz

    def ours() -> np.ndarray:
        with MrcFile(path) as f:  # includes the chunk-header walk
            return f.read_frame(k)

    t_ours = best_of(ours, 5)
    t_ref = best_of(lambda: mrcz.readMRC(str(path)), 3)
    image, _ = mrcz.readMRC(str(path))
    assert np.array_equal(ours(), image[k])
    row(f"read frame {k} of {image.shape[0]} from MRCZ, ms", f"{t_ours * 1e3:.1f}",
        f"mrcz whole {t_ref * 1e3:.0f}", f"{t_ref / t_ours:.1f}x", ">= 10x")


# 4 -------------------------------------------------------------------------------

# Peak RSS from VmHWM: ru_maxrss survives exec on Linux, so a child started from this
# (large) benchmark process would report the parent's high-water mark.
_CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from service.mrc import Codec, Target, convert
if {action!r} != "import":
    t0 = time.perf_counter()
    target = Target(codec=Codec.ZSTD) if {action!r} == "mrcz" else Target(mode=0)
    convert({src!r}, {dst!r}, target)
    print("seconds", time.perf_counter() - t0)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print("maxrss_kb", hwm)
"""


def run_child(action: str, src: Path, dst: Path) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", _CHILD.format(root=str(ROOT), action=action,
                                                              src=str(src), dst=str(dst))],
                         capture_output=True, text=True, check=True).stdout
    values = dict(line.split() for line in out.strip().splitlines())
    return float(values["maxrss_kb"]) / 1024, float(values.get("seconds", 0.0))


def make_big_101(path: Path, nx: int, ny: int, nz: int) -> int:
    """A K2 super-resolution-sized 4-bit movie, written by the test reference's raw
    header and a few distinct Poisson frames cycled (generating all of them is slow)."""
    rng = np.random.default_rng(5)
    frames = []
    for _ in range(4):
        counts = np.minimum(rng.poisson(1.0, size=(ny, nx)), 15).astype(np.uint8)
        frames.append((counts[:, 0::2] | (counts[:, 1::2] << 4)).tobytes())
    with open(path, "wb") as f:
        f.write(raw_header(nx=nx, ny=ny, nz=nz, mode=101, cella=(nx * 0.5, ny * 0.5, nz)))
        for k in range(nz):
            f.write(frames[k % 4])
    return path.stat().st_size


def bench_memory(folder: Path, nx: int, ny: int, nz: int) -> None:
    src = folder / "big101.mrc"
    size = make_big_101(src, nx, ny, nz)
    base, _ = run_child("import", src, src)
    for action, name in (("mode0", "big0.mrc"), ("mrcz", "big.mrcz")):
        peak, secs = run_child(action, src, folder / name)
        out_size = (folder / name).stat().st_size
        row(f"peak RSS 101->{action} {size / 2**30:.2f} GiB in, MB",
            f"{peak:.0f}", f"import-only {base:.0f}", f"{peak / (size / 2**20):.3f}",
            "< 300 MB")
        row(f"  throughput, MB/s of input ({out_size / 2**30:.2f} GiB out)",
            f"{size / secs / 1e6:.0f}", "", "", "")
        (folder / name).unlink()
    src.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--dir", type=Path, default=None,
                        help="scratch folder (default: a temporary folder)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="mrc-bench-", dir=args.dir))
    print(f"cores {os.cpu_count()}, numpy {np.__version__}, scratch {folder}")
    header_line()
    try:
        if args.quick:
            bench_unpack(1024, 1024)
            path = Path(bench_mrcz(folder, 8, 512, "zstd", 1)["path"])
            bench_frame_read(path, 4)
            bench_memory(folder, 1024, 1024, 16)
        else:
            bench_unpack(4096, 4096)
            bench_unpack(7420, 7676)
            path = Path(bench_mrcz(folder, 40, 4096, "zstd", 1)["path"])
            bench_mrcz(folder, 40, 4096, "lz4", 9)
            bench_frame_read(path, 20)
            bench_memory(folder, 7676, 7420, 76)  # 76 x 28.5 MB = 2.16 GB (2.02 GiB) packed
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
