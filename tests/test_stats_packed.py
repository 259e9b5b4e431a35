"""Statistics and frame sums of 4-bit (packed) movies as ingest takes them, checked
against slow, obvious numpy on random and edge data: all 0, all 15, odd frame widths,
one-frame movies, frames too bright for the fast frame-sum path.

Ingest measures 4-bit counts through fast paths (the frame sum adds two pixels at a
time in uint16 lanes when it knows the frame's range; exact integer moments); the
reference here widens every pixel to float64/int64 and sums plainly.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from service.mrc.archiver import FORM_ARCHIVE, Archiver, ArchivePolicy
from service.mrc.preview import BinnedSum, bin_factors
from service.mrc.sink import AtomicFile
from service.mrc.stats import StatsAccumulator
from service.mrc.stream import StreamCutter
from tests.reference import raw_header, slow_pack_4bit


def slow_block_sums(frame: np.ndarray, fy: int, fx: int) -> np.ndarray:
    ny, nx = frame.shape
    h, w = ny // fy, nx // fx
    wide = frame[:h * fy, :w * fx].astype(np.int64)
    return wide.reshape(h, fy, w, fx).sum(axis=(1, 3)).astype(np.float64)


def slow_stats(frames: np.ndarray) -> dict:
    wide = frames.astype(np.float64)
    return {"min": wide.min(axis=(1, 2)).tolist(), "max": wide.max(axis=(1, 2)).tolist(),
            "mean": wide.mean(axis=(1, 2)).tolist(), "std": wide.std(axis=(1, 2)).tolist(),
            "dmin": wide.min(), "dmax": wide.max(), "dmean": wide.mean(), "rms": wide.std()}


def movies():
    rng = np.random.default_rng(19)
    poisson = lambda shape, lam=1.0: np.minimum(rng.poisson(lam, size=shape), 15)  # noqa: E731
    yield "poisson", poisson((4, 60, 96))
    yield "all-zero", np.zeros((3, 40, 64), np.uint8)
    yield "all-15", np.full((3, 40, 64), 15, np.uint8)
    yield "odd-width", poisson((3, 37, 51))
    yield "one-frame", poisson((1, 48, 80), 3.0)
    yield "uniform 0-15", rng.integers(0, 16, size=(3, 66, 90))
    yield "bright (slow sum path)", poisson((2, 64, 128), 12.0)
    yield "one-pixel rows", poisson((2, 9, 1))
    yield "width 2", poisson((2, 17, 2))


@pytest.mark.parametrize("name,data", list(movies()), ids=[n for n, _ in movies()])
@pytest.mark.parametrize("side", [1000, 16, 5])
def test_binned_sum_fast_path_matches_numpy(name, data, side):
    frames = data.astype(np.uint8)
    ny, nx = frames.shape[1:]
    fy, fx = bin_factors(ny, nx, side)
    fast, plain = BinnedSum(ny, nx, side), BinnedSum(ny, nx, side)
    expected = np.zeros((ny // fy, nx // fx))
    for frame in frames:
        fast.add(frame, counts_max=int(frame.max()))
        fast.add(frame.view(np.int8), counts_max=int(frame.max()))  # mode-0 counts
        plain.add(frame)
        expected += 2 * slow_block_sums(frame, fy, fx)
    assert np.array_equal(fast.total, expected)
    assert np.array_equal(plain.total * 2, expected)


def test_binned_sum_declines_what_it_cannot_do_exactly():
    frame = np.full((40, 40), 200, np.uint8)  # 4 rows of 200 overflow a byte lane
    fast = BinnedSum(40, 40, 10)
    fast.add(frame, counts_max=200)
    assert np.array_equal(fast.total, slow_block_sums(frame, 4, 4))
    wide = np.full((40, 40), 3, np.uint16)  # not 8-bit: the general path
    fast = BinnedSum(40, 40, 10)
    fast.add(wide, counts_max=3)
    assert np.array_equal(fast.total, slow_block_sums(wide, 4, 4))


def four_bit_file(data: np.ndarray) -> bytes:
    nz, ny, nx = data.shape
    return raw_header(nx=nx, ny=ny, nz=nz, mode=101) + \
        b"".join(slow_pack_4bit(frame) for frame in data.astype(np.uint8))


@pytest.mark.parametrize("name,data", list(movies()), ids=[n for n, _ in movies()])
def test_ingest_statistics_and_sum_of_4bit_movies_match_numpy(tmp_path, name, data):
    raw = four_bit_file(data)
    archive = tmp_path / "a.mrcz"
    policy = ArchivePolicy(sum_side=16)
    archiver = Archiver(policy, lambda: AtomicFile(archive, reserve_head=1024),
                        lambda: AtomicFile(tmp_path / "tail"))
    cutter = StreamCutter(pool=archiver.pool)
    for start in range(0, len(raw), 999):  # uneven pieces, as a network delivers them
        for piece in cutter.feed(raw[start:start + 999]):
            archiver.add(piece)
    for piece in cutter.finish():
        archiver.add(piece)
    outcome = archiver.finish(len(raw), hashlib.sha256(raw).hexdigest(),
                              cutter.header_findings + cutter.findings)
    assert outcome.valid, outcome.findings
    want = slow_stats(data)
    series = outcome.frame_stats
    assert series["min"] == want["min"] and series["max"] == want["max"]
    assert series["mean"] == pytest.approx(want["mean"], rel=1e-15, abs=0)
    assert series["std"] == pytest.approx(want["std"], rel=1e-12, abs=1e-300)
    stats = outcome.stats
    assert (stats.dmin, stats.dmax) == (want["dmin"], want["dmax"])
    assert stats.dmean == pytest.approx(want["dmean"], rel=1e-15)
    assert stats.rms == pytest.approx(want["rms"], rel=1e-12, abs=1e-300)
    fy, fx = outcome.frame_sum.fy, outcome.frame_sum.fx
    expected = sum(slow_block_sums(frame, fy, fx) for frame in data)
    assert np.array_equal(outcome.frame_sum.total, expected)
    if outcome.form == FORM_ARCHIVE:  # tiny or constant movies may keep the original
        assert outcome.restorable


def test_exact_moments_of_8bit_frames_match_python_integers():
    rng = np.random.default_rng(3)
    for frame in (rng.integers(-128, 128, size=(33, 47)).astype(np.int8),
                  rng.integers(0, 256, size=(1, 1)).astype(np.uint8),
                  np.full((5, 7), -128, np.int8)):
        acc = StatsAccumulator()
        measured = acc.add(frame)
        values = [int(v) for v in frame.reshape(-1)]
        n, s, q = len(values), sum(values), sum(v * v for v in values)
        assert measured.mean == s / n
        assert measured.std == pytest.approx(((q * n - s * s) / (n * n)) ** 0.5, rel=1e-15)
        assert (measured.dmin, measured.dmax) == (min(values), max(values))
