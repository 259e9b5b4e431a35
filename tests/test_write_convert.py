"""Writing and converting, proven by third-party readers: every plain MRC we write in a
mode mrcfile knows passes ``mrcfile.validate`` and mrcfile reads identical values; the
4-bit normalization keeps the raw counts. Modes 3, 7, 8 and 101, and MRCZ in every mode,
codec and byte order, are read back independently in test_interop_writer.py."""

import io
import os

import numpy as np
import pytest

import mrcfile
import mrcz

from service.mrc import (Codec, ConversionError, LossyConversionError, MrcFile, MrcWriter,
                         Target, convert)
from service.mrc.header import IMOD_STAMP, ImodFlag
from service.mrc.stats import Stats
from tests.reference import (counting_movie, read_raw_header, read_raw_mrc, synthetic,
                             write_raw_mrc)


def mrcfile_valid(path) -> bool:
    out = io.StringIO()
    ok = mrcfile.validate(str(path), print_file=out)
    assert ok, out.getvalue()
    return ok


def no_temp_files(folder) -> bool:
    return not [n for n in os.listdir(folder) if n.endswith(".part")]


# --- plain MRC outputs, checked by mrcfile -------------------------------------------

@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("mode", [0, 1, 2, 4, 6, 12])
def test_plain_outputs_pass_mrcfile(tmp_path, mode, order):
    data = synthetic(mode, (4, 6, 9), seed=mode)
    if mode == 12:
        # mrcfile.validate computes std() in float16, which overflows to inf for a
        # spread of ~30; keep its oracle in range (our stats are checked just below).
        data = (data / 16).astype(np.float16)
    src = write_raw_mrc(tmp_path / "src.mrc", data, mode, "<", cella=(9 * 1.3, 6 * 1.3, 4.0),
                        origin=(1.0, 2.0, 3.0))
    out = tmp_path / "out.mrc"
    report = convert(src, out, Target(byte_order=order))
    assert report.target_mode == mode and report.lossless == "by type"
    mrcfile_valid(out)
    with mrcfile.open(out) as m:
        np.testing.assert_array_equal(m.data, data)
        assert m.header.mode == mode
        assert m.voxel_size.x == pytest.approx(1.3)
        assert (m.header.origin.x, m.header.origin.y, m.header.origin.z) == (1.0, 2.0, 3.0)
        assert m.header.nversion == 20141 and m.header.map == b"MAP "
        if mode != 4:  # complex: only RMS is defined (mrcfile's convention)
            assert (m.header.dmin, m.header.dmax) == (data.min(), data.max())
            assert m.header.dmean == pytest.approx(data.mean(dtype=np.float64), rel=1e-6)
        assert m.header.rms == pytest.approx(np.std(data.astype(np.complex128 if mode == 4
                                                                 else np.float64)), rel=1e-6)
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("target_mode", [0, 1, 2, 6])
@pytest.mark.parametrize("nx", [10, 11])
def test_mode_101_normalizes_to_raw_counts(tmp_path, target_mode, nx):
    """No -127 shift (newstack mode 0), no x2184 scale (newstack mode 1): raw counts."""
    data = counting_movie((5, 7, nx), lam=2.0)
    data[0, 0, 0], data[-1, -1, -1] = 0, 15  # full range present
    src = write_raw_mrc(tmp_path / "p.mrc", data, 101, cella=(nx * 0.8, 7 * 0.8, 5.0))
    out = tmp_path / "n.mrc"
    report = convert(src, out, Target(mode=target_mode))
    assert report.lossless == "by type"
    mrcfile_valid(out)
    with mrcfile.open(out) as m:
        np.testing.assert_array_equal(m.data, data)  # identical values, not shifted/scaled
        assert m.header.mode == target_mode
        assert (m.header.dmin, m.header.dmax) == (0, 15)
        assert m.header.dmean == pytest.approx(data.mean(dtype=np.float64), rel=1e-6)
        assert m.header.rms == pytest.approx(data.std(dtype=np.float64), rel=1e-6)
        assert m.voxel_size.x == pytest.approx(0.8)
        raw = np.frombuffer(m.header.tobytes(), dtype=np.uint8)
    stamp, flags = np.frombuffer(raw[152:160].tobytes(), dtype="<i4")
    assert stamp == IMOD_STAMP
    assert bool(flags & ImodFlag.SIGNED_BYTES) == (target_mode == 0)
    with MrcFile(out) as f:
        assert any("mode 101 -> " in label for label in
                   [bytes(x).decode() for x in f.header["label"]])


