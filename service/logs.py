"""Logs: one JSON object per line (python-json-logger) on stderr, so a facility's log
shipper can index them; ``mrc-ingest serve --log-format text`` for people. Request and
job lines carry ``dataset_id`` / ``job_id`` when they concern one."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(FIELDS, rename_fields={"asctime": "time",
                                                                  "levelname": "level",
                                                                  "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s "
                                               "%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):  # uvicorn's own lines, in the same format
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
