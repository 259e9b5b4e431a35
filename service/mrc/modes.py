"""The one MRC mode table, 4-bit packing, and the rules for lossless mode changes.

Sources: MRC2014 (Cheng et al. 2015, header word 4 "MODE"), IMOD ``mrc_format.txt``
(modes 6, 12 and 101, 4-bit packing), and ``mrcz`` (non-standard modes 7 and 8).
Everything else in the package derives from :data:`MODE_TABLE`; nothing re-types it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: numpy has no complex-int16 type; mode 3 pixels are (real, imag) int16 pairs.
COMPLEX_INT16 = np.dtype([("real", "i2"), ("imag", "i2")])


@dataclass(frozen=True)
class ModeSpec:
    """One row of the mode table.

    ``dtype`` is the in-memory dtype of a decoded pixel (byte order left to the file).
    ``bits`` is the stored size of one pixel on disk.
    """

    code: int
    name: str
    dtype: np.dtype
    bits: int
    mrc2014: bool
    note: str

    @property
    def is_complex(self) -> bool:
        return self.code in (3, 4)

    @property
    def is_packed(self) -> bool:
        return self.bits == 4


MODE_TABLE: tuple[ModeSpec, ...] = (
    ModeSpec(0, "int8", np.dtype("i1"), 8, True,
             "8-bit signed per MRC2014; IMOD without the signed flag reads it unsigned"),
    ModeSpec(1, "int16", np.dtype("i2"), 16, True, "16-bit signed integer"),
    ModeSpec(2, "float32", np.dtype("f4"), 32, True, "32-bit IEEE float"),
    ModeSpec(3, "complex_int16", COMPLEX_INT16, 32, True, "complex, two 16-bit signed integers"),
    ModeSpec(4, "complex64", np.dtype("c8"), 64, True, "complex, two 32-bit floats"),
    ModeSpec(6, "uint16", np.dtype("u2"), 16, True, "16-bit unsigned integer"),
    ModeSpec(7, "int32", np.dtype("i4"), 32, False, "32-bit signed integer (mrcz, non-standard)"),
    ModeSpec(8, "uint32", np.dtype("u4"), 32, False, "32-bit unsigned integer (mrcz, non-standard)"),
    ModeSpec(12, "float16", np.dtype("f2"), 16, True, "16-bit IEEE half float (IMOD >= 4.10)"),
    ModeSpec(101, "uint4", np.dtype("u1"), 4, False,
             "4-bit unsigned counts, two per byte, low nibble first (SerialEM/EPU)"),
)

MODES: dict[int, ModeSpec] = {spec.code: spec for spec in MODE_TABLE}
#: numpy dtype -> mode, for dtypes that name exactly one mode (uint8 is 101's decoded
#: form but also IMOD's unsigned mode 0, so it is deliberately absent).
MODE_BY_DTYPE: dict[np.dtype, int] = {
    spec.dtype: spec.code for spec in MODE_TABLE if not spec.is_packed
}

#: Value range of one 4-bit pixel.
UINT4_MAX = 15


def mode_spec(code: int) -> ModeSpec:
    """The table row for ``code``; ``KeyError`` names the known modes."""
    try:
        return MODES[code]
    except KeyError:
        raise KeyError(f"unknown MRC mode {code}; known modes: {sorted(MODES)}") from None


def row_nbytes(mode: int, nx: int) -> int:
    """Stored bytes of one image row. Mode 101 rows are ``(nx + 1) // 2`` bytes:
    IMOD pads an odd row with one spare nibble."""
    spec = mode_spec(mode)
    if spec.is_packed:
        return (nx + 1) // 2
    return nx * spec.bits // 8


def frame_nbytes(mode: int, nx: int, ny: int) -> int:
    """Stored bytes of one section (frame)."""
    return row_nbytes(mode, nx) * ny


# --- 4-bit packing (IMOD mrc_format.txt: "the first pixel ... is in the lower 4 bits";
#     the same in both byte orders) -------------------------------------------------


#: Rows per block of the 4-bit loops: a block's uint16 temporaries stay in L2 cache, so
#: the four passes over a block cost about one pass over main memory.
_BLOCK_ROWS = 64


def unpack_4bit(packed: np.ndarray, nx: int, out: np.ndarray | None = None) -> np.ndarray:
    """Unpack ``(ny, (nx+1)//2)`` bytes into a ``(ny, nx)`` uint8 frame of counts 0-15
    (into ``out``, a flat uint8 buffer of ``ny * 2 * row_bytes``, if given; for odd
    ``nx`` the result is then a copy, not ``out``).

    Each byte is widened into a little-endian uint16 whose low byte is the low nibble
    (the lower x) and whose high byte is the high nibble, so the output is written
    contiguously, a block of rows at a time: about twice as fast as strided even/odd
    column writes, and three times a 256-entry lookup gather (bench/bench_core.py).
    """
    ny, row_bytes = packed.shape
    if row_bytes != (nx + 1) // 2:
        raise ValueError(f"a 4-bit row of {nx} pixels is {(nx + 1) // 2} bytes, got {row_bytes}")
    out = np.empty((ny, 2 * row_bytes), dtype=np.uint8) if out is None \
        else out.reshape(ny, 2 * row_bytes)
    pairs = out.view("<u2")
    high = np.empty((min(_BLOCK_ROWS, ny), row_bytes), dtype=np.uint16)
    for y in range(0, ny, _BLOCK_ROWS):
        block = pairs[y:y + _BLOCK_ROWS]
        shifted = high[:block.shape[0]]
        block[...] = packed[y:y + _BLOCK_ROWS]
        np.left_shift(block, 4, out=shifted)
        shifted &= 0x0F00
        block &= 0x000F
        block |= shifted
    if nx % 2:
        return np.ascontiguousarray(out[:, :nx])
    return out


def decode_stored(raw: np.ndarray, ny: int, nx: int, stored_dtype: np.dtype, packed: bool,
                  out: np.ndarray | None = None) -> np.ndarray:
    """The ``(ny, nx)`` pixel values of one frame's stored bytes (a flat uint8 array):
    4-bit counts unpacked (into ``out`` if given, see :func:`unpack_4bit`), other modes
    viewed as ``stored_dtype`` and put in native byte order."""
    if packed:
        return unpack_4bit(raw.reshape(ny, (nx + 1) // 2), nx, out)
    frame = raw.view(stored_dtype).reshape(ny, nx)
    if stored_dtype.itemsize > 1 and not stored_dtype.isnative:
        frame = frame.astype(stored_dtype.newbyteorder("="))
    return frame


def pack_4bit(values: np.ndarray, padding: np.ndarray | None = None,
              out: np.ndarray | None = None) -> np.ndarray:
    """Pack a ``(ny, nx)`` frame of integers 0-15 into ``(ny, (nx+1)//2)`` bytes (into
    ``out``, a flat uint8 buffer of that size, if given).

    An odd row ends with a spare high nibble: ``padding`` (one value per row) or zero.
    Values outside 0-15 are a caller error (the conversion layer checks losslessness
    before packing). Pairs of pixels go through a little-endian uint16 view, a block of
    rows at a time (the inverse of :func:`unpack_4bit`).
    """
    ny, nx = values.shape
    v = values.view(np.uint8) if values.dtype.itemsize == 1 else values.astype(np.uint8)
    even = nx - nx % 2
    out = np.empty((ny, (nx + 1) // 2), dtype=np.uint8) if out is None \
        else out.reshape(ny, (nx + 1) // 2)
    if even:
        pairs = np.ascontiguousarray(v[:, :even]).view("<u2") if nx % 2 or \
            not v.flags.c_contiguous else v.view("<u2")
        packed = np.empty((min(_BLOCK_ROWS, ny), even // 2), dtype=np.uint16)
        for y in range(0, ny, _BLOCK_ROWS):
            block = pairs[y:y + _BLOCK_ROWS]
            word = packed[:block.shape[0]]
            np.right_shift(block, 4, out=word)
            word &= 0xF0
            word |= block
            out[y:y + _BLOCK_ROWS, :even // 2] = word  # keeps the low byte: both nibbles
    if nx % 2:
        high = 0 if padding is None else (np.asarray(padding, dtype=np.uint8) << 4)
        out[:, -1] = (v[:, -1] & 0x0F) | high
    return out


# --- casting between modes -------------------------------------------------------


def _component_dtype(dtype: np.dtype) -> np.dtype:
    """The real dtype of one component of a complex pixel (or the dtype itself)."""
    if dtype == COMPLEX_INT16:
        return np.dtype("i2")
    if dtype.kind == "c":
        return np.dtype(f"f{dtype.itemsize // 2}")
    return dtype


def always_lossless(source_mode: int, source_dtype: np.dtype, target_mode: int) -> bool:
    """True when every value the source can hold is exactly representable in the target.

    ``source_dtype`` is the decoded dtype, which for mode 0 says how the bytes were
    interpreted (int8 or uint8). 4-bit sources hold 0-15, which every mode but 101
    itself holds exactly, so 101 -> 0/1/2/6 never needs a data check.
    """
    target = mode_spec(target_mode)
    source_dtype = np.dtype(source_dtype).newbyteorder("=")
    if source_mode == target_mode and source_dtype == target.dtype:
        return True
    if mode_spec(source_mode).is_packed:
        return not target.is_packed
    if target.is_packed:
        return False
    source_complex = source_dtype.kind == "c" or source_dtype == COMPLEX_INT16
    if source_complex and not target.is_complex:
        return False
    return bool(np.can_cast(_component_dtype(source_dtype), _component_dtype(target.dtype), "safe"))


def lossless_targets(source_mode: int, source_dtype: np.dtype) -> list[int]:
    """Modes that hold every possible source value exactly, in table order."""
    return [spec.code for spec in MODE_TABLE if always_lossless(source_mode, source_dtype, spec.code)]


def cast_to(frame: np.ndarray, target: np.dtype) -> np.ndarray:
    """Cast a decoded frame to ``target`` (native byte order), without any loss check.

    Complex int16 (mode 3) goes through complex64, which holds every int16 pair exactly.
    """
    target = np.dtype(target)
    if frame.dtype == COMPLEX_INT16:
        if target == COMPLEX_INT16:
            return frame
        frame = (frame["real"] + 1j * frame["imag"].astype(np.float32)).astype(np.complex64)
    if target == COMPLEX_INT16:
        out = np.empty(frame.shape, dtype=COMPLEX_INT16)
        with np.errstate(invalid="ignore", over="ignore"):
            out["real"] = np.real(frame).astype(np.int16)
            out["imag"] = np.imag(frame).astype(np.int16)
        return out
    if frame.dtype.kind == "c" and target.kind != "c":
        raise TypeError("complex data has no real target")
    with np.errstate(invalid="ignore", over="ignore"):
        return frame.astype(target, copy=False)


def cast_frame(frame: np.ndarray, target_mode: int) -> np.ndarray:
    """Cast a decoded frame to the target mode's dtype, without any loss check."""
    return cast_to(frame, mode_spec(target_mode).dtype)


def differences(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Boolean mask of pixels where ``a`` and ``b`` differ; NaN equals NaN, so a float
    round trip that keeps NaN passes. Complex int16 compares through complex64."""
    if a.dtype == COMPLEX_INT16 or b.dtype == COMPLEX_INT16:
        a, b = cast_frame(a, 4), cast_frame(b, 4)
    unequal = a != b
    if a.dtype.kind in "fc" and b.dtype.kind in "fc":
        unequal &= ~(np.isnan(a) & np.isnan(b))
    return unequal
