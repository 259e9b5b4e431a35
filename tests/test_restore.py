"""Archive + restore record give back the file as received, byte for byte.

Every mode the service reads, both byte orders, odd-nx 4-bit with non-zero padding
nibbles, IMOD's half-width 4-bit, FEI/SERI/unknown extended headers, bytes after the last
frame, and float data holding NaN payloads, +-inf and -0.0 go through the streaming
pass (fed in uneven pieces, as a network delivers them); the bytes rebuilt from what was
stored must hash to the SHA-256 of the input, any byte range must equal the same slice
of the input, ``mrcfile`` must read the rebuilt file, and ``mrcz`` must read the archive.
Files the archive cannot hold exactly, or not smaller, keep their original.
"""

from __future__ import annotations

import hashlib
import struct
import warnings
from pathlib import Path

import mrcfile
import mrcz
import numpy as np
import pytest

from service.mrc import MrcFile, restore as restore_mod
from service.mrc.archiver import FORM_ARCHIVE, FORM_ORIGINAL, Archiver, ArchivePolicy
from service.mrc.codec import Codec
from service.mrc.restore import AsReceived, RestoreRecord
from service.mrc.sink import AtomicFile
from service.mrc.stream import StreamCutter
from tests.reference import (IMOD_STAMP, MODE_DTYPES, counting_movie, raw_header,
                             slow_pack_4bit, write_raw_mrc)


def stream_through(raw: bytes, folder: Path, policy: ArchivePolicy = ArchivePolicy(),
                   pieces: int = 7, seed: int = 0):
    """Feed ``raw`` in uneven pieces through cutter + archiver; (outcome, archive path,
    tail path)."""
    archive, tail = folder / "archive.mrcz", folder / "tail.bin"
    archiver = Archiver(policy, lambda: AtomicFile(archive, reserve_head=1024),
                        lambda: AtomicFile(tail))
    return feed_in_pieces(raw, archiver, pieces, seed), archive, tail


def feed_in_pieces(raw: bytes, archiver: Archiver, pieces: int, seed: int):
    """``raw`` through a cutter into ``archiver`` in uneven pieces, as a network
    delivers them (frame buffers recycled, as ingest does); the archiver's outcome."""
    cutter = StreamCutter(pool=archiver.pool)
    cuts = sorted(set(np.random.default_rng(seed).integers(1, max(2, len(raw)),
                                                           size=pieces).tolist()))
    for start, stop in zip([0] + cuts, cuts + [len(raw)]):
        for piece in cutter.feed(raw[start:stop]):
            archiver.add(piece)
    for piece in cutter.finish():
        archiver.add(piece)
    return archiver.finish(len(raw), hashlib.sha256(raw).hexdigest(),
                           cutter.header_findings + cutter.findings)


def rebuilt(outcome, archive: Path, tail: Path) -> AsReceived:
    record = RestoreRecord.from_bytes(outcome.record)
    movie = MrcFile(archive, frame_index=record.frame_index)
    return AsReceived(record, movie.read_frame,
                      (lambda off, n: tail.read_bytes()[off:off + n]) if tail.exists() else None,
                      archive_frame_nbytes=movie.layout.frame_nbytes)  # buffers reused


def check_exact(raw: bytes, folder: Path, **kwargs) -> AsReceived:
    outcome, archive, tail = stream_through(raw, folder, **kwargs)
    assert outcome.form == FORM_ARCHIVE, outcome.reason
    assert outcome.restorable and outcome.reason is None
    as_received = rebuilt(outcome, archive, tail)
    whole = b"".join(as_received.iter_range())
    assert hashlib.sha256(whole).hexdigest() == hashlib.sha256(raw).hexdigest()
    assert as_received.size == len(raw)
    rng = np.random.default_rng(len(raw))
    for _ in range(12):
        a, b = sorted(rng.integers(0, len(raw) + 1, size=2).tolist())
        assert b"".join(as_received.iter_range(a, b)) == raw[a:b], (a, b)
    return as_received


# -- every mode, both byte orders ----------------------------------------------------

PLAIN_MODES = [0, 1, 2, 3, 4, 6, 7, 8, 12]
SHAPE = (3, 48, 64)


