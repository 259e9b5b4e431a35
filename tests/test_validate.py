"""Validation: broken files give findings (severity, field, message), never exceptions."""

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mrcz

from service.mrc import (Codec, FormatError, MrcFile, Severity, Target, convert, inspect,
                         validate)
from service.mrc.header import HEADER_DTYPE
from tests.reference import counting_movie, synthetic, write_raw_mrc


def fields(findings, severity=None):
    return [f.field for f in findings if severity is None or f.severity is severity]


def errors_of(findings):
    return [f for f in findings if f.severity is Severity.ERROR]


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


# (description, mutate(path), expected (severity, field), what the message must say:
#  the offending value and, where there is one, the place)
CORPUS = [
    ("empty file", lambda p: p.write_bytes(b""), (Severity.ERROR, "header"),
     ["file is 0 bytes", "1024-byte MRC header"]),
    ("short header", lambda p: p.write_bytes(p.read_bytes()[:500]), (Severity.ERROR, "header"),
     ["file is 500 bytes"]),
    ("garbage", lambda p: p.write_bytes(bytes(range(256)) * 8), (Severity.ERROR, "header"),
     ["not an MRC header", "in neither byte order"]),
    ("truncated data", lambda p: p.write_bytes(p.read_bytes()[:-7]), (Severity.ERROR, "data"),
     ["truncated", "3 frames of 40 bytes", "the file has 1137", "only 2 complete frames"]),
    ("trailing bytes", lambda p: p.write_bytes(p.read_bytes() + b"x" * 9),
     (Severity.WARNING, "data"), ["9 bytes after the last frame", "byte 1144"]),
    ("zero NX", lambda p: patch(p, 0, "<i", 0), (Severity.ERROR, "header"),
     ["0 x 4 x 3, mode 1"]),
    ("negative NZ", lambda p: patch(p, 8, "<i", -3), (Severity.ERROR, "header"),
     ["5 x 4 x -3"]),
    ("dims past 2**63", lambda p: patch(p, 0, "<3i", 2**31 - 1, 2**31 - 1, 2**31 - 1),
     (Severity.ERROR, "data"), ["truncated", "2147483647 frames", "the file has 1144"]),
    ("unknown mode", lambda p: patch(p, 12, "<i", 5), (Severity.ERROR, "header"), ["mode 5)"]),
    ("unknown MRCZ codec", lambda p: patch(p, 12, "<i", 9001), (Severity.ERROR, "header"),
     ["mode 9001"]),
    ("negative NSYMBT", lambda p: patch(p, 92, "<i", -8), (Severity.ERROR, "nsymbt"),
     ["negative (-8)"]),
    ("NSYMBT past EOF", lambda p: patch(p, 92, "<i", 10**6), (Severity.ERROR, "nsymbt"),
     ["1000000 bytes runs past the end", "1144-byte file"]),
    ("bad MAP", lambda p: patch(p, 208, "4s", b"ABCD"), (Severity.WARNING, "map"),
     ["b'ABCD'", "b'MAP '"]),
    ("bad MACHST", lambda p: patch(p, 212, "4s", b"\x00\x00\x00\x00"),
     (Severity.WARNING, "machst"), ["00 00 00 00", "little-endian"]),
    ("axes not a permutation", lambda p: patch(p, 64, "<3i", 1, 1, 3),
     (Severity.WARNING, "mapc"), ["1, 1, 3", "not a permutation"]),
    ("NVERSION", lambda p: patch(p, 108, "<i", 7), (Severity.WARNING, "nversion"),
     ["is 7", "20140 or 20141"]),
    ("NLABL out of range", lambda p: patch(p, 220, "<i", 11), (Severity.WARNING, "nlabl"),
     ["NLABL is 11", "0-10"]),
    ("NLABL count", lambda p: patch(p, 220, "<i", 2), (Severity.WARNING, "nlabl"),
     ["says 2 labels but 0 hold text"]),
    ("negative MX", lambda p: patch(p, 28, "<i", -1), (Severity.WARNING, "mx"),
     ["MX", "negative: -1"]),
    ("zero MY", lambda p: patch(p, 32, "<i", 0), (Severity.WARNING, "my"),
     ["MY is 0", "undefined"]),
    ("negative cell", lambda p: patch(p, 40, "<f", -5.0), (Severity.WARNING, "cella"),
     ["length x is negative: -5.0"]),
    ("wrong DMAX", lambda p: patch(p, 80, "<f", 1e6), (Severity.WARNING, "dmax"),
     ["DMAX in header is 1000000.0"]),
    ("wrong DMEAN", lambda p: patch(p, 84, "<f", 999.0), (Severity.WARNING, "dmean"),
     ["DMEAN in header is 999.0"]),
    ("wrong RMS", lambda p: patch(p, 216, "<f", 1.0), (Severity.WARNING, "rms"),
     ["RMS in header is 1.0"]),
    ("volume stack NZ", lambda p: patch(patch(p, 88, "<i", 401), 36, "<i", 2),
     (Severity.WARNING, "nz"), ["ISPG 401", "NZ 3 is not a multiple of MZ 2"]),
]


