"""Validation: broken files give findings (severity, field, message), never exceptions."""

import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mrcz

from service.mrc import FormatError, MrcFile, Severity, convert, inspect, validate
from service.mrc.header import HEADER_DTYPE
from tests.reference import synthetic, write_raw_mrc


def fields(findings, severity=None):
    return [f.field for f in findings if severity is None or f.severity is severity]


def good_file(tmp_path, **header):
    data = synthetic(1, (3, 4, 5))
    stats = (float(data.min()), float(data.max()), float(data.mean()), float(data.std()))
    return write_raw_mrc(tmp_path / "g.mrc", data, 1, stats=stats, **header)


def test_good_file_has_no_findings(tmp_path):
    assert validate(good_file(tmp_path)) == []


def patch(path, offset, fmt, *values):
    raw = bytearray(path.read_bytes())
    struct.pack_into(fmt, raw, offset, *values)
    path.write_bytes(bytes(raw))
    return path


# (description, mutate(path), expected (severity, field))
CORPUS = [
    ("empty file", lambda p: p.write_bytes(b""), (Severity.ERROR, "header")),
    ("short header", lambda p: p.write_bytes(p.read_bytes()[:500]), (Severity.ERROR, "header")),
    ("garbage", lambda p: p.write_bytes(bytes(range(256)) * 8), (Severity.ERROR, "header")),
    ("truncated data", lambda p: p.write_bytes(p.read_bytes()[:-7]), (Severity.ERROR, "data")),
    ("trailing bytes", lambda p: p.write_bytes(p.read_bytes() + b"x" * 9),
     (Severity.WARNING, "data")),
    ("zero NX", lambda p: patch(p, 0, "<i", 0), (Severity.ERROR, "header")),
    ("negative NZ", lambda p: patch(p, 8, "<i", -3), (Severity.ERROR, "header")),
    ("dims past 2**63", lambda p: patch(p, 0, "<3i", 2**31 - 1, 2**31 - 1, 2**31 - 1),
     (Severity.ERROR, "data")),
    ("unknown mode", lambda p: patch(p, 12, "<i", 5), (Severity.ERROR, "header")),
    ("unknown MRCZ codec", lambda p: patch(p, 12, "<i", 9001), (Severity.ERROR, "header")),
    ("negative NSYMBT", lambda p: patch(p, 92, "<i", -8), (Severity.ERROR, "nsymbt")),
    ("NSYMBT past EOF", lambda p: patch(p, 92, "<i", 10**6), (Severity.ERROR, "nsymbt")),
    ("bad MAP", lambda p: patch(p, 208, "4s", b"ABCD"), (Severity.WARNING, "map")),
    ("bad MACHST", lambda p: patch(p, 212, "4s", b"\x00\x00\x00\x00"),
     (Severity.WARNING, "machst")),
    ("axes not a permutation", lambda p: patch(p, 64, "<3i", 1, 1, 3),
     (Severity.WARNING, "mapc")),
    ("NVERSION", lambda p: patch(p, 108, "<i", 7), (Severity.WARNING, "nversion")),
    ("NLABL out of range", lambda p: patch(p, 220, "<i", 11), (Severity.WARNING, "nlabl")),
    ("NLABL count", lambda p: patch(p, 220, "<i", 2), (Severity.WARNING, "nlabl")),
    ("negative MX", lambda p: patch(p, 28, "<i", -1), (Severity.WARNING, "mx")),
    ("zero MY", lambda p: patch(p, 32, "<i", 0), (Severity.WARNING, "my")),
    ("negative cell", lambda p: patch(p, 40, "<f", -5.0), (Severity.WARNING, "cella")),
    ("wrong DMAX", lambda p: patch(p, 80, "<f", 1e6), (Severity.WARNING, "dmax")),
    ("wrong DMEAN", lambda p: patch(p, 84, "<f", 999.0), (Severity.WARNING, "dmean")),
    ("wrong RMS", lambda p: patch(p, 216, "<f", 1.0), (Severity.WARNING, "rms")),
    ("volume stack NZ", lambda p: patch(patch(p, 88, "<i", 401), 36, "<i", 2),
     (Severity.WARNING, "nz")),
]


@pytest.mark.parametrize("name, mutate, expected", CORPUS, ids=[c[0] for c in CORPUS])
def test_broken_header_corpus(tmp_path, name, mutate, expected):
    path = good_file(tmp_path)
    mutate(path)
    findings = validate(path)
    assert (expected[0], expected[1]) in [(f.severity, f.field) for f in findings], findings
    for f in findings:
        assert f.message and isinstance(f.message, str)
    report = inspect(path)
    assert report["valid"] == (expected[0] is not Severity.ERROR)


def test_unknown_exttyp_and_unreadable_extended_header(tmp_path):
    path = write_raw_mrc(tmp_path / "e.mrc", synthetic(1, (1, 2, 2)), 1, extended=b"x" * 16,
                         exttyp=b"ZZZZ")
    assert (Severity.WARNING, "exttyp") in [(f.severity, f.field) for f in validate(path)]
    path = write_raw_mrc(tmp_path / "j.mrc", synthetic(1, (1, 2, 2)), 1, extended=b"{nope",
                         exttyp=b"json")
    assert "extended_header" in fields(validate(path), Severity.WARNING)


def test_truncated_message_says_where(tmp_path):
    path = good_file(tmp_path)
    path.write_bytes(path.read_bytes()[:1024 + 40 + 5])
    [finding] = [f for f in validate(path) if f.severity is Severity.ERROR]
    assert "truncated" in finding.message and "only 1 complete frames" in finding.message


