"""Independent test references: a raw MRC writer that packs the header with ``struct`` at
offsets typed from the MRC2014/IMOD documents (not from ``service.mrc.header``), slow
per-pixel 4-bit pack/unpack loops, and synthetic data for every mode.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

IMOD_STAMP = 1146047817

#: Mode -> numpy dtype of one pixel, from the MRC2014 / IMOD tables.
MODE_DTYPES = {0: "i1", 1: "i2", 2: "f4", 4: "c8", 6: "u2", 7: "i4", 8: "u4", 12: "f2"}


def slow_pack_4bit(values: np.ndarray) -> bytes:
    """Pixel by pixel: the lower-x pixel goes in the low nibble; odd rows padded."""
    ny, nx = values.shape
    out = bytearray()
    for y in range(ny):
        for x in range(0, nx, 2):
            low = int(values[y, x])
            high = int(values[y, x + 1]) if x + 1 < nx else 0
            out.append(low | (high << 4))
    return bytes(out)


def slow_unpack_4bit(raw: bytes, nx: int, ny: int) -> np.ndarray:
    out = np.zeros((ny, nx), dtype=np.uint8)
    row_bytes = (nx + 1) // 2
    for y in range(ny):
        for x in range(nx):
            byte = raw[y * row_bytes + x // 2]
            out[y, x] = (byte & 0x0F) if x % 2 == 0 else (byte >> 4)
    return out


def raw_header(*, nx: int, ny: int, nz: int, mode: int, order: str = "<", nsymbt: int = 0,
               exttyp: bytes = b"", cella=(0.0, 0.0, 0.0), mxyz=None, origin=(0.0, 0.0, 0.0),
               stats=(0.0, -1.0, -2.0, -1.0), nversion: int = 20141, machst: bytes | None = None,
               map_id: bytes = b"MAP ", imod_flags: int | None = None, nint: int = 0,
               nreal: int = 0, labels=(), mapcrs=(1, 2, 3), ispg: int = 0) -> bytes:
    """1024 header bytes built field by field at the documented offsets."""
    h = bytearray(1024)
    i4, f4, i2 = order + "i", order + "f", order + "h"
    mx, my, mz = mxyz if mxyz is not None else (nx, ny, 1)
    struct.pack_into(order + "4i", h, 0, nx, ny, nz, mode)
    struct.pack_into(order + "3i", h, 28, mx, my, mz)
    struct.pack_into(order + "3f", h, 40, *cella)
    struct.pack_into(order + "3f", h, 52, 90.0, 90.0, 90.0)
    struct.pack_into(order + "3i", h, 64, *mapcrs)
    struct.pack_into(order + "3f", h, 76, *stats[:3])
    struct.pack_into(i4, h, 88, ispg)
    struct.pack_into(i4, h, 92, nsymbt)
    h[104:108] = exttyp.ljust(4, b"\x00")[:4] if exttyp else b"\x00" * 4
    struct.pack_into(i4, h, 108, nversion)
    struct.pack_into(i2, h, 128, nint)
    struct.pack_into(i2, h, 130, nreal)
    if imod_flags is not None:
        struct.pack_into(i4, h, 152, IMOD_STAMP)
        struct.pack_into(i4, h, 156, imod_flags)
    struct.pack_into(order + "3f", h, 196, *origin)
    h[208:212] = map_id
    if machst is None:
        machst = b"\x44\x44\x00\x00" if order == "<" else b"\x11\x11\x00\x00"
    h[212:216] = machst
    struct.pack_into(f4, h, 216, stats[3])
    struct.pack_into(i4, h, 220, len(labels))
    for i, text in enumerate(labels):
        h[224 + 80 * i: 224 + 80 * (i + 1)] = text.encode().ljust(80)
    return bytes(h)


def write_raw_mrc(path: Path, data: np.ndarray, mode: int, order: str = "<",
                  extended: bytes = b"", **header) -> Path:
    """Write (nz, ny, nx) ``data`` as mode ``mode``; mode 101 packs with the slow packer,
    mode 3 takes an (nz, ny, nx, 2) int16 array."""
    if mode == 3:
        nz, ny, nx, _ = data.shape
        body = data.astype(order + "i2").tobytes()
    elif mode == 101:
        nz, ny, nx = data.shape
        body = b"".join(slow_pack_4bit(frame) for frame in data)
    else:
        nz, ny, nx = data.shape
        body = data.astype(np.dtype(MODE_DTYPES[mode]).newbyteorder(order)).tobytes()
    path.write_bytes(raw_header(nx=nx, ny=ny, nz=nz, mode=mode, order=order,
                                nsymbt=len(extended), **header) + extended + body)
    return path


def synthetic(mode: int, shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Data that uses each mode's range: negatives, large values, fractions, NaN-free."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    if mode == 101:
        return rng.integers(0, 16, size=shape, dtype=np.uint8)
    if mode == 3:
        return rng.integers(-30000, 30000, size=shape + (2,), dtype=np.int16)
    dtype = np.dtype(MODE_DTYPES[mode])
    if dtype.kind == "c":
        return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(dtype)
    if dtype.kind == "f":
        return (rng.normal(100.0, 30.0, size=shape)).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def counting_movie(shape: tuple[int, int, int], lam: float = 1.0, seed: int = 0) -> np.ndarray:
    """Poisson counts clipped to 0-15, as a counting detector's 4-bit movie holds."""
    rng = np.random.default_rng(seed)
    return np.minimum(rng.poisson(lam, size=shape), 15).astype(np.uint8)