@pytest.mark.parametrize("name, mutate, expected, says", CORPUS, ids=[c[0] for c in CORPUS])
def test_broken_header_corpus(tmp_path, name, mutate, expected, says):
    path = good_file(tmp_path)
    mutate(path)
    findings = validate(path)
    matching = [f for f in findings if (f.severity, f.field) == expected]
    assert len(matching) == 1, findings
    finding = matching[0]
    for fragment in says:
        assert fragment in finding.message, (fragment, finding.message)
    for f in findings:
        assert f.message and isinstance(f.message, str)
    report = inspect(path)
    assert report["valid"] == (expected[0] is not Severity.ERROR)
    assert {"severity": expected[0].value, "field": expected[1],
            "message": finding.message} in report["findings"]


def test_stats_findings_quote_the_datas_values(tmp_path):
    """Header statistics that disagree with the data: one warning per field, quoting the
    data's own value as numpy computes it in float64."""
    data = synthetic(1, (3, 4, 5)).astype(np.float64)
    path = write_raw_mrc(tmp_path / "s.mrc", data.astype(np.int16), 1,
                         stats=(-40000.0, 40000.0, 1.0, 2.0))
    found = {f.field: f for f in validate(path) if f.severity is Severity.WARNING}
    assert sorted(found) == ["dmax", "dmean", "dmin", "rms"]
    assert f"the data's is {data.min()}" in found["dmin"].message
    assert f"the data's is {data.max()}" in found["dmax"].message
    assert f"the data's is {data.mean():.6g}" in found["dmean"].message
    assert f"the data's is {data.std():.6g}" in found["rms"].message


def test_unknown_exttyp_and_unreadable_extended_header(tmp_path):
    path = write_raw_mrc(tmp_path / "e.mrc", synthetic(1, (1, 2, 2)), 1, extended=b"x" * 16,
                         exttyp=b"ZZZZ")
    [unknown] = [f for f in validate(path) if f.severity is Severity.WARNING]
    assert unknown.field == "exttyp"
    assert "16 bytes" in unknown.message and "unrecognised EXTTYP b'ZZZZ'" in unknown.message
    path = write_raw_mrc(tmp_path / "j.mrc", synthetic(1, (1, 2, 2)), 1, extended=b"{nope",
                         exttyp=b"json")
    warnings = {f.field: f.message for f in validate(path) if f.severity is Severity.WARNING}
    assert "not valid JSON" in warnings["extended_header"]
    # json is MRCZ's own EXTTYP: in a plain MRC it is as unknown as any other
    assert "unrecognised EXTTYP b'json'" in warnings["exttyp"]
    assert not errors_of(validate(path))


def test_truncated_message_says_where(tmp_path):
    path = good_file(tmp_path)
    path.write_bytes(path.read_bytes()[:1024 + 40 + 5])
    [finding] = errors_of(validate(path))
    assert finding.field == "data"
    assert "truncated" in finding.message and "only 1 complete frames" in finding.message
    assert "the file has 1069" in finding.message


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

def mrcz_file(tmp_path, data=None):
    """An MRCZ written by python-mrcz. The default (random int16) does not compress, so
    blosc stores each chunk as a plain copy; counting data compresses for real."""
    data = synthetic(1, (4, 16, 16)) if data is None else data
    path = tmp_path / "z.mrcz"
    mrcz.writeMRC(data, path, compressor="zstd")
    return path, data


def chunk_offset(path, k):
    """Byte offset of frame k's blosc chunk, walked with the chunk headers' own sizes
    (c-blosc 1.x: cbytes, little-endian uint32 at byte 12 of each chunk), not our index."""
    raw = path.read_bytes()
    nsymbt = struct.unpack_from("<i", raw, 92)[0]
    pos = 1024 + nsymbt
    for _ in range(k):
        pos += struct.unpack_from("<I", raw, pos + 12)[0]
    return pos


def test_lying_chunk_is_refused_before_decompression(tmp_path):
    """A chunk whose nbytes exceeds the frame size is a decompression bomb."""
    path, _ = mrcz_file(tmp_path)
    at = chunk_offset(path, 2)
    patch(path, at + 4, "<I", 2**31 - 1)
    [bomb] = errors_of(validate(path))
    assert bomb.field == "data"
    assert f"frame 2 (byte {at})" in bomb.message
    assert "claims 2147483647 uncompressed bytes but a frame is 512" in bomb.message
    assert "refusing to decompress" in bomb.message