def test_default_target_of_101_is_mode_0(tmp_path):
    data = counting_movie((2, 4, 4))
    src = write_raw_mrc(tmp_path / "p.mrc", data, 101)
    assert convert(src, tmp_path / "o.mrc").target_mode == 0
    with mrcfile.open(tmp_path / "o.mrc") as m:
        assert m.header.mode == 0 and m.data.dtype == np.int8
        np.testing.assert_array_equal(m.data, data)


def test_float16_to_float32_on_request(tmp_path):
    data = synthetic(12, (3, 4, 5))
    src = write_raw_mrc(tmp_path / "h.mrc", data, 12)
    out = tmp_path / "f.mrc"
    assert convert(src, out).target_mode == 12  # kept unless asked
    with mrcfile.open(out) as m:
        assert m.data.dtype == np.float16 and m.data.tobytes() == data.tobytes()
    convert(src, out.with_name("f32.mrc"), Target(mode=2))
    with mrcfile.open(out.with_name("f32.mrc")) as m:
        assert m.data.dtype == np.float32 and m.header.mode == 2
        np.testing.assert_array_equal(m.data, data.astype(np.float32))


# --- refusals ----------------------------------------------------------------------

def test_lossy_conversion_is_refused_and_leaves_nothing(tmp_path):
    data = synthetic(2, (3, 4, 5))
    src = write_raw_mrc(tmp_path / "f.mrc", data, 2)
    out = tmp_path / "o.mrc"
    with pytest.raises(LossyConversionError) as err:
        convert(src, out, Target(mode=0))
    assert err.value.lossless_targets == [2, 4]
    assert "lossless target modes for this file: [2, 4]" in str(err.value)
    assert "frame 0, row 0, column 0" in str(err.value)
    assert not out.exists() and no_temp_files(tmp_path)


def test_lossy_frame_late_in_the_movie_removes_partial_output(tmp_path):
    data = np.zeros((4, 3, 3), dtype=np.int16)
    data[3, 1, 2] = 300  # only the last frame does not fit int8
    src = write_raw_mrc(tmp_path / "s.mrc", data, 1)
    with pytest.raises(LossyConversionError, match=r"frame 3, row 1, column 2 holds 300"):
        convert(src, tmp_path / "o.mrc", Target(mode=0))
    assert os.listdir(tmp_path) == ["s.mrc"]


def test_value_checked_conversion_is_allowed_when_exact(tmp_path):
    data = np.round(synthetic(2, (3, 4, 5))).astype(np.float32)  # integral, < 32767
    src = write_raw_mrc(tmp_path / "f.mrc", data, 2)
    report = convert(src, tmp_path / "i.mrc", Target(mode=1))
    assert report.lossless == "verified on every frame"
    with mrcfile.open(tmp_path / "i.mrc") as m:
        np.testing.assert_array_equal(m.data, data.astype(np.int16))


def test_repack_to_101_checks_the_range(tmp_path):
    small = counting_movie((2, 3, 5))
    src = write_raw_mrc(tmp_path / "s.mrc", small.astype(np.int16), 1)
    convert(src, tmp_path / "p.mrc", Target(mode=101))
    header, values = read_raw_mrc(tmp_path / "p.mrc")  # per-pixel reference unpacker
    assert header["mode"] == 101
    np.testing.assert_array_equal(values, small)
    big = small.astype(np.int16)
    big[1, 2, 4] = 16
    src2 = write_raw_mrc(tmp_path / "b.mrc", big, 1)
    with pytest.raises(LossyConversionError, match="row 2, column 4 holds 16"):
        convert(src2, tmp_path / "q.mrc", Target(mode=101))


def test_bad_targets(tmp_path):
    with pytest.raises(ConversionError, match="unknown target mode 5"):
        Target(mode=5)
    with pytest.raises(ConversionError, match="clevel"):
        Target(codec=Codec.ZSTD, clevel=12)
    with pytest.raises(ConversionError, match="snappy"):
        Target(codec=Codec.SNAPPY)
    src = write_raw_mrc(tmp_path / "p.mrc", counting_movie((1, 2, 2)), 101)
    with pytest.raises(ConversionError, match="4-bit"):
        convert(src, tmp_path / "x.mrcz", Target(mode=101, codec=Codec.ZSTD))
    with pytest.raises(LossyConversionError, match="complex"):
        convert(write_raw_mrc(tmp_path / "c.mrc", synthetic(4, (1, 2, 2)), 4),
                tmp_path / "r.mrc", Target(mode=2))


