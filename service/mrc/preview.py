"""Frame -> 8-bit preview image: binning by block means and robust (percentile) contrast.

Pure numpy; the PNG encoding lives in the service (Pillow). Binning averages f x f
blocks (the remainder rows/columns past the last whole block are dropped), which keeps
shot-noise statistics honest where resampling filters would smear them. Contrast clips
at percentiles, so a few hot pixels do not flatten the whole image to black.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np


def bin_factors(ny: int, nx: int, max_side: int) -> tuple[int, int]:
    """Smallest integer factor that brings the longest side down to ``max_side``, per
    axis (capped by the axis length, so a thin strip keeps at least one row)."""
    factor = max(1, math.ceil(max(ny, nx) / max(1, max_side)))
    return min(factor, ny), min(factor, nx)


def real_values(frame: np.ndarray) -> np.ndarray:
    """What a preview shows: the magnitude of complex data, the values otherwise."""
    if frame.dtype.names:  # mode 3, complex int16 pairs
        real, imag = (frame[name].astype(np.float32) for name in frame.dtype.names)
        return np.hypot(real, imag)
    if frame.dtype.kind == "c":
        return np.abs(frame).astype(np.float32)
    return frame


def _accumulator(dtype: np.dtype, area: int) -> np.dtype:
    """The narrowest type that sums ``area`` values of ``dtype`` exactly (narrow sums
    run at memory speed; mixed-width adds are several times slower)."""
    if dtype.kind in "iu" and dtype.itemsize <= 2:
        bound = area * max(abs(int(np.iinfo(dtype).min)), int(np.iinfo(dtype).max))
        for candidate in ("u2", "i2") if dtype.kind == "u" else ("i2",):
            if bound <= np.iinfo(candidate).max:
                return np.dtype(candidate)
        return np.dtype("i4") if bound < 2**31 else np.dtype("i8")
    return np.dtype("f8")


@np.errstate(invalid="ignore", over="ignore")  # NaN/inf pixels stay NaN/inf, silently
def _block_sum_into(values: np.ndarray, fy: int, fx: int, rows: np.ndarray,
                    out: np.ndarray) -> np.ndarray:
    """Sums of ``fy`` x ``fx`` blocks of real ``values`` into ``out`` (``(h, w)``),
    with ``rows`` (``(h, w * fx)``) as scratch, both of the accumulator type.

    Rows first: each of the fy adds takes whole contiguous rows; the column step then
    works on an fy-times smaller array."""
    h, w = out.shape
    cropped = values[: h * fy, : w * fx]
    np.copyto(rows, cropped[0::fy], casting="unsafe")
    for i in range(1, fy):
        np.add(rows, cropped[i::fy], out=rows, casting="unsafe")
    np.copyto(out, rows[:, 0::fx])
    for j in range(1, fx):
        out += rows[:, j::fx]
    return out


@np.errstate(invalid="ignore", over="ignore")  # NaN/inf pixels stay NaN/inf, silently
def block_sum(frame: np.ndarray, fy: int, fx: int) -> np.ndarray:
    """Sums of ``fy`` x ``fx`` blocks, as float64 (exact for integer data)."""
    values = real_values(frame)
    h, w = values.shape[0] // fy, values.shape[1] // fx
    if fy == fx == 1:
        return values.astype(np.float64)
    accumulator = _accumulator(values.dtype, fy * fx)
    out = _block_sum_into(values, fy, fx, np.empty((h, w * fx), accumulator),
                          np.empty((h, w), accumulator))
    return out.astype(np.float64, copy=False)


def binned(frame: np.ndarray, max_side: int) -> np.ndarray:
    """Block means of ``frame`` with the longest side at most ``max_side``."""
    fy, fx = bin_factors(frame.shape[0], frame.shape[1], max_side)
    return block_sum(frame, fy, fx) / float(fy * fx)


#: the stored frame sum: magic, a little-endian uint32 length, JSON {"shape": [ny, nx]},
#: then one blosc chunk of little-endian float32 (zstd-1, bitshuffled)
SUM_MAGIC = b"MRCISUM1"


def encode_sum(total: np.ndarray) -> bytes:
    """The frame sum as stored beside the archive. float32 keeps a preview's sums
    (integer sums stay exact up to 2**24); blosc rather than zlib because this runs
    after the last byte of an upload, on the path to "ready", and zlib took ~0.5 s for
    a K3 movie's sum where blosc takes a few ms at a similar size."""
    from .codec import Codec, compress_frame

    with np.errstate(over="ignore"):  # sums past float32's range are stored as inf
        values = np.ascontiguousarray(total, dtype="<f4")
    head = json.dumps({"shape": list(values.shape)}).encode()
    return SUM_MAGIC + len(head).to_bytes(4, "little") + head + \
        compress_frame(values, Codec.ZSTD, 1)


