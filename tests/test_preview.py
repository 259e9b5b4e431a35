"""Preview core: block sums against numpy's obvious reshape-mean, contrast edge cases."""

import io

import numpy as np
import pytest

from service.mrc import MODES
from service.mrc.preview import BinnedSum, bin_factors, binned, block_sum, contrast_u8
from tests.reference import synthetic


@pytest.mark.parametrize("mode", [0, 1, 2, 4, 6, 12, 101, 3])
@pytest.mark.parametrize("shape, fy, fx", [((37, 50), 3, 3), ((16, 16), 1, 1), ((9, 40), 4, 4),
                                           ((5, 300), 5, 60)])
def test_block_sum_matches_reshape_sum(mode, shape, fy, fx):
    frame = synthetic(mode, (1,) + shape)[0]
    if mode == 3:
        values = np.hypot(frame[..., 0].astype(np.float64), frame[..., 1].astype(np.float64))
        frame = np.ascontiguousarray(frame, dtype=np.int16).view(MODES[3].dtype)[..., 0]
    elif mode == 4:
        values = np.abs(frame).astype(np.float64)
    else:
        values = frame.astype(np.float64)
    h, w = shape[0] // fy, shape[1] // fx
    expected = values[:h * fy, :w * fx].reshape(h, fy, w, fx).sum(axis=(1, 3))
    np.testing.assert_allclose(block_sum(frame, fy, fx), expected, rtol=1e-6)


def test_bin_factors_keep_thin_strips():
    assert bin_factors(4096, 4096, 512) == (8, 8)
    assert bin_factors(2, 4096, 512) == (2, 8)
    assert binned(np.ones((2, 4096)), 512).shape == (1, 512)
    assert bin_factors(100, 50, 4096) == (1, 1)


def test_binned_sum_is_the_sum():
    frames = synthetic(1, (5, 30, 45))
    acc = BinnedSum(30, 45, 15)
    for f in frames:
        acc.add(f)
    assert (acc.fy, acc.fx) == (3, 3) and acc.frames == 5
    total = frames.astype(np.float64).sum(axis=0).reshape(10, 3, 15, 3).sum(axis=(1, 3))
    assert np.array_equal(acc.total, total)


def test_contrast_edge_cases():
    assert (contrast_u8(np.full((4, 4), 7.0)) == 128).all()
    ramp = np.arange(256, dtype=np.float64).reshape(16, 16)
    assert np.array_equal(contrast_u8(ramp, 0, 100), np.arange(256).reshape(16, 16))
    spiky = ramp.copy()
    spiky[0, 0] = 1e9  # one hot pixel must not flatten the image
    assert abs(np.median(contrast_u8(spiky, 1, 99)) - 128) < 5
    assert np.median(contrast_u8(spiky, 0, 100)) == 0  # what clipping prevents
    with_nan = ramp.copy()
    with_nan[1, 1] = np.nan
    out = contrast_u8(with_nan, 0, 100)
    assert out[1, 1] == 0 and out[15, 15] == 255
    assert (contrast_u8(np.full((3, 3), np.nan)) == 0).all()


def test_stored_sum_round_trips_and_legacy_forms_still_read():
    from service.mrc.preview import decode_sum, encode_sum

    rng = np.random.default_rng(3)
    total = rng.poisson(40.0, size=(37, 53)).astype(np.float64)
    total[0, 0], total[1, 1] = np.nan, -np.inf
    raw = encode_sum(total)
    back = decode_sum(raw)
    assert back.shape == total.shape and back.dtype == np.float32
    np.testing.assert_array_equal(back, total.astype(np.float32))
    assert len(raw) < total.astype(np.float32).nbytes  # counts compress
    for legacy in ("npz", "npy"):  # what datasets ingested before keep
        buffer = io.BytesIO()
        if legacy == "npz":
            np.savez_compressed(buffer, sum=total)
        else:
            np.save(buffer, total)
        np.testing.assert_array_equal(decode_sum(buffer.getvalue()), total)
