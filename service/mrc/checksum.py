"""CRC-32 (zlib's polynomial, the one S3's ``x-amz-checksum-crc32`` uses) of what the
stores write and read back.

python-isal's (Intel ISA-L, folding with carry-less multiplies) gives the same values
as :func:`zlib.crc32` for about a fifth of its CPU: ingest checksums the archive twice,
as written and as read back, which cost ~0.3 CPU-s per GiB with zlib's (bench_cpu.py,
``perf`` profile). Without python-isal (the format core used on its own) zlib's serves.
"""

from __future__ import annotations

try:
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency of the service
    from zlib import crc32

__all__ = ["crc32"]