def test_open_raises_format_error_with_findings(tmp_path):
    path = tmp_path / "x.mrc"
    path.write_bytes(b"\x01" * 2000)
    with pytest.raises(FormatError) as err:
        MrcFile(path)
    assert fields(err.value.findings) == ["header"]


def test_missing_file_is_a_finding(tmp_path):
    [finding] = validate(tmp_path / "nope.mrc")
    assert finding.field == "file" and finding.severity is Severity.ERROR


# --- MRCZ specifics -----------------------------------------------------------------

def mrcz_file(tmp_path):
    data = synthetic(1, (4, 16, 16))
    path = tmp_path / "z.mrcz"
    mrcz.writeMRC(data, path, compressor="zstd")
    return path, data


def chunk_offset(path, k):
    with MrcFile(path) as f:
        return f.frame_index.offsets[k]


def test_lying_chunk_is_refused_before_decompression(tmp_path):
    """A chunk whose nbytes exceeds the frame size is a decompression bomb."""
    path, _ = mrcz_file(tmp_path)
    patch(path, chunk_offset(path, 2) + 4, "<I", 2**31 - 1)
    findings = validate(path)
    [bomb] = [f for f in findings if f.severity is Severity.ERROR]
    assert "refusing to decompress" in bomb.message and "frame 2" in bomb.message


def test_truncated_mrcz(tmp_path):
    path, _ = mrcz_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-10])
    assert "runs past the end" in validate(path)[0].message


def test_corrupt_chunk_payload_is_a_finding(tmp_path):
    path, _ = mrcz_file(tmp_path)
    start = chunk_offset(path, 1)
    raw = bytearray(path.read_bytes())
    raw[start + 16: start + 40] = b"\xff" * 24
    path.write_bytes(bytes(raw))
    findings = validate(path)  # deep: decompresses every frame
    assert all(isinstance(f.message, str) for f in findings)
    with MrcFile(path) as f:  # structure is intact: the header walk cannot see payloads
        f.read_frame(0)


def test_blosc2_chunks_are_identified(tmp_path):
    path, _ = mrcz_file(tmp_path)
    patch(path, chunk_offset(path, 0), "B", 5)
    assert "blosc2" in validate(path)[0].message


def test_wrong_packed_bytes_is_a_warning(tmp_path):
    path, _ = mrcz_file(tmp_path)
    patch(path, 144, "<q", 12345)
    assert "mrcz_packed_bytes" in fields(validate(path), Severity.WARNING)


def test_our_outputs_validate_clean(tmp_path):
    src = write_raw_mrc(tmp_path / "p.mrc", synthetic(101, (3, 6, 7)), 101)
    for name, kwargs in (("o.mrc", {}), ("o.mrcz", {"codec": __import__(
            "service.mrc", fromlist=["Codec"]).Codec.ZSTD})):
        from service.mrc import Target
        convert(src, tmp_path / name, Target(**kwargs))
        assert [f for f in validate(tmp_path / name) if f.severity is not Severity.INFO] == []


# --- fuzzing: mutated headers and truncations never raise ----------------------------

_NAMED = [(name, HEADER_DTYPE.fields[name][1], HEADER_DTYPE.fields[name][0])
          for name in HEADER_DTYPE.names if not name.startswith("extra")]


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seeds")
    plain = write_raw_mrc(folder / "p.mrc", synthetic(101, (2, 4, 5)), 101,
                          stats=(0.0, 15.0, 7.0, 4.0))
    z = folder / "z.mrcz"
    mrcz.writeMRC(synthetic(1, (3, 8, 8)), z, compressor="lz4")
    return [plain.read_bytes(), z.read_bytes()]


@settings(max_examples=600, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(which=st.integers(0, 1), edits=st.lists(
    st.tuples(st.integers(0, 1100), st.integers(0, 255)), max_size=12),
    value_edits=st.lists(st.tuples(st.integers(0, len(_NAMED) - 1),
                                   st.sampled_from([0, -1, 1, 2, 3, 7, 101, 1002, 6101, 2**31 - 1,
                                                    -2**31, 1024, 10**9])), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 1400)))
def test_fuzzed_headers_never_raise(tmp_path_factory, seed_files, which, edits, value_edits,
                                    cut):
    raw = bytearray(seed_files[which])
    for offset, name_type in value_edits:
        name, offset_of, dtype = _NAMED[offset]
        if dtype.kind in "iu" and dtype.itemsize >= 4 and dtype.shape == ():
            struct.pack_into("<i" if dtype.itemsize == 4 else "<q", raw, offset_of, name_type)
    for offset, byte in edits:
        if offset < len(raw):
            raw[offset] = byte
    if cut is not None:
        del raw[cut:]
    path = tmp_path_factory.mktemp("fz") / "f.mrc"
    path.write_bytes(bytes(raw))
    findings = validate(path)
    assert all(f.severity in Severity for f in findings)
    report = inspect(path, deep=False)
    assert isinstance(report["valid"], bool)


def test_corrupt_chunk_flags_become_findings_not_exceptions(tmp_path):
    """Found by the fuzz test: blosc raises its own extension error type."""
    path, _ = mrcz_file(tmp_path)
    patch(path, chunk_offset(path, 0) + 2, "B", 0)
    errors = [f for f in validate(path) if f.severity is Severity.ERROR]
    assert errors and "frame 0" in errors[0].message
    with MrcFile(path) as f, pytest.raises(FormatError, match="corrupt blosc chunk"):
        f.read_frame(0)