def test_target_is_hashable_and_frozen():
    a, b = Target(mode=0, codec=Codec.ZSTD), Target(mode=0, codec=Codec.ZSTD)
    assert hash(a) == hash(b) and {a: 1}[b] == 1
    with pytest.raises(AttributeError):
        a.mode = 1  # type: ignore[misc]


# --- MRCZ outputs, checked by mrcz (every mode x codec x byte order: test_interop_writer)

def test_mrcz_of_101_movie_is_mode_0_and_small(tmp_path):
    data = counting_movie((6, 64, 64))
    src = write_raw_mrc(tmp_path / "p.mrc", data, 101)
    out = tmp_path / "o.mrcz"
    convert(src, out, Target(codec=Codec.ZSTD))
    image, _ = mrcz.readMRC(str(out))
    assert image.dtype == np.int8
    np.testing.assert_array_equal(image, data)
    assert out.stat().st_size < src.stat().st_size  # smaller than even the packed file


def test_mrcz_round_trip_back_to_mrc_restores_mz(tmp_path):
    data = synthetic(1, (5, 6, 7))
    src = tmp_path / "v.mrc"
    with mrcfile.new(src) as m:  # a volume: ISPG 1, MZ = NZ
        m.set_data(data)
        m.voxel_size = 2.0
    convert(src, tmp_path / "v.mrcz", Target(codec=Codec.LZ4, clevel=9))
    convert(tmp_path / "v.mrcz", tmp_path / "back.mrc")
    mrcfile_valid(tmp_path / "back.mrc")
    with mrcfile.open(tmp_path / "back.mrc") as m:
        np.testing.assert_array_equal(m.data, data)
        assert (m.header.mx, m.header.my, m.header.mz) == (7, 6, 5)
        assert m.voxel_size.z == pytest.approx(2.0)
        assert m.header.exttyp != b"json" and m.header.nsymbt == 0


def test_mrcz_written_by_mrcz_converts_to_valid_mrc(tmp_path):
    data = synthetic(6, (3, 8, 8))
    mrcz.writeMRC(data, tmp_path / "z.mrcz", compressor="zstd", pixelsize=[3.0, 1.2, 1.2])
    convert(tmp_path / "z.mrcz", tmp_path / "p.mrc")
    mrcfile_valid(tmp_path / "p.mrc")
    with mrcfile.open(tmp_path / "p.mrc") as m:
        np.testing.assert_array_equal(m.data, data)
        assert m.voxel_size.x == pytest.approx(1.2)


# --- headers carried --------------------------------------------------------------

def test_big_endian_seri_header_is_byte_swapped(tmp_path):
    shorts = np.array([[1234, 25], [-567, 50]], dtype=">i2")  # tilt*100, mag/100
    src = write_raw_mrc(tmp_path / "s.mrc", synthetic(1, (2, 3, 3)), 1, ">",
                        extended=shorts.tobytes(), exttyp=b"SERI", nint=4, nreal=1 | 8)
    convert(src, tmp_path / "o.mrc")
    raw = (tmp_path / "o.mrc").read_bytes()
    h = read_raw_header(raw)
    assert (h["order"], h["exttyp"], h["nsymbt"], h["nint"], h["nreal"]) == \
        ("<", b"SERI", 8, 4, 1 | 8)
    assert np.frombuffer(raw[1024:1032], "<i2").tolist() == [1234, 25, -567, 50]
    with MrcFile(tmp_path / "o.mrc") as f:  # and our SERI decoder reads the same
        assert [r["tilt_angle"] for r in f.extended.records] == [12.34, -5.67]
        assert [r["magnification"] for r in f.extended.records] == [2500, 5000]
    mrcfile_valid(tmp_path / "o.mrc")


