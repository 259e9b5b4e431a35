"""What our writer produces, read back by readers that share no code with it: the
``struct`` header parser and per-pixel 4-bit unpacker of tests/reference.py, the
``blosc`` package for MRCZ chunks, ``mrcfile`` (header-only for the modes it cannot read)
and ``mrcz.readMRC``. Every value is compared, and the header fields a reader relies on:
mode, sizes, MACHST, NVERSION, and DMIN/DMAX/DMEAN/RMS against numpy in float64.

Notes on the third-party readers (checked against mrcz 0.6 and mrcfile 1.5):
- ``mrcz.readMRC`` takes MZ as "slices": our plain stacks carry MZ = 1 (MRC2014), so
  they are read with ``slices=0``; our MRCZ files carry MZ = 0 and need no argument.
- ``mrcz.readMRC`` guesses the byte order from MODE ("> 16000000 means swapped"); a
  big-endian MODE such as 1001 reads as a negative number in little-endian, so the guess
  fails for every codec but zstd. Big-endian files are read with ``endian="be"``.
- ``mrcz`` has no mode 3 or 12 and reads 4-bit data only for even NX; ``mrcfile`` reads
  the header of modes 3, 7, 8 and 101 but not their data.
"""

from __future__ import annotations

import json

import mrcfile
import mrcz
import numpy as np
import pytest

from service.mrc import Codec, Target, convert
from tests.reference import (IMOD_STAMP, blosc_chunks, counting_movie, read_raw_header,
                             read_raw_mrc, synthetic, write_raw_mrc)

CODECS = [c for c in Codec if c is not Codec.NONE and c.available]
MACHST = {"<": b"\x44\x44\x00\x00", ">": b"\x11\x11\x00\x00"}
#: 20141 for MRC2014 modes; 0 for mrcz's non-standard 7 and 8 and, by the writer's rule
#: (IMOD lists 101 as "non-standard"), for 4-bit 101. Open question: CCP-EM's 20141 update
#: lists modes 12 and 101 as new MRC2014 data modes, which would make 20141 right for 101.
NVERSION = {0: 20141, 1: 20141, 2: 20141, 3: 20141, 4: 20141, 6: 20141, 7: 0, 8: 0,
            12: 20141, 101: 0}
#: MRCZ codec ids (MRCZ spec 0.5: MODE = mode + 1000 x codec)
CODEC_ID = {"blosclz": 1, "lz4": 2, "lz4hc": 3, "snappy": 4, "zlib": 5, "zstd": 6}
MRCZ_ENDIAN = {"<": "le", ">": "be"}


def reference_stats(data: np.ndarray, mode: int) -> tuple:
    """(DMIN, DMAX, DMEAN, RMS) by numpy in float64; RMS is the population standard
    deviation. Complex data (modes 3, 4): only RMS, of the complex values."""
    if mode == 3:
        values = data[..., 0].astype(np.float64) + 1j * data[..., 1].astype(np.float64)
    elif mode == 4:
        values = data.astype(np.complex128)
    else:
        values = data.astype(np.float64)
        return values.min(), values.max(), values.mean(), values.std()
    return None, None, None, values.std()


def assert_header(h: dict, data: np.ndarray, mode: int, order: str, codec: int = 0) -> None:
    nz, ny, nx = data.shape[:3]
    assert (h["nx"], h["ny"], h["nz"]) == (nx, ny, nz)
    assert h["mode"] == mode + 1000 * codec
    assert (h["order"], h["machst"]) == (order, MACHST[order])
    assert h["map"] == b"MAP " and h["nversion"] == NVERSION[mode]
    assert h["mapcrs"] == (1, 2, 3) and h["imod_stamp"] == IMOD_STAMP
    assert h["mxyz"][:2] == (nx, ny)  # MRC2014: pixel size = CELLA / M, so M > 0
    dmin, dmax, dmean, rms = reference_stats(data, mode)
    if dmin is None:  # MRC2014 "undetermined": DMAX < DMIN, DMEAN < both
        assert h["dmax"] < h["dmin"] and h["dmean"] < h["dmax"]
    else:  # stored as float32: DMIN/DMAX exactly the float32 of the extremes
        assert (h["dmin"], h["dmax"]) == (float(np.float32(dmin)), float(np.float32(dmax)))
        assert h["dmean"] == pytest.approx(dmean, rel=1e-6, abs=1e-6)
    assert h["rms"] == pytest.approx(rms, rel=1e-6)


# --- mode 101: packed 4-bit output --------------------------------------------------

