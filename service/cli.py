"""``mrc-ingest`` command line: inspect and convert MRC/MRCZ files.

Exit codes: 0 success; 1 the input is bad or the conversion was refused (one line on
stderr says why); 2 the command line itself is wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from .mrc import Codec, MrcError, Target, convert, inspect


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrc-ingest", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p_inspect = sub.add_parser("inspect", help="print header, derived facts and findings "
                                               "as JSON")
    p_inspect.add_argument("file", type=Path)
    p_inspect.add_argument("--quick", action="store_true",
                           help="header and structure only; skip reading every frame for "
                                "the statistics check")

    p_convert = sub.add_parser("convert", help="convert losslessly (OUT ending .mrcz "
                                               "means MRCZ)")
    p_convert.add_argument("input", type=Path)
    p_convert.add_argument("output", type=Path)
    p_convert.add_argument("--mode", type=int, default=None,
                           help="target MRC mode (default: 101 -> 0, others unchanged)")
    p_convert.add_argument("--codec", default=None,
                           choices=[c.cname for c in Codec if c is not Codec.NONE],
                           help="MRCZ codec (default zstd; needs an output ending .mrcz)")
    p_convert.add_argument("--clevel", type=int, default=1, help="compression level 0-9 "
                                                                 "(default 1)")
    p_convert.add_argument("--big-endian", action="store_true",
                           help="write big-endian (default little-endian)")
    return parser


def _fail(message: str, code: int = 1) -> int:
    print(f"mrc-ingest: error: {message}", file=sys.stderr)
    return code


def _inspect(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        return _fail(f"{args.file}: no such file")
    report = inspect(args.file, deep=not args.quick)
    print(json.dumps(report, indent=2, default=str))
    if not report["valid"]:
        first = next(f for f in report["findings"] if f["severity"] == "error")
        return _fail(f"{args.file}: {first['field']}: {first['message']}")
    return 0


def _convert(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    mrcz_out = args.output.suffix.lower() == ".mrcz"
    if args.codec and not mrcz_out:
        parser.error("--codec needs an output file ending .mrcz")
    if not args.input.is_file():
        return _fail(f"{args.input}: no such file")
    codec = Codec.from_name(args.codec or "zstd") if mrcz_out else Codec.NONE
    target = Target(mode=args.mode, codec=codec, clevel=args.clevel,
                    byte_order=">" if args.big_endian else "<")
    report = convert(args.input, args.output, target)
    print(json.dumps(report.to_dict(), indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            return _inspect(args)
        return _convert(args, parser)
    except MrcError as exc:
        return _fail(f"{args.input}: {exc}")
    except OSError as exc:
        return _fail(f"{exc.filename or ''}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