def decode_sum(raw: bytes) -> np.ndarray:
    """A stored frame sum: :func:`encode_sum`'s form, or the ``.npz``/``.npy`` that
    datasets ingested before it keep."""
    from .codec import decompress_into

    if not raw.startswith(SUM_MAGIC):
        loaded = np.load(io.BytesIO(raw), allow_pickle=False)
        return loaded["sum"] if isinstance(loaded, np.lib.npyio.NpzFile) else loaded
    start = len(SUM_MAGIC) + 4
    end = start + int.from_bytes(raw[len(SUM_MAGIC):start], "little")
    shape = tuple(int(n) for n in json.loads(raw[start:end])["shape"])
    out = np.empty(shape, dtype="<f4")
    decompress_into(raw[end:], out)
    return out


class BinnedSum:
    """Running sum of frames at preview resolution: the "sum" image a dashboard shows
    (motion-uncorrected), kept small (``max_side``) so a 5 GB movie costs a few MB."""

    def __init__(self, ny: int, nx: int, max_side: int):
        self.fy, self.fx = bin_factors(ny, nx, max_side)
        self.total: np.ndarray | None = None
        self.frames = 0
        #: the accumulator-typed scratch of one frame's block sums, kept between frames
        #: (fresh ones cost a page fault per 4 KiB every frame)
        self._rows: np.ndarray | None = None
        self._blocks: np.ndarray | None = None
        self._pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @np.errstate(invalid="ignore", over="ignore")  # inf + -inf pixels make NaN, as they should
    def add(self, frame: np.ndarray, counts_max: int | None = None) -> None:
        """Add one frame. ``counts_max``: the caller knows every value lies in
        ``0..counts_max`` (ingest has the frame's minimum and maximum from its
        statistics); 8-bit counts then take a faster exact path
        (:meth:`_add_small_counts`)."""
        values = real_values(frame)
        fy, fx = self.fy, self.fx
        h, w = values.shape[0] // fy, values.shape[1] // fx
        if self.total is None:
            self.total = np.zeros((h, w), dtype=np.float64)
        if counts_max is not None and self._add_small_counts(values, counts_max, h, w):
            pass
        elif fy == fx == 1:
            np.add(self.total, values, out=self.total, casting="unsafe")
        else:
            accumulator = _accumulator(values.dtype, fy * fx)
            if self._blocks is None or self._blocks.dtype != accumulator:
                self._rows = np.empty((h, w * fx), accumulator)
                self._blocks = np.empty((h, w), accumulator)
            np.add(self.total, _block_sum_into(values, fy, fx, self._rows, self._blocks),
                   out=self.total, casting="unsafe")
        self.frames += 1

    def drop_scratch(self) -> None:
        """Let the per-frame scratch arrays go (no more frames will come)."""
        self._rows = self._blocks = None
        self._pairs = None

    def _add_small_counts(self, values: np.ndarray, vmax: int, h: int, w: int) -> bool:
        """Block sums of 8-bit counts in ``0..vmax`` (4-bit counting data) two
        pixels at a time: the frame viewed as little-endian uint16 holds the pixel at
        even x in its low byte and the next in its high byte, so ``fy`` rows add as
        uint16 without a carry from one byte into the other while ``fy * vmax`` fits a
        byte. Half the elements and no widening casts: about twice as fast as the
        general path (bench/bench_cpu.py). False (nothing done) when it does not apply."""
        fy, fx = self.fy, self.fx
        if values.dtype.kind not in "iu" or values.dtype.itemsize != 1 or fx % 2 or \
                values.shape[1] % 2 or not values.flags.c_contiguous or \
                not 0 <= vmax <= 255 // fy or fy * fx == 1 or fx > 256:
            return False
        half = fx // 2
        pairs = values.view("<u2")                      # (ny, nx / 2)
        if self._pairs is None:
            self._pairs = (np.empty((h, w * half), "<u2"), np.empty((h, w * half), "<u2"),
                           np.empty((h, w), "<u2"))
        rows, high, blocks = self._pairs
        cropped = pairs[:h * fy, :w * half]
        np.copyto(rows, cropped[0::fy])
        for i in range(1, fy):
            np.add(rows, cropped[i::fy], out=rows)      # each byte <= fy * vmax <= 255
        np.right_shift(rows, 8, out=high)
        np.bitwise_and(rows, 0xFF, out=rows)
        rows += high                                    # the sums of pixel pairs
        np.copyto(blocks, rows[:, 0::half])
        for j in range(1, half):
            blocks += rows[:, j::half]
        np.add(self.total, blocks, out=self.total, casting="unsafe")
        return True


def contrast_u8(image: np.ndarray, low_percent: float = 0.5,
                high_percent: float = 99.5) -> np.ndarray:
    """Map ``image`` to 0-255 with the given percentiles as black and white. Non-finite
    pixels (NaN, inf) are shown black; a flat image is mid-grey."""
    values = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    sample = values[finite] if not finite.all() else values
    lo, hi = np.percentile(sample, [low_percent, high_percent])
    if not hi > lo:
        lo, hi = sample.min(), sample.max()
    if not hi > lo:
        return np.where(finite, 128, 0).astype(np.uint8)
    scaled = (np.where(finite, values, lo) - lo) * (255.0 / (hi - lo))
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)
