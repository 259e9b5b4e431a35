"""mrc-ingest format core: read, validate, normalize and compress MRC/MRCZ files.

Pure Python + numpy + blosc; no web imports. Typical use::

    from service import mrc
    with mrc.MrcFile("movie.mrc") as f:
        frame = f.read_frame(20)
    findings = mrc.validate("movie.mrc")
    mrc.convert("movie.mrc", "movie.mrcz", mrc.Target(mode=0, codec=mrc.Codec.ZSTD))
"""

from .codec import Codec, FrameIndex
from .convert import ConversionReport, Target, convert, default_mode
from .errors import ConversionError, FormatError, LossyConversionError, MrcError
from .findings import Finding, Severity
from .modes import MODES, ModeSpec, pack_4bit, unpack_4bit
from .reader import FrameIndexError, MrcFile
from .validate import inspect, validate
from .writer import MrcWriter

__all__ = [
    "Codec", "ConversionError", "ConversionReport", "Finding", "FormatError", "FrameIndex",
    "FrameIndexError", "LossyConversionError", "MODES", "ModeSpec", "MrcError", "MrcFile",
    "MrcWriter", "Severity", "Target", "convert", "default_mode", "inspect", "pack_4bit",
    "unpack_4bit", "validate",
]
