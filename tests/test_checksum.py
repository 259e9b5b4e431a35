"""The stores' CRC-32 is zlib's, whichever library computes it: receipts written before
python-isal took over must still read back, and S3 checks the same polynomial."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from service.mrc.checksum import crc32


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 4095, 65536, (1 << 20) + 3])
def test_crc32_is_zlibs_for_every_length_and_buffer_kind(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    for buffer in (data.tobytes(), memoryview(data), data):
        assert crc32(buffer) == zlib.crc32(data.tobytes())


def test_crc32_continues_a_running_value_like_zlib():
    data = np.random.default_rng(7).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    running = 0
    for start in range(0, len(data), 1 << 19):
        running = crc32(memoryview(data)[start:start + (1 << 19)], running)
    assert running == zlib.crc32(data)
    assert crc32(b"tail", 0xDEADBEEF) == zlib.crc32(b"tail", 0xDEADBEEF)