# --- independent reading: struct at the documented offsets, blosc for MRCZ chunks ------

#: MACHST (MRC2014 word 54): 44 44 00 00 or 44 41 00 00 little-endian, 11 11 00 00 big.
MACHST_ORDER = {b"\x44\x44\x00\x00": "<", b"\x44\x41\x00\x00": "<", b"\x11\x11\x00\x00": ">"}


def read_raw_header(raw: bytes) -> dict:
    """The 1024-byte header field by field at the MRC2014/IMOD/MRCZ offsets, in the byte
    order its MACHST names (KeyError for any other stamp: our outputs must carry one)."""
    order = MACHST_ORDER[bytes(raw[212:216])]

    def i4(offset, n=1):
        values = struct.unpack_from(f"{order}{n}i", raw, offset)
        return values if n > 1 else values[0]

    def f4(offset, n=1):
        values = struct.unpack_from(f"{order}{n}f", raw, offset)
        return values if n > 1 else values[0]

    nlabl = i4(220)
    return {
        "order": order, "nx": i4(0), "ny": i4(4), "nz": i4(8), "mode": i4(12),
        "nxyzstart": i4(16, 3), "mxyz": i4(28, 3), "cella": f4(40, 3), "cellb": f4(52, 3),
        "mapcrs": i4(64, 3), "dmin": f4(76), "dmax": f4(80), "dmean": f4(84),
        "ispg": i4(88), "nsymbt": i4(92), "exttyp": bytes(raw[104:108]),
        "nversion": i4(108), "nint": struct.unpack_from(order + "h", raw, 128)[0],
        "nreal": struct.unpack_from(order + "h", raw, 130)[0],
        "mrcz_packed_bytes": struct.unpack_from(order + "q", raw, 144)[0],
        "imod_stamp": i4(152), "imod_flags": i4(156), "origin": f4(196, 3),
        "map": bytes(raw[208:212]), "machst": bytes(raw[212:216]), "rms": f4(216),
        "nlabl": nlabl,
        "labels": [raw[224 + 80 * i: 304 + 80 * i].rstrip(b" \x00").decode("ascii")
                   for i in range(10)],
    }


def blosc_chunks(raw: bytes, start: int, count: int) -> list[bytes]:
    """``count`` consecutive c-blosc 1.x chunks from byte ``start``: each one's length is
    its header's cbytes (little-endian uint32 at byte 12 of the chunk)."""
    chunks = []
    for _ in range(count):
        cbytes = struct.unpack_from("<I", raw, start + 12)[0]
        chunks.append(raw[start:start + cbytes])
        start += cbytes
    if start != len(raw):
        raise ValueError(f"{len(raw) - start} bytes after the last chunk")
    return chunks


def read_raw_mrc(path: Path) -> tuple[dict, np.ndarray]:
    """Header and data of a plain or MRCZ file, read without the service's code: data at
    1024 + NSYMBT, (nz, ny, nx) in the header's byte order; mode 3 as (nz, ny, nx, 2)
    int16, mode 101 through :func:`slow_unpack_4bit`; MRCZ chunks decompressed by the
    ``blosc`` package. Every byte must be accounted for (no short or long data)."""
    import blosc

    raw = Path(path).read_bytes()
    h = read_raw_header(raw)
    order, nx, ny, nz = h["order"], h["nx"], h["ny"], h["nz"]
    mode, codec = h["mode"] % 1000, h["mode"] // 1000
    start = 1024 + h["nsymbt"]
    if codec:
        body = b"".join(blosc.decompress(c) for c in blosc_chunks(raw, start, nz))
    else:
        body = raw[start:]
    if mode == 101:
        row = (nx + 1) // 2
        if len(body) != nz * ny * row:
            raise ValueError(f"{len(body)} data bytes, expected {nz * ny * row}")
        data = np.stack([slow_unpack_4bit(body[k * ny * row:(k + 1) * ny * row], nx, ny)
                         for k in range(nz)])
        return h, data
    if mode == 3:
        dtype, shape = np.dtype(order + "i2"), (nz, ny, nx, 2)
    else:
        dtype, shape = np.dtype(MODE_DTYPES[mode]).newbyteorder(order), (nz, ny, nx)
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(body) != expected:
        raise ValueError(f"{len(body)} data bytes, expected {expected}")
    return h, np.frombuffer(body, dtype=dtype).reshape(shape)
