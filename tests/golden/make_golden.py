"""Made once, checked in: tiny files written by third-party writers, with the arrays they
hold (``*.npy``). Re-running overwrites them; only do that on purpose.

    python tests/golden/make_golden.py
"""

from pathlib import Path

import mrcfile
import mrcz
import numpy as np

HERE = Path(__file__).resolve().parent


def main() -> None:
    rng = np.random.default_rng(2014)
    counts = np.minimum(rng.poisson(1.5, size=(3, 8, 10)), 15).astype(np.uint8)
    mrcz.writeMRC(counts, HERE / "mrcz_uint4.mrc", dtype="uint4", pixelsize=[1.0, 0.5, 0.5])
    np.save(HERE / "mrcz_uint4.npy", counts)

    shorts = rng.integers(-2000, 2000, size=(4, 6, 7), dtype=np.int16)
    mrcz.writeMRC(shorts, HERE / "mrcz_zstd_int16_be.mrcz", compressor="zstd", clevel=1,
                  endian="be", pixelsize=[2.0, 1.25, 1.25])
    np.save(HERE / "mrcz_zstd_int16_be.npy", shorts)

    halves = rng.normal(0, 2, size=(2, 5, 6)).astype(np.float16)
    with mrcfile.new(HERE / "mrcfile_float16.mrc") as m:
        m.set_data(halves)
        m.voxel_size = 0.83
        m.set_image_stack()
        m.update_header_stats()
    np.save(HERE / "mrcfile_float16.npy", halves)


if __name__ == "__main__":
    main()
