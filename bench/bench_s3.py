"""S3 datastore benchmark: prints each number next to boto3's own, measured in the same
run against the same SeaweedFS (started here through ``tests/servers.py``).

    python bench/bench_s3.py            # a 1 GiB object (about two minutes)
    python bench/bench_s3.py --quick    # 128 MiB, a smoke run

1. upload: a file written through ``S3Store.open_writer`` in 4 MiB writes with a
   reserved 1 KiB head (as the service writes an MRCZ archive). Our store sends a CRC-32
   with every part (``ChecksumCRC32``, computed with zlib) and creates the upload with
   ``ChecksumAlgorithm=CRC32`` (see service/datastore/s3.py). The reference is boto3's
   ``upload_file`` of the same file with the same checksum setting -- botocore's
   default ``request_checksum_calculation="when_supported"``, which sends a CRC-32 with
   every part -- run twice: with boto3's default transfer settings (8 MiB parts, 10
   threads) and with ours (8 MiB parts, 4 in flight). The README quotes the ratio
   against the faster of the two (``quoted`` in the results file); goal >= 0.7x.
   boto3 without any checksum (``when_required``) is printed as well, for information:
   it does less work than our store, so it is not the comparison.
2. download: the object read back through ``S3Store.source`` in 16 MiB ranged reads
   into one numpy buffer (as frames are read) vs one plain GET of the whole object.

Each is run ``--repeat`` times, interleaved; median and best are printed, the ratios use
medians. SeaweedFS, the client and the disk share this machine, so the numbers say how
close we are to boto3, not what a real S3 would give. Writes bench/results/s3.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_core import header_line, row  # noqa: E402
from bench.results import begin, save, seconds  # noqa: E402
from service.datastore import S3Store  # noqa: E402
from tests.servers import SeaweedFS, start_seaweedfs  # noqa: E402

MIB = 1 << 20
WRITE_BYTES = 4 * MIB  # the service's write size
READ_BYTES = 16 * MIB
HEAD = 1024


def rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / MIB:.0f} MiB/s"


def make_file(folder: Path, nbytes: int) -> Path:
    """Random (incompressible) bytes, written in 64 MiB blocks."""
    path = folder / "object.bin"
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for start in range(0, nbytes, 64 * MIB):
            f.write(rng.integers(0, 256, min(64 * MIB, nbytes - start), dtype=np.uint8))
    return path


def upload_through_writer(store: S3Store, path: Path, key: str) -> None:
    with open(path, "rb") as f:
        head = f.read(HEAD)
        writer = store.open_writer(key, reserve_head=HEAD)
        while block := f.read(WRITE_BYTES):
            writer.write(block)
    writer.commit(head)


def read_through_source(store: S3Store, key: str, into: np.ndarray) -> None:
    source = store.source(key)
    for offset in range(0, source.size, READ_BYTES):
        source.readinto_at(into[offset:offset + READ_BYTES], offset)
    source.close()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(server: SeaweedFS, path: Path, repeat: int) -> dict:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    nbytes = path.stat().st_size
    store = S3Store(server.url("bench"), endpoint_url=server.endpoint_url)

    def client(checksums: str):
        # only told to address SeaweedFS path-style, as our store does
        return boto3.client("s3", endpoint_url=server.endpoint_url,
                            config=Config(s3={"addressing_style": "path"},
                                          request_checksum_calculation=checksums))

    crc_client = client("when_supported")    # botocore's default: a CRC-32 per part
    plain_client = client("when_required")   # no checksum at all
    ours_transfer = TransferConfig(multipart_chunksize=store.part_bytes,
                                   max_concurrency=store.parallel_parts)
    candidates = {
        "ours": lambda: upload_through_writer(store, path, "ours.bin"),
        "boto3_no_checksum_default_transfer": lambda: plain_client.upload_file(
            str(path), server.bucket, "ref.bin"),
        "boto3_crc32_default_transfer": lambda: crc_client.upload_file(
            str(path), server.bucket, "ref.bin"),
        "boto3_crc32_our_parts": lambda: crc_client.upload_file(
            str(path), server.bucket, "ref.bin", Config=ours_transfer),
    }
    print(f"object {nbytes / MIB:.0f} MiB, parts {store.part_bytes // MIB} MiB, "
          f"{store.parallel_parts} in flight; cores {os.cpu_count()}; {repeat} interleaved "
          "runs of each")
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            times[name].append(timed(fn))
    assert store.size("ours.bin") == nbytes
    # what each side left the store to check: our composite CRC-32, boto3's (the last
    # ref.bin upload was boto3 with its default checksum setting)
    head = crc_client.head_object(Bucket=server.bucket, Key="bench/ours.bin",
                                  ChecksumMode="ENABLED")
    ref_head = crc_client.head_object(Bucket=server.bucket, Key="ref.bin",
                                      ChecksumMode="ENABLED")
    med = {k: statistics.median(v) for k, v in times.items()}
    header_line()
    for name in list(candidates)[1:]:
        row(f"upload: ours vs {name}", rate(nbytes, med["ours"]), rate(nbytes, med[name]),
            f"{med[name] / med['ours']:.2f}x",
            "(info: less work)" if "no_checksum" in name else ">= 0.7x")
    quoted = min(("boto3_crc32_default_transfer", "boto3_crc32_our_parts"), key=med.get)
    print(f"quoted: ours {rate(nbytes, med['ours'])} vs {quoted} {rate(nbytes, med[quoted])} "
          f"-> {med[quoted] / med['ours']:.2f}x (goal >= 0.7x)")

    buffer = np.empty(nbytes, dtype=np.uint8)

    def plain_get() -> None:
        body = plain_client.get_object(Bucket=server.bucket, Key="ref.bin")["Body"]
        assert len(body.read()) == nbytes

    gets: dict[str, list[float]] = {"ours": [], "boto3_get_object": []}
    for _ in range(repeat):
        gets["boto3_get_object"].append(timed(plain_get))
        gets["ours"].append(timed(lambda: read_through_source(store, "ours.bin", buffer)))
    with open(path, "rb") as f:
        assert f.read(1 << 16) == buffer[:1 << 16].tobytes(), "read back differs"
    gmed = {k: statistics.median(v) for k, v in gets.items()}
    row(f"download ({READ_BYTES // MIB} MiB ranges vs one GET)", rate(nbytes, gmed["ours"]),
        rate(nbytes, gmed["boto3_get_object"]),
        f"{gmed['boto3_get_object'] / gmed['ours']:.2f}x", "(no goal)")
    store.delete_prefix("")
    plain_client.delete_object(Bucket=server.bucket, Key="ref.bin")
    store.close()

    def entry(values: list[float]) -> dict:
        m = statistics.median(values)
        return {"median_s": round(m, 3), "best_s": round(min(values), 3),
                "median_MiB_s": round(nbytes / m / MIB, 1), "runs_s": seconds(values)}

    return {"bytes": nbytes, "part_bytes": store.part_bytes,
            "parallel_parts": store.parallel_parts, "repeat": repeat,
            "our_object_checksum": head.get("ChecksumCRC32"),
            "boto3_object_checksum": {k: ref_head.get(k) for k in
                                      ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumType")},
            "upload": {k: entry(v) for k, v in times.items()},
            "upload_ratios_vs_ours": {k: round(med[k] / med["ours"], 2)
                                      for k in list(candidates)[1:]},
            "quoted": {"reference": quoted, "ratio": round(med[quoted] / med["ours"], 2),
                       "ours_MiB_s": round(nbytes / med["ours"] / MIB, 1),
                       "reference_MiB_s": round(nbytes / med[quoted] / MIB, 1),
                       "goal": ">= 0.7x"},
            "download": {k: entry(v) for k, v in gets.items()},
            "download_ratio": round(gmed["boto3_get_object"] / gmed["ours"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 MiB, a smoke run")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs of each")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--dir", type=Path, default=None,
                        help="scratch folder for the source file (default: temporary)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    started = begin()
    nbytes = (128 if args.quick else args.size_mib) * MIB
    server = start_seaweedfs(bucket="mrc-bench")
    os.environ.update(server.env)  # both clients find the keys in the usual chain
    try:
        with tempfile.TemporaryDirectory(prefix="mrc-bench-", dir=args.dir) as folder:
            figures = bench(server, make_file(Path(folder), nbytes), args.repeat)
    finally:
        server.stop()
    save("s3", figures, args=vars(args), quick=args.quick, started=started,
         extra_packages=("boto3", "botocore", "s3transfer", "awscrt"))


if __name__ == "__main__":
    main()
