"""Reading: every mode, both byte orders, files from independent writers (a raw struct
writer, mrcfile, mrcz), compared value for value."""

import numpy as np
import pytest

import mrcfile
import mrcz

from service.mrc import Codec, FrameIndexError, MrcFile
from tests.reference import slow_pack_4bit, synthetic, write_raw_mrc

PLAIN_MODES = [0, 1, 2, 4, 6, 7, 8, 12]
SHAPE = (3, 5, 6)


def as_frames(f: MrcFile) -> np.ndarray:
    return np.stack(list(f.frames()))


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("mode", PLAIN_MODES)
def test_raw_written_modes_read_back(tmp_path, mode, order):
    data = synthetic(mode, SHAPE, seed=mode)
    path = write_raw_mrc(tmp_path / "m.mrc", data, mode, order)
    with MrcFile(path) as f:
        assert f.shape == SHAPE
        assert f.byte_order == order
        assert f.dtype == data.dtype.newbyteorder("=")
        assert f.findings == []
        got = as_frames(f)
    assert got.dtype.isnative
    np.testing.assert_array_equal(got, data)


@pytest.mark.parametrize("order", ["<", ">"])
def test_complex_int16_mode3(tmp_path, order):
    data = synthetic(3, SHAPE)
    with MrcFile(write_raw_mrc(tmp_path / "c.mrc", data, 3, order)) as f:
        frames = as_frames(f)
    assert frames.dtype.names == ("real", "imag")
    np.testing.assert_array_equal(frames["real"], data[..., 0])
    np.testing.assert_array_equal(frames["imag"], data[..., 1])


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("nx", [7, 8, 1, 4095])
def test_mode_101_even_and_odd_width(tmp_path, nx, order):
    data = synthetic(101, (4, 3, nx), seed=nx)
    with MrcFile(write_raw_mrc(tmp_path / "p.mrc", data, 101, order)) as f:
        assert f.mode == 101 and f.layout.frame_nbytes == 3 * ((nx + 1) // 2)
        np.testing.assert_array_equal(as_frames(f), data)


@pytest.mark.parametrize("order", ["<", ">"])
def test_mode_101_padding_nibble_is_ignored_whatever_it_holds(tmp_path, order):
    """The high nibble of an odd row's last byte is padding: writers need not zero it."""
    data = synthetic(101, (2, 3, 5), seed=11)
    path = write_raw_mrc(tmp_path / "p.mrc", data, 101, order)
    raw = bytearray(path.read_bytes())
    for r in range(2 * 3):  # rows of 3 bytes from byte 1024: fill each padding nibble
        raw[1024 + 3 * r + 2] |= (0xA + r) << 4
    path.write_bytes(bytes(raw))
    with MrcFile(path) as f:
        np.testing.assert_array_equal(as_frames(f), data)


def test_big_and_little_endian_read_the_same_values(tmp_path):
    for mode in PLAIN_MODES + [101]:
        data = synthetic(mode, SHAPE, seed=7)
        little = write_raw_mrc(tmp_path / f"l{mode}.mrc", data, mode, "<")
        big = write_raw_mrc(tmp_path / f"b{mode}.mrc", data, mode, ">")
        with MrcFile(little) as a, MrcFile(big) as b:
            for k in range(SHAPE[0]):
                np.testing.assert_array_equal(a.read_frame(k), b.read_frame(k))


@pytest.mark.parametrize("mode", [0, 1, 2, 4, 6, 12])
def test_mrcfile_written_files(tmp_path, mode):
    data = synthetic(mode, SHAPE, seed=mode + 1)
    path = tmp_path / "m.mrc"
    with mrcfile.new(path) as m:
        m.set_data(data)
        m.voxel_size = (1.25, 1.25, 2.5)
        m.header.origin = (10.0, -20.0, 30.0)
    with MrcFile(path) as f:
        np.testing.assert_array_equal(as_frames(f), data)
        assert f.voxel_size == pytest.approx((1.25, 1.25, 2.5))
        assert f.origin == pytest.approx((10.0, -20.0, 30.0))


MRCZ_DTYPES = ["int8", "int16", "uint16", "float32", "int32", "uint32", "complex64"]


@pytest.mark.parametrize("endian", ["le", "be"])
@pytest.mark.parametrize("codec", [c for c in Codec if c is not Codec.NONE and c.available])
@pytest.mark.parametrize("dtype", MRCZ_DTYPES)
def test_mrcz_written_files_bit_exact(tmp_path, codec, dtype, endian):
    rng = np.random.default_rng(3)
    data = (rng.normal(0, 40, size=(4, 16, 24)) * (1 + 1j if dtype == "complex64" else 1))
    data = data.astype(dtype)
    path = tmp_path / "z.mrcz"
    mrcz.writeMRC(data, path, compressor=codec.cname, clevel=3, endian=endian,
                  pixelsize=[2.0, 1.5, 1.5])
    with MrcFile(path) as f:
        assert f.layout.codec is codec and f.byte_order == {"le": "<", "be": ">"}[endian]
        assert len(f.frame_index.offsets) == 4
        got = as_frames(f)
        np.testing.assert_array_equal(got, data)
        assert got.tobytes() == data.astype(got.dtype).tobytes()  # bit-exact, NaN or not
        np.testing.assert_array_equal(f.read_frame(2), data[2])
        assert f.voxel_size[:2] == pytest.approx((1.5, 1.5))
        assert f.extended.kind == "none"  # mrcz writes JSON only when given meta


def test_mrcz_uint4_output(tmp_path):
    data = synthetic(101, (5, 8, 10))
    path = tmp_path / "u4.mrc"
    mrcz.writeMRC(data, path, dtype="uint4")
    with MrcFile(path) as f:
        assert f.mode == 101
        np.testing.assert_array_equal(as_frames(f), data)


def test_frame_access_bounds(tmp_path):
    data = synthetic(1, SHAPE)
    with MrcFile(write_raw_mrc(tmp_path / "a.mrc", data, 1)) as f:
        np.testing.assert_array_equal(f.read_frame(-1), data[-1])
        with pytest.raises(FrameIndexError, match="out of range"):
            f.read_frame(3)


def test_stored_frame_index_is_reused(tmp_path):
    data = synthetic(1, (6, 8, 8))
    path = tmp_path / "z.mrcz"
    mrcz.writeMRC(data, path, compressor="zstd")
    with MrcFile(path) as f:
        index = f.frame_index
    with MrcFile(path, frame_index=index) as f:
        assert f.frame_index is index
        np.testing.assert_array_equal(f.read_frame(5), data[5])


def test_imod_half_width_packed_bytes(tmp_path):
    """SerialEM's older 4-bit layout: mode 0, imodFlags 16, NX counts bytes."""
    data = synthetic(101, (2, 4, 12))
    packed = np.stack([np.frombuffer(slow_pack_4bit(frame), np.uint8).reshape(4, 6)
                       for frame in data])
    path = write_raw_mrc(tmp_path / "h.mrc", packed.view(np.int8), 0, imod_flags=16,
                         cella=(6.0, 4.0, 1.0), mxyz=(6, 4, 1))
    with MrcFile(path) as f:
        assert f.shape == (2, 4, 12) and f.mode == 101
        assert f.layout.packing == "mode0-half-width"
        np.testing.assert_array_equal(as_frames(f), data)
        assert f.voxel_size[0] == pytest.approx(1.0)


def test_imod_unsigned_bytes(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 10  # up to 230
    path = write_raw_mrc(tmp_path / "u.mrc", data.view(np.int8), 0, imod_flags=0)
    with MrcFile(path) as f:
        assert f.dtype == np.uint8 and f.layout.bytes_signed is False
        np.testing.assert_array_equal(as_frames(f), data)


def test_missing_machine_stamp_detects_byte_order(tmp_path):
    data = synthetic(2, SHAPE)
    path = write_raw_mrc(tmp_path / "b.mrc", data, 2, ">", machst=b"\x00\x00\x00\x00")
    with MrcFile(path) as f:
        assert f.byte_order == ">"
        assert [x.field for x in f.findings] == ["machst"]
        np.testing.assert_array_equal(as_frames(f), data)