def counts_as(mode: int, shape=SHAPE, seed: int = 0) -> np.ndarray:
    """Camera-like data (Poisson counts, some negative for signed modes) in ``mode``'s
    type: compressible, as real movies are, so the archive is the stored form."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(3.0, size=shape)
    if mode == 101:  # counting at about one electron per pixel, as K3/Falcon movies do
        return np.minimum(rng.poisson(1.0, size=shape), 15).astype(np.uint8)
    if mode == 3:
        return np.stack([counts - 2, 2 - counts], axis=-1).astype(np.int16)
    dtype = np.dtype(MODE_DTYPES[mode])
    if dtype.kind == "c":
        return (counts + 0.5j * counts).astype(dtype)
    if dtype.kind == "i":
        counts = counts - 2
    return counts.astype(dtype)


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("mode", PLAIN_MODES + [101])
def test_every_mode_restores_exactly(tmp_path, mode, order):
    data = counts_as(mode, seed=mode)
    path = write_raw_mrc(tmp_path / "in.mrc", data, mode, order=order,
                         cella=(64.0, 48.0, 3.0))
    raw = path.read_bytes()
    as_received = check_exact(raw, tmp_path)
    # The archive itself is read by the reference MRCZ reader (modes it cannot read in
    # MRCZ, float16 and complex int16, are archived as float32 and complex64).
    values, _ = mrcz.readMRC(str(tmp_path / "archive.mrcz"))
    expected = data[..., 0] + 1j * data[..., 1] if mode == 3 else data
    assert np.array_equal(values, expected)
    rebuilt_path = tmp_path / "rebuilt.mrc"
    rebuilt_path.write_bytes(b"".join(as_received.iter_range()))
    if mode in (0, 1, 2, 4, 6, 12):  # modes mrcfile reads: it sees the values we wrote
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(rebuilt_path, permissive=True) as m:
                assert np.array_equal(m.data, data)


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("nx", [127, 128])
def test_4bit_padding_nibbles_survive(tmp_path, nx, order):
    """Odd-nx rows end with a spare nibble; writers need not zero it, so the record keeps
    whatever it holds (here: a different value in every row of every frame)."""
    ny = 40
    counts = counting_movie((4, ny, nx), lam=1.0)
    body = bytearray(b"".join(slow_pack_4bit(frame) for frame in counts))
    row = (nx + 1) // 2
    if nx % 2:
        for k in range(4):
            for y in range(ny):
                body[(k * ny + y) * row + row - 1] |= ((3 * k + y) % 16) << 4
    raw = raw_header(nx=nx, ny=ny, nz=4, mode=101, order=order) + bytes(body)
    outcome, archive, tail = stream_through(raw, tmp_path)
    assert outcome.form == FORM_ARCHIVE
    assert b"".join(rebuilt(outcome, archive, tail).iter_range()) == raw
    values, _ = mrcz.readMRC(str(archive))  # the archive: mode 0 counts, as mrcz reads it
    assert np.array_equal(values, counts.astype(np.int8))


def test_imod_half_width_4bit_restores_exactly(tmp_path):
    """IMOD/SerialEM "4 bits packed" in a mode-0 file whose NX counts bytes (imodFlags
    bit 16): the archive holds the unpacked counts, the rebuild repacks them."""
    counts = counting_movie((3, 40, 128), lam=1.0)
    body = b"".join(slow_pack_4bit(frame) for frame in counts)
    raw = raw_header(nx=64, ny=40, nz=3, mode=0, imod_flags=16) + body
    outcome, archive, tail = stream_through(raw, tmp_path)
    assert outcome.form == FORM_ARCHIVE and outcome.described["nx"] == 128
    assert b"".join(rebuilt(outcome, archive, tail).iter_range()) == raw


def test_imod_unsigned_bytes_restore_exactly(tmp_path):
    data = (np.random.default_rng(3).poisson(3.0, size=(2, 64, 64)) * 20).astype(np.uint8)
    data[0, 0, :4] = [0, 128, 200, 255]
    raw = raw_header(nx=64, ny=64, nz=2, mode=0, imod_flags=0) + data.tobytes()
    outcome, archive, tail = stream_through(raw, tmp_path)
    assert outcome.archive["mode"] == 6  # unsigned bytes are held as uint16 counts
    assert b"".join(rebuilt(outcome, archive, tail).iter_range()) == raw


@pytest.mark.parametrize("order", ["<", ">"])
def test_float_bit_patterns_survive(tmp_path, order):
    """NaN payloads, +-inf and -0.0: the archive never converts float values."""
    data = np.random.default_rng(5).poisson(2.0, size=(3, 64, 64)).astype(np.float32)
    bits = data.view(np.uint32)
    bits[0, 0, 0] = 0x7FC01234           # a quiet NaN with a payload
    bits[0, 0, 1] = 0xFF800001           # a signalling NaN, negative
    bits[1, 2, 3] = 0x80000000           # -0.0
    data[2, 4, 5], data[2, 4, 6] = np.inf, -np.inf
    path = write_raw_mrc(tmp_path / "f.mrc", np.zeros((3, 64, 64), np.float32), 2, order=order)
    raw = bytearray(path.read_bytes())
    raw[1024:] = data.astype(np.dtype("f4").newbyteorder(order)).tobytes()
    raw = bytes(raw)
    as_received = check_exact(raw, tmp_path, policy=ArchivePolicy())
    assert b"".join(as_received.iter_range(1024, 1024 + 8)) == raw[1024:1032]


# -- extended headers and bytes after the data ---------------------------------------

def fei_records(n: int, order: str) -> bytes:
    dtype = mrcfile.dtypes.get_ext_header_dtype(b"FEI1", order)
    records = np.zeros(n, dtype=dtype)
    records["Metadata size"] = dtype.itemsize
    records["HT"] = 300e3
    records["Pixel size X"] = 0.83e-10
    return records.tobytes()


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("kind", ["FEI1", "SERI", "ABCD"])
def test_extended_headers_and_trailing_bytes(tmp_path, kind, order):
    data = counting_movie((3, 64, 64))
    if kind == "FEI1":
        ext, extra = fei_records(3, order), {}
    elif kind == "SERI":
        shorts = np.array([[k * 100, 80] for k in range(3)], dtype=f"{order}i2")
        ext, extra = shorts.tobytes(), {"nint": 4, "nreal": 1 | 8}
    else:
        ext, extra = bytes(range(200)), {}
    path = write_raw_mrc(tmp_path / "x.mrc", data, 1, order=order, extended=ext,
                         exttyp=kind.encode(), **extra)
    raw = path.read_bytes() + b"\x00trailing bytes a writer left behind\xff" * 3
    outcome, archive, tail = stream_through(raw, tmp_path)
    assert outcome.form == FORM_ARCHIVE and outcome.tail_bytes == 111
    assert any("after the last frame" in f.message for f in outcome.findings)
    as_received = rebuilt(outcome, archive, tail)
    assert b"".join(as_received.iter_range()) == raw
    assert b"".join(as_received.iter_range(len(raw) - 50)) == raw[-50:]


# -- what keeps the original ---------------------------------------------------------

def test_incompressible_data_keep_the_original(tmp_path):
    noise = np.random.default_rng(9).integers(0, 2**32, size=(4, 64, 64), dtype=np.uint32)
    path = write_raw_mrc(tmp_path / "n.mrc", noise.view(np.float32), 2)
    outcome, archive, _ = stream_through(path.read_bytes(), tmp_path)
    assert outcome.form == FORM_ORIGINAL and not outcome.restorable
    assert "would not be smaller" in outcome.reason
    assert not archive.exists() and list(tmp_path.glob("*.part")) == []


@pytest.mark.parametrize("nx", [64, 63])
def test_a_decompression_that_writes_nothing_proves_nothing(tmp_path, monkeypatch, nx):
    """4-bit frames of even width decompress into the buffer their unpacked counts came
    from (one frame-sized buffer less); a decompressor that silently wrote nothing would
    leave exactly those counts there. The proof must still fail: the buffer's ends are
    spoiled before each decompression. (Odd widths unpack into a trimmed copy and take
    the proof's own buffer: the same outcome, by the same guard.)"""
    monkeypatch.setattr("service.mrc.archiver.decompress_into", lambda chunk, out: None)
    path = write_raw_mrc(tmp_path / "m.mrc", counting_movie((3, 64, nx)), 101)
    outcome, archive, _ = stream_through(path.read_bytes(), tmp_path)
    assert outcome.form == FORM_ORIGINAL and not outcome.restorable
    assert outcome.reason.startswith("restore not proven: frame 0")
    assert not archive.exists()


def test_an_unprovable_restore_keeps_the_original(tmp_path, monkeypatch):
    """If the bytes rebuilt from a chunk differ from those received, the archive is not
    the stored form: the proof compares them for every frame."""
    real = restore_mod.restore_frame

    def off_by_one(values, source, padding=None, out=None):
        out = real(values, source, padding, out).copy()
        out[5] ^= 1
        return out
    monkeypatch.setattr("service.mrc.archiver.restore_frame", off_by_one)
    path = write_raw_mrc(tmp_path / "m.mrc", counting_movie((3, 64, 64)), 101)
    outcome, archive, _ = stream_through(path.read_bytes(), tmp_path)
    assert outcome.form == FORM_ORIGINAL and not outcome.restorable
    assert outcome.reason.startswith("restore not proven: frame 0")
    assert "byte 5" in outcome.reason
    assert not archive.exists()


def test_mrcz_uploads_are_kept_as_received(tmp_path):
    data = counting_movie((3, 20, 20)).astype(np.int8)
    mrcz.writeMRC(data, str(tmp_path / "in.mrcz"), compressor="zstd", clevel=1)
    outcome, archive, _ = stream_through((tmp_path / "in.mrcz").read_bytes(), tmp_path)
    assert outcome.form == FORM_ORIGINAL and outcome.valid
    assert outcome.reason == "the file as received is already an MRCZ archive"
    assert outcome.stats.dmax == float(data.max())  # every chunk was decompressed


def test_truncated_file_is_invalid_and_kept(tmp_path):
    raw = write_raw_mrc(tmp_path / "t.mrc", counting_movie((4, 16, 16)), 101).read_bytes()
    outcome, archive, _ = stream_through(raw[:-50], tmp_path)
    assert not outcome.valid and outcome.form == FORM_ORIGINAL
    assert any("truncated: 3 of 4 frames" in f.message for f in outcome.findings)
    assert not archive.exists()


def test_lying_mrcz_chunk_is_refused_before_decompression(tmp_path):
    data = counting_movie((2, 16, 16)).astype(np.int8)
    mrcz.writeMRC(data, str(tmp_path / "in.mrcz"), compressor="lz4", clevel=1)
    raw = bytearray((tmp_path / "in.mrcz").read_bytes())
    nsymbt = struct.unpack_from("<i", raw, 92)[0]
    struct.pack_into("<I", raw, 1024 + nsymbt + 4, 10**9)  # nbytes of chunk 0: a bomb
    outcome, _, _ = stream_through(bytes(raw), tmp_path)
    assert not outcome.valid
    bomb = [f for f in outcome.findings if f.severity.value == "error"]
    assert bomb and "refusing to decompress" in bomb[0].message and "frame 0" in bomb[0].message


def test_no_archive_codec_keeps_the_original(tmp_path):
    path = write_raw_mrc(tmp_path / "m.mrc", counting_movie((2, 8, 8)), 101)
    outcome, archive, _ = stream_through(path.read_bytes(), tmp_path,
                                         policy=ArchivePolicy(codec=Codec.NONE))
    assert outcome.form == FORM_ORIGINAL and "MRC_INGEST_ARCHIVE_CODEC=none" in outcome.reason


# -- statistics taken on the way -----------------------------------------------------

def test_stats_and_per_frame_series_match_numpy(tmp_path):
    data = counts_as(1, (5, 30, 40), seed=2)
    path = write_raw_mrc(tmp_path / "s.mrc", data, 1, order=">")
    outcome, _, _ = stream_through(path.read_bytes(), tmp_path)
    wide = data.astype(np.float64)
    assert (outcome.stats.dmin, outcome.stats.dmax) == (wide.min(), wide.max())
    assert outcome.stats.dmean == pytest.approx(wide.mean(), rel=1e-12)
    assert outcome.stats.rms == pytest.approx(wide.std(), rel=1e-12)
    series = outcome.frame_stats
    assert series["mean"] == pytest.approx(wide.mean(axis=(1, 2)).tolist(), rel=1e-12)
    assert series["std"] == pytest.approx(wide.std(axis=(1, 2)).tolist(), rel=1e-12)
    assert series["min"] == wide.min(axis=(1, 2)).tolist()
    assert series["max"] == wide.max(axis=(1, 2)).tolist()


def test_archive_header_is_mrc2014_and_readable(tmp_path):
    """The archive itself: mrcz reads the 3-D array; its header carries exact stats."""
    data = counting_movie((4, 48, 64))
    path = write_raw_mrc(tmp_path / "m.mrc", data, 101, cella=(64 * 0.8, 48 * 0.8, 4))
    outcome, archive, _ = stream_through(path.read_bytes(), tmp_path)
    values, header = mrcz.readMRC(str(archive))
    assert values.shape == (4, 48, 64) and np.array_equal(values, data.astype(np.int8))
    with MrcFile(archive) as m:
        assert m.voxel_size[0] == pytest.approx(0.8)
        h = m.header
        assert float(h["dmax"]) == data.max() and float(h["dmean"]) == pytest.approx(data.mean())
        assert bytes(h["map"]) == b"MAP " and int(h["imod_stamp"]) == IMOD_STAMP





@pytest.mark.parametrize("where", [None, 0, (1 << 20) - 1, 1 << 20, 3_000_000 - 1])
def test_first_difference_finds_the_first_changed_byte(where):
    from service.mrc.archiver import first_difference

    a = np.random.default_rng(5).integers(0, 256, 3_000_000, dtype=np.uint8)
    b = a.copy()
    if where is not None:
        b[where] ^= 0x10
        b[-1] ^= 0x01 if where != b.size - 1 else 0  # a later difference must not win
    assert first_difference(a, b) == where