def test_writer_refuses_wrong_frames_and_commits_nothing(tmp_path):
    out = tmp_path / "w.mrc"
    with pytest.raises(TypeError):
        with MrcWriter(out, nx=3, ny=2, nz=2, mode=1) as w:
            w.write_frame(np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="only 1 of 2 frames"):
        with MrcWriter(out, nx=3, ny=2, nz=2, mode=1) as w:
            w.write_frame(np.zeros((2, 3), dtype=np.int16))
    assert os.listdir(tmp_path) == []


def test_existing_output_is_replaced_atomically(tmp_path):
    out = tmp_path / "o.mrc"
    out.write_bytes(b"old")
    data = synthetic(1, (2, 2, 2))
    src = write_raw_mrc(tmp_path / "s.mrc", data, 1)
    convert(src, out)
    with mrcfile.open(out) as m:
        np.testing.assert_array_equal(m.data, data)
    assert sorted(os.listdir(tmp_path)) == ["o.mrc", "s.mrc"]


def test_compression_does_not_depend_on_blosc_global_state(tmp_path):
    """python-mrcz changes blosc's process-wide blocksize; our output must not change."""
    src = write_raw_mrc(tmp_path / "p.mrc", counting_movie((3, 128, 128)), 101)
    convert(src, tmp_path / "a.mrcz", Target(codec=Codec.ZSTD))
    mrcz.writeMRC(np.zeros((2, 4, 4), np.int16), tmp_path / "t.mrcz", compressor="zstd")
    convert(src, tmp_path / "b.mrcz", Target(codec=Codec.ZSTD))
    a, b = (tmp_path / "a.mrcz").read_bytes(), (tmp_path / "b.mrcz").read_bytes()
    assert a[1024:] == b[1024:]


def test_background_encoder_error_surfaces_and_leaves_nothing(tmp_path, monkeypatch):
    from service.mrc import writer as writer_mod

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_mod, "compress_frame", broken)
    out = tmp_path / "o.mrcz"
    with pytest.raises(OSError, match="No space left"):
        with MrcWriter(out, nx=4, ny=4, nz=3, mode=1, codec=Codec.ZSTD) as w:
            for _ in range(3):
                w.write_frame(np.ones((4, 4), np.int16))
    assert os.listdir(tmp_path) == []


@pytest.fixture
def blosc_threads():
    """Let blosc take three threads per chunk for this test (the writer then compresses
    three frames at once, one thread each), and put the setting back after."""
    from service.mrc import codec

    previous = codec.set_threads(3)
    yield
    codec.set_threads(previous)


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_frames_compressed_at_once_are_written_in_order(tmp_path, blosc_threads, mode):
    """Several encoders finish out of order; the file is the one a single encoder writes
    (chunk for chunk), mrcz reads the frames in order, and the header's statistics are
    every frame's."""
    from service.mrc import codec

    rng = np.random.default_rng(mode)
    data = [(rng.poisson(1 + k, (64, 96)) * (k + 1)).astype(np.dtype(t))
            for k, t in enumerate(["i1", "i2", "f4"][mode:mode + 1] * 7)]
    movie = np.stack(data)
    outputs = []
    for threads in (3, 1):
        codec.set_threads(threads)
        out = tmp_path / f"t{threads}.mrcz"
        with MrcWriter(out, nx=96, ny=64, nz=7, mode=mode, codec=Codec.ZSTD) as w:
            assert w._encoders == threads
            for frame in data:
                w.write_frame(frame)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    image, _ = mrcz.readMRC(str(tmp_path / "t3.mrcz"))
    np.testing.assert_array_equal(image, movie)
    h = read_raw_header(outputs[0])
    assert (h["dmin"], h["dmax"]) == (movie.min(), movie.max())
    assert h["dmean"] == pytest.approx(movie.mean(dtype=np.float64), rel=1e-6)
    assert h["rms"] == pytest.approx(movie.std(dtype=np.float64), rel=1e-5)


def test_encoders_that_finish_out_of_order_still_write_in_order(tmp_path, monkeypatch,
                                                                 blosc_threads):
    """Even frames take longer to compress than the odd ones after them; the chunks
    still go out in frame order."""
    import time

    from service.mrc import writer as writer_mod

    real = writer_mod.compress_frame

    def uneven(frame, *args, **kwargs):
        time.sleep(0.05 if int(frame.flat[0]) % 2 == 0 else 0)
        return real(frame, *args, **kwargs)

    monkeypatch.setattr(writer_mod, "compress_frame", uneven)
    movie = np.stack([np.full((16, 24), k, np.int16) + np.arange(24, dtype=np.int16)
                      for k in range(9)])
    out = tmp_path / "o.mrcz"
    with MrcWriter(out, nx=24, ny=16, nz=9, mode=1, codec=Codec.ZSTD) as w:
        for frame in movie:
            w.write_frame(frame)
    image, _ = mrcz.readMRC(str(out))
    np.testing.assert_array_equal(image, movie)


