"""``mrc-ingest``: serve the API, push movies to it, inspect and convert MRC/MRCZ files.

Exit codes: 0 success; 1 the input is bad or the conversion was refused (one line on
stderr says why); 2 the command line itself is wrong.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import httpx
from sqlalchemy.exc import DBAPIError

from . import memory
from .client import ClientError
from .mrc import Codec, MrcError, Target, convert, inspect


def build_parser() -> argparse.ArgumentParser:
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

    p_serve = sub.add_parser("serve", help="run the HTTP service (settings from "
                                           "MRC_INGEST_* environment variables)")
    p_serve.add_argument("--host", default=None, help="default $MRC_INGEST_HOST or "
                                                      "127.0.0.1; 0.0.0.0 to listen on every "
                                                      "interface")
    p_serve.add_argument("--port", type=int, default=None,
                         help="default $MRC_INGEST_PORT or 8000")
    p_worker = sub.add_parser("worker", help="run job workers only (no HTTP): ingest, "
                                             "conversions, verification, for a catalog "
                                             "shared with API processes")
    for p in (p_serve, p_worker):  # the two long-running processes
        p.add_argument("--data-dir", type=Path, default=None,
                       help="overrides MRC_INGEST_DATA_DIR (default ./mrc-ingest-data; "
                            "with an object store, only scratch space)")
        p.add_argument("--workers", type=int, default=None,
                       help="job threads; overrides MRC_INGEST_WORKERS")
        p.add_argument("--log-level", default="info")
        p.add_argument("--log-format", choices=["json", "text"], default="json",
                       help="one JSON object per line (default) or plain text")

    p_migrate = sub.add_parser("migrate", help="upgrade the catalog's schema to this "
                                               "version (the service does it at start "
                                               "unless MRC_INGEST_MIGRATE_ON_START=false)")
    p_migrate.add_argument("--data-dir", type=Path, default=None)
    p_recover = sub.add_parser("recover", help="run the recovery steps of the commit "
                                               "protocol once (ARCHITECTURE.md): finish "
                                               "deletions, replay complete uploads, release "
                                               "committed ones, sweep unnamed objects")
    p_recover.add_argument("--data-dir", type=Path, default=None)
    p_recover.add_argument("--sweep-age", type=float, default=600.0,
                           help="sweep objects no row names once older than this many "
                                "seconds (default 600; 0 with every writer stopped)")

    def server_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--server", default=os.environ.get("MRC_INGEST_SERVER",
                                                          "http://127.0.0.1:8000"),
                       help="service URL (default $MRC_INGEST_SERVER or "
                            "http://127.0.0.1:8000)")
        p.add_argument("--token", default=os.environ.get("MRC_INGEST_TOKEN"),
                       help="API token (default $MRC_INGEST_TOKEN)")

    p_push = sub.add_parser("push", help="upload movies and sidecars (resumable; skips "
                                         "what the server has ready), wait for each "
                                         "dataset's final state; exit 1 unless all ready")
    p_push.add_argument("paths", nargs="+", type=Path, help="files or folders")
    server_args(p_push)
    p_push.add_argument("--watch", action="store_true",
                        help="keep pushing new movies once complete, until Ctrl-C")
    p_push.add_argument("--interval", type=float, default=5.0,
                        help="seconds between scans with --watch (default 5)")
    p_push.add_argument("--chunk-mib", type=int, default=64, help="PATCH size (default 64)")
    p_push.add_argument("--session", default=None,
                        help="the session the movies belong to (default: the name of the "
                             "folder given that holds each file)")
    p_push.add_argument("--project", default=None,
                        help="the session's project (default: 'default', or the token's "
                             "only project)")
    p_push.add_argument("--timeout", type=float, default=900.0,
                        help="seconds to wait for each movie's dataset to become ready, "
                             "rejected or failed once sent (default 900)")

    p_ls = sub.add_parser("ls", help="list datasets on the server")
    server_args(p_ls)
    p_ls.add_argument("--status", choices=["queued", "processing", "ready", "rejected",
                                           "failed"])
    p_ls.add_argument("--limit", type=int, default=20)
    p_ls.add_argument("--session", help="only this session's datasets (its id)")

    p_sessions = sub.add_parser("sessions", help="list sessions on the server, newest "
                                                 "activity first, with their figures")
    server_args(p_sessions)
    p_sessions.add_argument("--project", help="only this project's sessions")
    p_sessions.add_argument("--limit", type=int, default=20)

    p_status = sub.add_parser("status", help="one dataset (or job) on the server, as JSON")
    server_args(p_status)
    p_status.add_argument("id", help="dataset id (or job id)")

    p_token = sub.add_parser("token", help="make a new API token and print the settings "
                                           "entry (its hash) for MRC_INGEST_TOKENS")
    p_token.add_argument("--name", required=True, help="who uses it, e.g. scope1-pc")
    p_token.add_argument("--role", required=True, choices=["read", "write", "admin"])
    p_token.add_argument("--project", action="append", dest="projects", metavar="NAME",
                         help="limit the token to this project (repeatable); without: "
                              "every project. Admin tokens always see every project")
    return parser


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def _token(args: argparse.Namespace) -> int:
    from .auth import hash_token, new_token

    token = new_token()
    if args.projects and args.role == "admin":
        return _fail("an admin token sees every project: --project applies to read and "
                     "write tokens")
    entry = {"name": args.name, "role": args.role, "sha256": hash_token(token),
             **({"projects": sorted(set(args.projects))} if args.projects else {})}
    print(f"token (give it to {args.name}; it is not stored anywhere): {token}")
    print(f"settings entry (add it to the MRC_INGEST_TOKENS JSON list): {json.dumps(entry)}")
    return 0


def _settings(args: argparse.Namespace):
    """Settings from the environment, with the command line's overrides; None (after
    one line on stderr saying what is wrong) when they are invalid."""
    from .config import Settings

    overrides = {k: getattr(args, k) for k in ("data_dir", "workers", "host", "port")
                 if getattr(args, k, None) is not None}
    try:
        return Settings(**overrides)
    except ValueError as exc:
        _fail(f"bad settings: {exc}")
        return None


def _worker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from .ingest import IngestService
    from .logs import configure

    if (settings := _settings(args)) is None or not _embedded_catalog_free(settings):
        return 1
    if settings.workers < 1:
        return _fail("a worker process needs MRC_INGEST_WORKERS (or --workers) >= 1", 2)
    configure(args.log_level, args.log_format)
    memory.tune_malloc()
    service = IngestService(settings)
    service.start()
    assert service.queue is not None
    logging.getLogger("mrc_ingest").info(
        f"worker {service.queue.owner} running {settings.workers} workers",
        extra={"catalog": service.catalog.database if service.catalog else "",
               "storage": service.storage.store.describe()})
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    stop.wait()
    service.stop()
    return 0


def _embedded_catalog_free(settings) -> bool:
    """One line on stderr and False when another process holds the embedded catalog."""
    from .ingest import CatalogInUse, EmbeddedLock

    if not settings.catalog_url.startswith("sqlite"):
        return True
    try:
        lock = EmbeddedLock.take(settings.catalog_url)
    except CatalogInUse as exc:
        _fail(str(exc))
        return False
    if lock is not None:
        lock.release()
    return True


def _recover(args: argparse.Namespace) -> int:
    from .ingest import IngestService

    if (settings := _settings(args)) is None:
        return 1
    if not _embedded_catalog_free(settings):
        return 1
    service = IngestService(settings.model_copy(update={"workers": 0}))
    service.start()
    try:
        done = service.recovery.tick()
        done["swept"] = service.recovery.sweep(min_age=args.sweep_age) + \
            service.storage.sweep(service.may_be_writing, args.sweep_age)
    finally:
        service.stop()
    print(json.dumps(done))
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from .catalog import Catalog
    from .catalog.migrate import upgrade

    if (settings := _settings(args)) is None:
        return 1
    catalog = Catalog(settings.catalog_url, migrate=False)
    try:
        before, after = upgrade(catalog.engine)
    finally:
        catalog.close()
    print(f"catalog {catalog.database}: {before or 'new'} -> {after}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn  # the web stack loads only for this command

    from .api import create_app
    from .api.transport import ChunkedBodyHttpTools

    if (settings := _settings(args)) is None or not _embedded_catalog_free(settings):
        return 1
    if not settings.tokens and settings.host not in LOOPBACK_HOSTS:
        return _fail(f"refusing to listen on {settings.host} without API tokens: anyone on the "
                     "network could upload and delete. Make tokens with 'mrc-ingest token' "
                     "and set MRC_INGEST_TOKENS, or listen on 127.0.0.1", 2)
    from .logs import configure
    configure(args.log_level, args.log_format)
    memory.tune_malloc()
    logging.getLogger("mrc_ingest").info(
        f"serving http://{settings.host}:{settings.port} (OpenAPI at /docs)",
        extra={"data_dir": str(settings.data_dir.resolve()),
               "catalog": settings.catalog_display, "storage": settings.storage_url or "data_dir",
               "workers": settings.workers, "auth": bool(settings.tokens)})
    app = create_app(settings)
    # Everything imported and built so far lives as long as the process: out of the
    # cyclic collector's way, a full collection walks only what requests made (a list
    # of sessions measured 100 ms collections before, under 15 ms after).
    gc.freeze()
    # Our middleware logs every request (with ids); uvicorn's access log would repeat it.
    uvicorn.run(app, host=settings.host, port=settings.port, http=ChunkedBodyHttpTools,
                log_level=args.log_level, log_config=None, access_log=False,
                timeout_graceful_shutdown=10)
    return 0


def _push(args: argparse.Namespace) -> int:
    from .client import Pusher, Server, collect

    pusher = Pusher(Server(args.server, args.token), chunk=args.chunk_mib << 20,
                    timeout=args.timeout, session=args.session, project=args.project,
                    folders=args.paths)
    if args.watch:
        try:
            pusher.watch(args.paths, args.interval, stop=lambda: False)
        except KeyboardInterrupt:
            pass
    else:
        pusher.push_all(collect(args.paths))
    pusher.say(pusher.summary())
    return 0 if pusher.all_ready else 1


def _ls(args: argparse.Namespace) -> int:
    from .client import Server

    params = {"limit": args.limit, **({"status": args.status} if args.status else {}),
              **({"session": args.session} if args.session else {})}
    for d in Server(args.server, args.token).get("/v1/datasets", **params)["items"]:
        dims = f"{d['nx']}x{d['ny']}x{d['frames']}" if d["nx"] else "-"
        ratio = f"{d['compression_ratio']:.2f}x" if d["compression_ratio"] else "-"
        print(f"{d['id']}  {d['status']:<10} {d['name']:<40} mode {d['mode']!s:<4} "
              f"{dims:<16} {d['size_bytes'] / 1e6:9.1f} MB  {ratio}")
    return 0


def _sessions(args: argparse.Namespace) -> int:
    from .client import Server

    params = {"limit": args.limit, **({"project": args.project} if args.project else {})}
    for s in Server(args.server, args.token).get("/v1/sessions", **params)["items"]:
        counts = s["counts"]
        rate = s["rate_per_10_minutes"]
        print(f"{s['id']}  {s['project']:<16} {s['name']:<32} {counts['movies']:6d} movies "
              f"({counts['ready']} ready, {counts['rejected']} rejected, {counts['failed']} "
              f"failed, {counts['in_flight']} in flight)  "
              f"{counts['bytes_received'] / 1e9:8.2f} GB  "
              f"{'-' if rate is None else f'{rate:g}'}/10 min  last {s['last_movie_at']}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from .client import Server

    server = Server(args.server, args.token)
    try:
        record = server.get(f"/v1/datasets/{args.id}")
    except ClientError:
        record = server.get(f"/v1/jobs/{args.id}")
    print(json.dumps(record, indent=2))
    return 0


def _fail(message: str, code: int = 1) -> int:
    print(f"mrc-ingest: error: {message}", file=sys.stderr)
    return code


@contextmanager
def _progress_bar(label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A frames progress bar on a terminal (multi-GB movies take a while); none for
    scripts, whose stderr stays clean."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm
    bar = tqdm(desc=label, unit="frame", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
    try:
        yield progress
    finally:
        bar.close()


def _inspect(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        return _fail(f"{args.file}: no such file")
    with _progress_bar(args.file.name) as progress:
        report = inspect(args.file, deep=not args.quick, progress=progress)
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
    with _progress_bar(args.input.name) as progress:
        report = convert(args.input, args.output, target, progress=progress)
    print(json.dumps(report.to_dict(), indent=2))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": _serve, "worker": _worker, "migrate": _migrate, "recover": _recover,
    "token": _token,
    "push": _push, "ls": _ls, "sessions": _sessions, "status": _status,
    "inspect": _inspect,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            return _convert(args, parser)
        return COMMANDS[args.command](args)
    except ClientError as exc:
        return _fail(str(exc))
    except httpx.HTTPError as exc:
        return _fail(f"cannot reach {getattr(args, 'server', 'the server')}: {exc}")
    except MrcError as exc:
        return _fail(f"{getattr(args, 'input', getattr(args, 'file', ''))}: {exc}")
    except OSError as exc:
        return _fail(f"{exc.filename or ''}: {exc.strerror or exc}")
    except DBAPIError as exc:
        return _fail(f"the catalog database: {exc.orig or exc}")
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
