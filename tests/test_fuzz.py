"""Hostile input at scale: 10,000 mutated and truncated files (seeded, reproducible) go
to the validator, the reader and the upload endpoint. The rules: the core raises only
its own typed errors (never IndexError, OverflowError, MemoryError, blosc's errors...),
the validator never raises, the API never answers 5xx, and no ingest job ever fails for
an unexpected reason. A failing case prints its seed and mutation."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest

from service.mrc import Codec, MrcError, MrcFile, Target, convert, validate
from tests.api_helpers import make_client
from tests.reference import counting_movie, synthetic, write_raw_mrc

CASES = 10_000
HEADER_INT_FIELDS = {"nx": 0, "ny": 4, "nz": 8, "mode": 12, "mx": 28, "my": 32, "mz": 36,
                     "mapc": 64, "ispg": 88, "nsymbt": 92, "nversion": 108, "nlabl": 220}
EVIL_INTS = [0, -1, 1, 2, 3, 101, 1002, 4101, 2**31 - 1, -2**31, 2**16 + 1, 65535, 1024,
             1_000_000, 2_097_153]  # 2097153^3 > 2^63: sizes that overflow int64


def corpus(folder) -> list[bytes]:
    """Valid files to mutate: every mode, both byte orders, 4-bit with odd nx, MRCZ."""
    files = []
    for i, (mode, order) in enumerate([(m, o) for m in (0, 1, 2, 3, 4, 6, 12)
                                       for o in "<>"]):
        shape = (3, 6, 5)
        files.append(write_raw_mrc(folder / f"c{i}.mrc", synthetic(mode, shape, seed=i), mode,
                                   order=order).read_bytes())
    files.append(write_raw_mrc(folder / "u4.mrc", counting_movie((3, 6, 7)), 101).read_bytes())
    plain = write_raw_mrc(folder / "i8.mrc", synthetic(1, (3, 16, 16)), 1)
    for codec in (Codec.ZSTD, Codec.LZ4):
        out = folder / f"z{codec.cname}.mrcz"
        convert(plain, out, Target(codec=codec))
        files.append(out.read_bytes())
    return files


def mutate(raw: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    data = bytearray(raw)
    kind = int(rng.integers(0, 6))
    order = "<" if data[212] == 0x44 else ">"
    if kind == 0:  # an evil value in an integer header field
        name = list(HEADER_INT_FIELDS)[int(rng.integers(0, len(HEADER_INT_FIELDS)))]
        value = EVIL_INTS[int(rng.integers(0, len(EVIL_INTS)))]
        struct.pack_into(order + "i", data, HEADER_INT_FIELDS[name], value)
        return bytes(data), f"{name}={value}"
    if kind == 1:  # random bytes flipped anywhere in the header
        positions = rng.integers(0, 1024, size=int(rng.integers(1, 9)))
        for p in positions:
            data[p] = int(rng.integers(0, 256))
        return bytes(data), f"flip {sorted(positions.tolist())}"
    if kind == 2:  # truncated anywhere
        cut = int(rng.integers(0, len(data)))
        return bytes(data[:cut]), f"truncate at {cut}"
    if kind == 3:  # garbage appended or the data overwritten
        if rng.random() < 0.5:
            return bytes(data) + rng.bytes(int(rng.integers(1, 300))), "append"
        start = int(rng.integers(1024, max(1025, len(data))))
        junk = rng.bytes(min(64, len(data) - start))
        data[start:start + len(junk)] = junk
        return bytes(data), f"overwrite data at {start}"
    if kind == 4:  # lying blosc chunk header (nbytes / cbytes): a would-be bomb
        offset = 1024 + struct.unpack_from(order + "i", data, 92)[0]
        if offset + 16 <= len(data):
            field = int(rng.integers(0, 3))
            value = [2**31 - 1, 0, 1 << 30, 15, len(data) * 100][int(rng.integers(0, 5))]
            struct.pack_into("<I", data, offset + 4 + 4 * field, value & 0xFFFFFFFF)
            return bytes(data), f"chunk field {field}={value}"
        return bytes(data), "chunk (no room)"
    dims = [int(v) for v in rng.choice(EVIL_INTS, size=3)]  # several dimensions at once
    struct.pack_into(order + "3i", data, 0, *dims)
    return bytes(data), f"dims={dims}"


def check_core(path) -> None:
    findings = validate(path)
    assert isinstance(findings, list)
    try:
        with MrcFile(path) as f:
            for k in (0, f.n_frames - 1):
                try:
                    f.read_frame(k)
                except MrcError:
                    pass
    except MrcError:
        pass


def test_core_survives_10000_mutations(tmp_path):
    bases = corpus(tmp_path)
    rng = np.random.default_rng(20261124)
    path = tmp_path / "fuzz.mrc"
    started = time.monotonic()
    for case in range(CASES):
        raw, what = mutate(bases[case % len(bases)], rng)
        path.write_bytes(raw)
        try:
            check_core(path)
        except Exception as exc:  # noqa: BLE001 - report the reproducible case
            pytest.fail(f"case {case} (base {case % len(bases)}, {what}): "
                        f"{type(exc).__name__}: {exc}")
    assert time.monotonic() - started < 240


#: the upload cases run as this many shards of their own seeds, each on a fresh service
#: (10,000 cases in all), so that pytest-xdist spreads them over the cores
UPLOAD_SHARDS = 4


@pytest.mark.parametrize("shard", range(UPLOAD_SHARDS))
def test_upload_endpoint_survives_10000_mutations(tmp_path, memory_folder, shard):
    """The data folder in memory (tmpfs): this test is about what the parser and the
    pass do with hostile bytes, and 10,000 fsyncs on a disk would be most of its time."""
    bases = corpus(tmp_path)
    rng = np.random.default_rng((777, shard))
    statuses: dict[int, int] = {}
    cases = range(shard, CASES, UPLOAD_SHARDS)
    with make_client(memory_folder / "data", workers=2) as c:
        jobs = []
        for i, case in enumerate(cases):  # every shard goes round every base
            raw, what = mutate(bases[i % len(bases)], rng)
            response = c.put(f"/v1/uploads/f{case}.mrc", content=raw)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (case, what, response.text)
            body = response.json()
            assert body.get("error") in (None, "not_mrc", "invalid_mrc"), (case, what)
            if body.get("error") == "invalid_mrc":  # refused at the door: frame limits
                assert {f["field"] for f in body["detail"]["findings"]} <= {"nz", "nx"}, body
            if response.status_code == 201:  # ingested while it streamed: done now
                job = response.json()["job"]
                assert job["state"] == "done", (case, what, job)  # rejected is a result
                jobs.append(job["id"])
        failed = c.get("/v1/datasets", params={"status": "failed"}).json()["items"]
        assert failed == []
        counts = {s: c.get("/v1/datasets", params={"status": s, "limit": 1000}).json()
                  for s in ("ready", "rejected")}
    # more than a tenth of the cases each accepted and refused (> 1,000 of 10,000)
    assert min(statuses.get(201, 0), statuses.get(415, 0)) > len(cases) // 10, statuses
    assert counts["ready"]["items"] and counts["rejected"]["items"]