def test_encoders_are_capped(tmp_path):
    from service.mrc import codec, writer as writer_mod

    previous = codec.set_threads(64)
    try:
        w = MrcWriter(tmp_path / "o.mrcz", nx=4, ny=4, nz=1, mode=1, codec=Codec.ZSTD)
        assert w._encoders == writer_mod.MAX_ENCODERS
        w.abort()
    finally:
        codec.set_threads(previous)
    assert os.listdir(tmp_path) == []


def fail_compression_of_call(monkeypatch, n: int, error: Exception) -> None:
    """The writer's ``n``-th frame compression raises ``error``; the others work."""
    from service.mrc import writer as writer_mod

    real, calls = writer_mod.compress_frame, []

    def failing(frame, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error
        return real(frame, *args, **kwargs)

    monkeypatch.setattr(writer_mod, "compress_frame", failing)


def test_a_writer_whose_frame_failed_never_commits(tmp_path, monkeypatch, blosc_threads):
    """A caller that catches a frame's error and commits anyway gets an error, and no
    file with a frame missing."""
    fail_compression_of_call(monkeypatch, 2, OSError(5, "Input/output error"))
    w = MrcWriter(tmp_path / "o.mrcz", nx=8, ny=8, nz=6, mode=1, codec=Codec.ZSTD)
    while w.frames_written < 6:
        try:
            w.write_frame(np.ones((8, 8), np.int16))
        except OSError:
            pass  # a careless caller goes on until six frames were taken
    with pytest.raises((OSError, ValueError)):
        w.commit()
    assert os.listdir(tmp_path) == []


def test_an_error_of_one_of_several_encoders_surfaces_and_leaves_nothing(
        tmp_path, monkeypatch, blosc_threads):
    fail_compression_of_call(monkeypatch, 3, OSError(28, "No space left on device"))
    with pytest.raises(OSError, match="No space left"):
        with MrcWriter(tmp_path / "o.mrcz", nx=8, ny=8, nz=6, mode=1, codec=Codec.ZSTD) as w:
            for _ in range(6):
                w.write_frame(np.ones((8, 8), np.int16))
    assert os.listdir(tmp_path) == []


def test_caller_may_reuse_its_buffer(tmp_path):
    out = tmp_path / "o.mrc"
    buf = np.zeros((8, 8), np.int16)
    with MrcWriter(out, nx=8, ny=8, nz=4, mode=1) as w:
        for k in range(4):
            buf[:] = k
            w.write_frame(buf)  # not owned: the writer must not see later changes
    with mrcfile.open(out) as m:
        assert [int(frame[0, 0]) for frame in m.data] == [0, 1, 2, 3]


def test_converting_onto_the_input_is_refused(tmp_path):
    src = write_raw_mrc(tmp_path / "s.mrc", synthetic(1, (2, 2, 2)), 1)
    before = src.read_bytes()
    with pytest.raises(ConversionError, match="is the input file"):
        convert(src, tmp_path / "." / "s.mrc")
    assert src.read_bytes() == before


def test_known_stats_skip_the_writers_pass_and_land_in_the_header(tmp_path):
    """Ingest hands the statistics it computed while validating to the archive write;
    the header must then hold exactly what the writer would have computed itself."""
    data = counting_movie((3, 16, 20))
    src = write_raw_mrc(tmp_path / "m.mrc", data, 101)
    computed = convert(src, tmp_path / "a.mrcz", Target(codec=Codec.ZSTD))
    known = Stats(**computed.stats, count=data.size)
    given = convert(src, tmp_path / "b.mrcz", Target(codec=Codec.ZSTD), known_stats=known)
    assert given.stats == computed.stats
    with MrcFile(tmp_path / "a.mrcz") as a, MrcFile(tmp_path / "b.mrcz") as b:
        assert a.header.tobytes() == b.header.tobytes()
