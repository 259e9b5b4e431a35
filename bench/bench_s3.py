"""S3 datastore benchmark: prints each number next to boto3's own, measured in the same
run against the same SeaweedFS (started here through ``tests/servers.py``).

    python bench/bench_s3.py            # a 1 GiB object (about a minute)
    python bench/bench_s3.py --quick    # 128 MiB, a smoke run

1. upload: a file written through ``S3Store.open_writer`` in 4 MiB writes with a
   reserved 1 KiB head (as the service writes an MRCZ archive) vs ``upload_file`` of the
   same file with boto3's default client and transfer settings, and again with the
   client told not to add CRC32s (as our store); goal >= 0.7x;
2. download: the object read back through ``S3Store.source`` in 16 MiB ranged reads
   into one numpy buffer (as frames are read) vs one plain GET of the whole object.

Each is the best of ``--repeat`` runs. SeaweedFS, the client and the disk share this
machine, so the numbers say how close we are to boto3, not what a real S3 would give.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_core import best_of, header_line, row  # noqa: E402
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


def bench(server: SeaweedFS, path: Path, repeat: int) -> None:
    import boto3
    from botocore.config import Config

    nbytes = path.stat().st_size
    store = S3Store(server.url("bench"), endpoint_url=server.endpoint_url)
    # boto3's defaults, only told to address SeaweedFS path-style as our store does
    reference = boto3.client("s3", endpoint_url=server.endpoint_url,
                             config=Config(s3={"addressing_style": "path"}))
    print(f"object {nbytes / MIB:.0f} MiB, parts {store.part_bytes // MIB} MiB, "
          f"{store.parallel_parts} in flight; cores {os.cpu_count()}")
    header_line()

    ref_put = best_of(lambda: reference.upload_file(str(path), server.bucket, "ref.bin"),
                      repeat)
    our_put = best_of(lambda: upload_through_writer(store, path, "ours.bin"), repeat)
    assert store.size("ours.bin") == nbytes
    row("upload (open_writer vs upload_file)", rate(nbytes, our_put), rate(nbytes, ref_put),
        f"{ref_put / our_put:.2f}x", ">= 0.7x")
    # The default client also computes a CRC32 of every part, which our store leaves to
    # the service's SHA-256 (see s3.py): the same comparison without that difference.
    plain = boto3.client("s3", endpoint_url=server.endpoint_url,
                         config=Config(s3={"addressing_style": "path"},
                                       request_checksum_calculation="when_required"))
    same_put = best_of(lambda: plain.upload_file(str(path), server.bucket, "ref.bin"),
                       repeat)
    row("  same, upload_file without CRC32", rate(nbytes, our_put), rate(nbytes, same_put),
        f"{same_put / our_put:.2f}x", ">= 0.7x")

    buffer = np.empty(nbytes, dtype=np.uint8)

    def plain_get() -> None:
        body = reference.get_object(Bucket=server.bucket, Key="ref.bin")["Body"]
        assert len(body.read()) == nbytes

    ref_get = best_of(plain_get, repeat)
    our_get = best_of(lambda: read_through_source(store, "ours.bin", buffer), repeat)
    with open(path, "rb") as f:
        assert f.read(1 << 16) == buffer[:1 << 16].tobytes(), "read back differs"
    row(f"download ({READ_BYTES // MIB} MiB ranges vs one GET)", rate(nbytes, our_get),
        rate(nbytes, ref_get), f"{ref_get / our_get:.2f}x", "(no goal)")
    store.delete_prefix("")
    reference.delete_object(Bucket=server.bucket, Key="ref.bin")
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 MiB, a smoke run")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each (best counts)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="scratch folder for the source file (default: temporary)")
    args = parser.parse_args()
    nbytes = (128 if args.quick else 1024) * MIB
    server = start_seaweedfs(bucket="mrc-bench")
    os.environ.update(server.env)  # both clients find the keys in the usual chain
    try:
        with tempfile.TemporaryDirectory(prefix="mrc-bench-", dir=args.dir) as folder:
            bench(server, make_file(Path(folder), nbytes), args.repeat)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
