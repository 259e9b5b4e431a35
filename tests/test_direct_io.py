"""The O_DIRECT appender behind the scratch copy and the archive's sink: what lands in
the file is byte for byte what was appended, in every split of the bytes, with or
without the filesystem's help (a refused direct write falls back to the page cache)."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import zlib

import pytest

from service.mrc import sink as sink_mod
from service.mrc.sink import AtomicFile, DirectAppender
from service.receiver import ScratchCopy

SIZES = [0, 1, 17, 511, 4096, 4097, 65536, 300_000, (4 << 20) - 1, 4 << 20, (4 << 20) + 1,
         9 << 20]


def pieces(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.choice(SIZES)) for _ in range(rng.randint(0, 12))]


@pytest.mark.parametrize("seed", range(6))
def test_scratch_copy_holds_what_was_received(tmp_path, seed):
    scratch = ScratchCopy(tmp_path, 1 << 40)
    sent = pieces(seed)
    for i in range(0, len(sent), 3):
        scratch.receiver.write(sent[i:i + 3])
    body = b"".join(sent)
    assert scratch.receiver.digest() == hashlib.sha256(body).hexdigest()
    assert scratch.path.read_bytes() == body
    scratch.discard()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("reserve", [0, 1024])
def test_atomic_file_direct_matches_buffered(tmp_path, seed, reserve):
    sent = pieces(seed)
    head = random.Random(seed).randbytes(reserve) if reserve else None
    files = {}
    for direct in (True, False):
        out = AtomicFile(tmp_path / f"f-{direct}", reserve_head=reserve, direct=direct)
        for piece in sent:
            out.write(piece)
        size = out.commit(head)
        data = (tmp_path / f"f-{direct}").read_bytes()
        assert size == len(data)
        assert out.body_crc32 == zlib.crc32(b"".join(sent))
        files[direct] = data
    assert files[True] == files[False] == (head or b"") + b"".join(sent)


def test_aborted_atomic_file_leaves_nothing(tmp_path):
    out = AtomicFile(tmp_path / "gone", reserve_head=1024)
    out.write(b"x" * (9 << 20))
    out.abort()
    assert list(tmp_path.iterdir()) == []


def test_refused_direct_writes_fall_back(tmp_path, monkeypatch):
    """A filesystem that opens with O_DIRECT but refuses the writes (EINVAL)."""
    real_pwrite = os.pwrite
    direct_fds = set()
    real_open = os.open

    def tracking_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def refusing_pwrite(fd, data, offset):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "refused")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(sink_mod.os, "open", tracking_open)
    monkeypatch.setattr(sink_mod.os, "pwrite", refusing_pwrite)
    sent = pieces(3) + [b"y" * (9 << 20)]
    out = AtomicFile(tmp_path / "f", reserve_head=1024)
    assert out._direct is not None
    for piece in sent:
        out.write(piece)
    out.commit(b"h" * 1024)
    assert (tmp_path / "f").read_bytes() == b"h" * 1024 + b"".join(sent)


def test_appender_refuses_a_gap(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    appender = DirectAppender.open(tmp_path / "f", fd)
    if appender is None:
        pytest.skip("no O_DIRECT here")
    try:
        appender.append([memoryview(b"abc")], 0)
        with pytest.raises(ValueError):
            appender.append([memoryview(b"def")], 10)
        appender.flush()
        appender.append([memoryview(b"def")], 3)  # after flush: through the page cache
        assert (tmp_path / "f").read_bytes() == b"abcdef"
    finally:
        appender.close()
        os.close(fd)


def test_copy_into_places_bytes_exactly_in_every_kind_of_buffer():
    """The GIL-free copy the writers stage with (service/mrc/buffers.py)."""
    import mmap

    import numpy as np

    from service.mrc.buffers import copy_into

    source = bytes(range(256)) * 3
    for target in (bytearray(1000), mmap.mmap(-1, 1000), np.zeros(1000, np.uint8)):
        copy_into(target, 100, memoryview(source)[5:700])
        copy_into(target, 0, b"")
        got = bytes(memoryview(target))
        assert got[:100] == bytes(100) and got[100:795] == source[5:700]
        assert got[795:] == bytes(205)
    with np.testing.assert_raises(ValueError):  # past the end: refused, nothing written
        copy_into(bytearray(10), 8, b"abc")


@pytest.mark.parametrize("durable,fsyncs", [(True, 2), (False, 0)])
def test_an_intermediate_is_published_without_fsync(tmp_path, monkeypatch, durable, fsyncs):
    """The chunks and tail an upload's original is rebuilt from are read once and
    removed: they are renamed into place without the two fsyncs (file, folder) a stored
    object takes, which cost a small rejected upload a quarter of its time (test_fuzz)."""
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    out = AtomicFile(tmp_path / "x.bin")
    out.write(b"some bytes")
    out.commit(durable=durable)
    assert (tmp_path / "x.bin").read_bytes() == b"some bytes"
    assert len(calls) == fsyncs
