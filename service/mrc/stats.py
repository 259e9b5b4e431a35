"""Exact header statistics (DMIN, DMAX, DMEAN, RMS; MRC2014 words 20-22 and 55), and the
same four numbers for every frame, accumulated one frame at a time so a movie is never
held whole.

Integers of up to 16 bits are summed exactly in Python integers (the mean and variance
are then correctly rounded); wider integers and floats use float64 block moments merged
with Chan et al.'s pairwise update, which stays accurate when the mean dwarfs the spread.
Complex data follow mrcfile's convention: only RMS is defined, the others are left as
"undetermined" (DMIN > DMAX, DMEAN < both).

Speed matters here: ingest takes these statistics of every frame while the upload
streams, so the exact integer path works through the frame in cache-sized chunks (see
:func:`exact_int_moments`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .modes import COMPLEX_INT16

#: Elements per block: bounds the float64 temporaries to 8 MiB.
_BLOCK = 1 << 20

UNDETERMINED = (0.0, -1.0, -2.0, -1.0)

@dataclass(frozen=True)
class Stats:
    dmin: float
    dmax: float
    dmean: float
    rms: float
    count: int

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.dmin, self.dmax, self.dmean, self.rms)

    def to_dict(self) -> dict[str, float | None]:
        """As JSON holds them: None where a value is not finite (data holding NaN or
        infinities; JSON has no such numbers, and PostgreSQL refuses them)."""
        return {name: _finite_or_none(value) for name, value in
                zip(("dmin", "dmax", "dmean", "rms"), self.as_tuple())}


@dataclass(frozen=True)
class FrameStats:
    """One frame: minimum, maximum, mean and (population) standard deviation. For complex
    data only ``std`` is defined (the RMS deviation of the complex values)."""

    dmin: float | None
    dmax: float | None
    mean: float | None
    std: float


#: Elements per chunk of the exact integer path: its uint32/uint64 buffer stays in L2,
#: which makes the four passes over it cost about one pass over main memory.
_CHUNK = 1 << 17
_LOW_32 = np.uint64(0xFFFFFFFF)
_SHIFT_32 = np.uint64(32)


def _two_lanes(word: np.uint64) -> int:
    """The sum of the two 32-bit lanes of a uint64."""
    return int(word & _LOW_32) + int(word >> _SHIFT_32)


def exact_int_moments(flat: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
    """(sum, sum of squares) of a 1-D array of integers of at most 16 bits whose values
    lie in ``lo..hi``, exact.

    Values are shifted to ``0..hi-lo`` into a small buffer; when the span is under 256
    the buffer is uint32 and each sum of its uint64 view adds two lanes at once (a lane
    cannot overflow: 2**16 squares of at most 255**2 stay under 2**32)."""
    span = hi - lo
    narrow = span <= 255
    buffer = np.empty(_CHUNK, dtype=np.uint32 if narrow else np.uint64)
    s = q = 0
    for start in range(0, flat.size, _CHUNK):
        block = flat[start:start + _CHUNK]
        x = buffer[:block.size]
        if lo == 0:
            np.copyto(x, block, casting="unsafe")
        else:
            np.subtract(block, lo, out=x, dtype=np.int32, casting="unsafe")
        if narrow:
            odd = x.size % 2
            if odd:
                last = int(x[-1])
                s, q = s + last, q + last * last
                x = x[:-1]
            words = x.view(np.uint64)
            s += _two_lanes(words.sum())
            np.multiply(x, x, out=x)
            q += _two_lanes(words.sum())
        else:
            s += int(x.sum())
            np.multiply(x, x, out=x)
            q += int(x.sum())
    n = flat.size
    return s + n * lo, q + 2 * lo * s + n * lo * lo


#: Bytes per block of the narrow byte path: 128 rows of 1,024 uint64 words.
_NARROW_BLOCK = 1 << 20
#: Widest span of bytes the narrow path takes: a square then fits in a byte (15**2).
NARROW_SPAN = 15
_BYTE_LANES = np.uint64(0x00FF00FF00FF00FF)
_HALF_LANES = np.uint64(0x0000FFFF0000FFFF)
_EIGHT, _SIXTEEN = np.uint64(8), np.uint64(16)


def _sum_16bit_lanes(words: np.ndarray) -> int:
    """The sum of every 16-bit lane of uint64 ``words`` (their sums per 32-bit lane must
    stay under 2**32: the callers' lanes hold at most 57,600 over 1,024 words)."""
    pairs = (words & _HALF_LANES) + ((words >> _SIXTEEN) & _HALF_LANES)
    return _two_lanes(pairs.sum())


class NarrowBytes:
    """Exact (sum, sum of squares) of one-byte integers spanning at most
    :data:`NARROW_SPAN` -- 4-bit counts, the bulk of what ingest measures -- in about
    three quarters of :func:`exact_int_moments`' CPU (bench_cpu.py kernels).

    After the minimum is subtracted every byte is 0-15 and its square 0-225, so both
    are summed as lanes of uint64 words, never widened: sixteen words add without a
    byte lane carrying (16 * 15 = 240), squares after splitting into 16-bit lanes
    (128 * 2 * 225 = 57,600). The buffers (2.5 MiB) live as long as the object."""

    def __init__(self) -> None:
        self._shifted = np.empty(_NARROW_BLOCK, np.uint8)
        self._squares = np.empty(_NARROW_BLOCK, np.uint8)
        self._even = np.empty(_NARROW_BLOCK // 8, np.uint64)
        self._odd = np.empty(_NARROW_BLOCK // 8, np.uint64)

    def moments(self, flat: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
        """(sum, sum of squares) of the 1-D one-byte integer array ``flat`` whose
        values lie in ``lo..hi`` (``hi - lo <= NARROW_SPAN``), exact."""
        if flat.dtype.itemsize != 1 or hi - lo > NARROW_SPAN:
            raise ValueError("NarrowBytes takes one-byte integers spanning at most 15")
        whole = flat.size - flat.size % _NARROW_BLOCK
        # (v - lo) of int8 or uint8 values is the same byte in modular uint8 arithmetic
        raw, offset = flat[:whole].view(np.uint8), np.uint8(lo & 0xFF)
        s = q = 0
        for start in range(0, whole, _NARROW_BLOCK):
            block = raw[start:start + _NARROW_BLOCK]
            if lo:
                block = np.subtract(block, offset, out=self._shifted)
            per_byte = block.view(np.uint64).reshape(16, -1).sum(axis=0)  # lanes <= 240
            lanes = (per_byte & _BYTE_LANES) + ((per_byte >> _EIGHT) & _BYTE_LANES)
            s += _sum_16bit_lanes(lanes.reshape(8, -1).sum(axis=0))      # lanes <= 3,840
            words = np.multiply(block, block, out=self._squares).view(np.uint64)
            even = np.bitwise_and(words, _BYTE_LANES, out=self._even)
            odd = np.right_shift(words, _EIGHT, out=self._odd)
            np.bitwise_and(odd, _BYTE_LANES, out=odd)
            np.add(even, odd, out=even)                                  # lanes <= 450
            q += _sum_16bit_lanes(even.reshape(128, -1).sum(axis=0))     # lanes <= 57,600
        # back from v - lo to v, then the rest of the array the plain way
        s, q = s + whole * lo, q + 2 * lo * s + whole * lo * lo
        if whole < flat.size:
            rest_s, rest_q = exact_int_moments(flat[whole:], lo, hi)
            s, q = s + rest_s, q + rest_q
        return s, q

    def moments_and_range(self, flat: np.ndarray) -> tuple[int, int, int, int]:
        """(sum, sum of squares, minimum, maximum) of the 1-D one-byte integer array
        ``flat``, exact, in one sweep of blocks: each block's own minimum and maximum
        first, which also brings it into the cache for its sums (a K3 frame of 4-bit
        counts through :meth:`StatsAccumulator.add`: 10.3 -> 6.1 ms against the
        frame's minimum and maximum, then its sums). A block spanning at most
        :data:`NARROW_SPAN` takes the lane sums, any other :func:`exact_int_moments`,
        so no frame is too wide for this."""
        if flat.dtype.itemsize != 1 or flat.dtype.kind not in "iu" or flat.size == 0:
            raise ValueError("moments_and_range takes a non-empty array of one-byte integers")
        s = q = 0
        lo, hi = 255, -128
        for start in range(0, flat.size, _NARROW_BLOCK):
            block = flat[start:start + _NARROW_BLOCK]
            b_lo, b_hi = int(block.min()), int(block.max())
            if b_hi - b_lo <= NARROW_SPAN and block.size == _NARROW_BLOCK:
                b_s, b_q = self.moments(block, b_lo, b_hi)
            else:
                b_s, b_q = exact_int_moments(block, b_lo, b_hi)
            s, q = s + b_s, q + b_q
            lo, hi = min(lo, b_lo), max(hi, b_hi)
        return s, q, lo, hi


class _Moments:
    """Count, mean and sum of squared deviations, mergeable (Chan et al. 1979)."""

    __slots__ = ("n", "mean", "m2")

    def __init__(self, n: int = 0, mean: float = 0.0, m2: float = 0.0) -> None:
        self.n, self.mean, self.m2 = n, mean, m2

    @np.errstate(invalid="ignore", over="ignore")  # NaN/inf data give NaN/inf stats
    def add_block(self, block: np.ndarray) -> None:
        x = block.astype(np.float64)
        mean_b = float(x.mean())
        x -= mean_b
        self.merge(_Moments(x.size, mean_b, float(np.dot(x, x))))

    def merge(self, other: "_Moments") -> None:
        if other.n == 0:
            return
        n = self.n + other.n
        delta = other.mean - self.mean
        self.mean += delta * other.n / n
        self.m2 += other.m2 + delta * delta * self.n * other.n / n
        self.n = n

    @property
    def variance(self) -> float:
        return self.m2 / self.n if self.n else 0.0


def _blocks(flat: np.ndarray):
    for start in range(0, flat.size, _BLOCK):
        yield flat[start:start + _BLOCK]


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class StatsAccumulator:
    """Feed frames with :meth:`add` (which returns that frame's :class:`FrameStats`);
    read the whole movie's :meth:`result` at the end."""

    def __init__(self) -> None:
        self.count = 0
        self._min: float | None = None
        self._max: float | None = None
        self._int_sum = 0
        self._int_sumsq = 0
        self._exact_ints: bool | None = None
        self._real = _Moments()
        self._imag = _Moments()
        self._complex = False
        self._narrow: NarrowBytes | None = None

    def add(self, frame: np.ndarray) -> FrameStats:
        if frame.size == 0:
            return FrameStats(None, None, None, 0.0)
        if frame.dtype == COMPLEX_INT16 or frame.dtype.kind == "c":
            return self._add_complex(frame)
        flat = np.ascontiguousarray(frame).reshape(-1)
        exact = flat.dtype.kind in "iu" and flat.dtype.itemsize <= 2
        if self._exact_ints is None:
            self._exact_ints = exact
        elif self._exact_ints != exact:
            raise TypeError("all frames of one accumulator must share a dtype")
        if exact and flat.itemsize == 1 and flat.size >= _NARROW_BLOCK:
            # one-byte counts (4-bit movies): range and sums in one sweep of blocks
            if self._narrow is None:
                self._narrow = NarrowBytes()
            s, q, lo, hi = self._narrow.moments_and_range(flat)
        else:
            lo, hi = flat.min(), flat.max()
            if exact:
                s, q = exact_int_moments(flat, int(lo), int(hi))
        f_lo, f_hi = float(lo), float(hi)
        if math.isnan(f_lo) or math.isnan(f_hi):  # NaN anywhere makes both NaN, for good
            f_lo = f_hi = float("nan")
        # min()/max() keep their first argument against a NaN: a NaN frame replaces it
        self._min = f_lo if self._min is None or math.isnan(f_lo) else min(self._min, f_lo)
        self._max = f_hi if self._max is None or math.isnan(f_hi) else max(self._max, f_hi)
        n = flat.size
        self.count += n
        if exact:
            self._int_sum += s
            self._int_sumsq += q
            mean, std = s / n, math.sqrt((q * n - s * s) / (n * n))
        else:
            moments = _Moments()
            for block in _blocks(flat):
                moments.add_block(block)
            self._real.merge(moments)
            mean, std = moments.mean, math.sqrt(moments.variance)
        return FrameStats(_finite_or_none(f_lo), _finite_or_none(f_hi),
                          _finite_or_none(mean), std)

    def _add_complex(self, frame: np.ndarray) -> FrameStats:
        self._complex = True
        if frame.dtype == COMPLEX_INT16:
            real, imag = frame["real"].reshape(-1), frame["imag"].reshape(-1)
        else:
            real, imag = frame.real.reshape(-1), frame.imag.reshape(-1)
        self.count += real.size
        frame_parts = []
        for part, total in ((real, self._real), (imag, self._imag)):
            moments = _Moments()
            for block in _blocks(part):
                moments.add_block(block)
            total.merge(moments)
            frame_parts.append(moments.variance)
        return FrameStats(None, None, None, math.sqrt(sum(frame_parts)))

    def result(self) -> Stats:
        if self.count == 0:
            return Stats(*UNDETERMINED, count=0)
        if self._complex:
            rms = math.sqrt(self._real.variance + self._imag.variance)
            return Stats(0.0, -1.0, -2.0, rms, self.count)
        if self._exact_ints:
            n, s, q = self.count, self._int_sum, self._int_sumsq
            mean = s / n
            variance = (q * n - s * s) / (n * n)  # exact integer numerator
            rms = math.sqrt(variance)
        else:
            mean, rms = self._real.mean, math.sqrt(self._real.variance)
        assert self._min is not None and self._max is not None
        return Stats(self._min, self._max, mean, rms, self.count)


def frame_series(frames: list[FrameStats]) -> dict[str, list[float | None]]:
    """Per-frame statistics as parallel lists (what the catalog keeps and the API
    returns): ``mean``, ``std``, ``min``, ``max``; None where a value is undefined or not
    finite."""
    return {"mean": [f.mean for f in frames], "std": [_finite_or_none(f.std) for f in frames],
            "min": [f.dmin for f in frames], "max": [f.dmax for f in frames]}