@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("nx", [8, 7])
def test_mode_101_output_decoded_independently(tmp_path, nx, order):
    """Each row is (nx + 1) // 2 bytes, the lower-x pixel in the low nibble, the high
    nibble of an odd row's last byte is padding (written as 0); in both byte orders."""
    data = counting_movie((3, 5, nx), lam=4.0, seed=nx)
    data[0, 0, 0], data[-1, -1, -1] = 0, 15
    src = write_raw_mrc(tmp_path / "counts.mrc", data.astype(np.int16), 1,
                        cella=(nx * 0.9, 5 * 0.9, 3.0))
    out = tmp_path / "packed.mrc"
    convert(src, out, Target(mode=101, byte_order=order))

    h, got = read_raw_mrc(out)  # slow per-pixel unpack of the bytes at 1024 + NSYMBT
    np.testing.assert_array_equal(got, data)
    assert_header(h, data, 101, order)
    assert h["nsymbt"] == 0 and h["cella"][0] / h["mxyz"][0] == pytest.approx(0.9)
    row = (nx + 1) // 2
    raw = out.read_bytes()
    assert len(raw) == 1024 + 3 * 5 * row
    rows = np.frombuffer(raw[1024:], dtype=np.uint8).reshape(3 * 5, row)
    if nx % 2:
        assert not (rows[:, -1] >> 4).any()  # padding nibbles
    with mrcfile.open(out, header_only=True) as m:  # mrcfile parses the header itself
        assert (int(m.header.mode), int(m.header.nx), int(m.header.nz)) == (101, nx, 3)
        assert float(m.header.dmax) == 15.0
    if nx % 2 == 0:  # mrcz 0.6 cannot unpack odd rows
        values, _ = mrcz.readMRC(str(out), slices=0, endian=MRCZ_ENDIAN[order])
        np.testing.assert_array_equal(values, data)


# --- modes 3, 7 and 8: plain output ------------------------------------------------

@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("mode", [3, 7, 8])
def test_plain_modes_3_7_8_read_independently(tmp_path, mode, order):
    """Kept mode, byte order changed on the way (the source is in the other order)."""
    data = synthetic(mode, (3, 4, 5), seed=mode)  # the full int32/uint32 range
    source_order = "<" if order == ">" else ">"
    src = write_raw_mrc(tmp_path / "s.mrc", data, mode, source_order,
                        cella=(5 * 1.5, 4 * 1.5, 3.0))
    out = tmp_path / "o.mrc"
    report = convert(src, out, Target(byte_order=order))
    assert report.target_mode == mode

    h, got = read_raw_mrc(out)
    assert got.dtype.byteorder in (order, "=" if order == "<" else ">")
    np.testing.assert_array_equal(got, data)
    assert_header(h, data, mode, order)
    with mrcfile.open(out, header_only=True) as m:  # a second, independent parser
        assert int(m.header.mode) == mode and int(m.header.nversion) == NVERSION[mode]
        assert m.header.mode.dtype.byteorder in (order, "=" if order == "<" else ">")
        assert (float(m.header.dmin), float(m.header.dmax), float(m.header.rms)) == \
            (h["dmin"], h["dmax"], h["rms"])
        assert m.voxel_size.x == pytest.approx(1.5)
    if mode != 3:
        values, _ = mrcz.readMRC(str(out), slices=0, endian=MRCZ_ENDIAN[order])
        assert values.tobytes() == data.astype(values.dtype).tobytes()


# --- MRCZ output, both byte orders --------------------------------------------------

@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("codec", CODECS, ids=[c.cname for c in CODECS])
@pytest.mark.parametrize("mode", [0, 1, 2, 4, 6, 7, 8])
def test_mrcz_outputs_read_by_mrcz_bit_exact(tmp_path, mode, codec, order):
    data = synthetic(mode, (4, 12, 10), seed=mode)
    src = write_raw_mrc(tmp_path / "s.mrc", data, mode, cella=(10 * 1.1, 12 * 1.1, 4 * 1.1),
                        mxyz=(10, 12, 4))
    out = tmp_path / "o.mrcz"
    report = convert(src, out, Target(codec=codec, clevel=3, byte_order=order))

    image, meta = mrcz.readMRC(str(out), endian=MRCZ_ENDIAN[order])
    assert isinstance(image, np.ndarray) and image.shape == data.shape  # one 3-D array
    assert image.dtype == data.dtype.newbyteorder(order)
    assert image.tobytes() == data.astype(image.dtype).tobytes()
    assert meta["compressor"] == codec.cname
    assert meta["pixelsize"] == pytest.approx([1.1, 1.1, 1.1])

    raw = out.read_bytes()
    h = read_raw_header(raw)
    assert_header(h, data, mode, order, CODEC_ID[codec.cname])
    assert h["mxyz"][2] == 0  # so that mrcz.readMRC returns one array (mrcz 0.6 reads MZ as the volume count)
    assert h["exttyp"] == b"json" and h["labels"][0].startswith("MRCZ")
    assert json.loads(raw[1024:1024 + h["nsymbt"]]) == {"mz": 4}  # the true MZ
    chunks = blosc_chunks(raw, 1024 + h["nsymbt"], 4)  # the chunks fill the file exactly
    assert h["mrcz_packed_bytes"] == sum(map(len, chunks)) == meta["packedBytes"]
    assert report.file_bytes_out == len(raw)
    _, values = read_raw_mrc(out)  # the blosc package decodes every chunk
    np.testing.assert_array_equal(values, data)


@pytest.mark.parametrize("mode", [3, 12])
def test_mrcz_modes_mrcz_cannot_read_decode_with_blosc(tmp_path, mode):
    """MRCZ of complex-int16 and float16 data: python-mrcz has no such modes, so the
    chunks are checked with the blosc package and the header with struct."""
    data = synthetic(mode, (3, 6, 5), seed=mode)
    src = write_raw_mrc(tmp_path / "s.mrc", data, mode)
    out = tmp_path / "o.mrcz"
    convert(src, out, Target(codec=Codec.ZSTD, byte_order=">"))
    h, values = read_raw_mrc(out)
    assert values.tobytes() == data.astype(values.dtype).tobytes()
    assert_header(h, data, mode, ">", CODEC_ID["zstd"])