def test_truncated_mrcz(tmp_path):
    path, _ = mrcz_file(tmp_path)
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-10])
    [finding] = errors_of(validate(path))
    assert finding.field == "data"
    assert f"frame 3 (byte {chunk_offset(path, 3)})" in finding.message
    assert f"runs past the end of the file ({size - 10} bytes)" in finding.message


def test_corrupt_chunk_payload_is_a_finding(tmp_path):
    """A compressed chunk whose payload is overwritten: the structure (every chunk
    header) is intact, so opening and the other frames work; decompressing frame 1 fails,
    and the deep check says which frame, where, and why."""
    path, data = mrcz_file(tmp_path, counting_movie((4, 16, 16)).astype(np.int16))
    start = chunk_offset(path, 1)
    flags = path.read_bytes()[start + 2]
    assert not flags & 0x02, "chunk stored uncompressed: the corruption would be invisible"
    raw = bytearray(path.read_bytes())
    raw[start + 16: start + 40] = b"\xff" * 24
    path.write_bytes(bytes(raw))
    [finding] = errors_of(validate(path))  # deep: decompresses every frame
    assert finding.field == "data"
    assert f"frame 1 (byte {start})" in finding.message
    assert "corrupt blosc chunk" in finding.message
    assert validate(path, deep=False) == [f for f in validate(path) if f is not finding
                                          and f.field != "data"]
    with MrcFile(path) as f:  # structure is intact: the header walk cannot see payloads
        np.testing.assert_array_equal(f.read_frame(0), data[0])
        np.testing.assert_array_equal(f.read_frame(2), data[2])
        with pytest.raises(FormatError, match="frame 1 .*corrupt blosc chunk"):
            f.read_frame(1)


def test_blosc2_chunks_are_identified(tmp_path):
    path, _ = mrcz_file(tmp_path)
    patch(path, chunk_offset(path, 0), "B", 5)
    [finding] = errors_of(validate(path))
    assert finding.field == "data"
    assert "frame 0 (byte 1024): blosc2-format chunk (version 5)" in finding.message


def test_wrong_packed_bytes_is_a_warning(tmp_path):
    path, _ = mrcz_file(tmp_path)
    chunks = path.stat().st_size - chunk_offset(path, 0)
    patch(path, 144, "<q", 12345)
    [finding] = [f for f in validate(path) if f.field == "mrcz_packed_bytes"]
    assert finding.severity is Severity.WARNING
    assert f"header says 12345 compressed bytes, the chunks hold {chunks}" == finding.message


@pytest.mark.parametrize("name, target", [("o.mrc", Target()), ("o.mrcz", Target(
    codec=Codec.ZSTD)), ("be.mrcz", Target(codec=Codec.LZ4, byte_order=">")),
    ("o101.mrc", Target(mode=101))])
def test_our_outputs_validate_clean(tmp_path, name, target):
    src = write_raw_mrc(tmp_path / "p.mrc", synthetic(101, (3, 6, 7)), 101)
    convert(src, tmp_path / name, target)
    findings = validate(tmp_path / name)
    if target.mode == 101:  # the one fact recorded about an odd-width 4-bit file
        assert [(f.severity, f.field) for f in findings] == [(Severity.INFO, "nx")]
        assert "odd NX 7" in findings[0].message
    else:
        assert findings == []


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
    assert all(f.severity in Severity and f.field and f.message for f in findings)
    # The verdict agrees with what reading does: an error finding exactly when opening
    # the file or reading one of its frames fails, and it is the same finding.
    opened = False
    try:
        with MrcFile(path) as f:
            opened = True
            for k in range(f.n_frames):
                f.read_frame(k)
        failure = []
    except FormatError as exc:
        failure = errors_of(exc.findings)
        assert failure, exc.findings
    assert errors_of(findings) == failure
    # Without the deep pass only what opening sees is reported.
    shallow = inspect(path, deep=False)
    assert shallow["valid"] == opened
    assert [x for x in shallow["findings"] if x["severity"] == "error"] == \
        ([] if opened else [x.to_dict() for x in failure])


def test_corrupt_chunk_flags_become_findings_not_exceptions(tmp_path):
    """Found by the fuzz test: blosc raises its own extension error type."""
    path, _ = mrcz_file(tmp_path)
    patch(path, chunk_offset(path, 0) + 2, "B", 0)
    [finding] = errors_of(validate(path))
    assert finding.field == "data"
    assert "frame 0 (byte 1024): corrupt blosc chunk" in finding.message
    with MrcFile(path) as f, pytest.raises(FormatError, match="corrupt blosc chunk"):
        f.read_frame(0)
