"""The Dockerfile and compose files cannot be built here (no engine), so check what can
go stale without one: every setting they name exists, every command they run exists."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from service.cli import build_parser
from service.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKER_FILES = [ROOT / "Dockerfile", *sorted((ROOT / "docker").glob("*.yaml"))]


@pytest.mark.parametrize("path", DOCKER_FILES, ids=lambda p: p.name)
def test_every_setting_named_exists(path: Path):
    known = {f"MRC_INGEST_{name.upper()}" for name in Settings.model_fields}
    named = set(re.findall(r"MRC_INGEST_[A-Z0-9_]+", path.read_text()))
    assert named, f"{path.name} configures nothing?"
    assert named <= known, f"{path.name} names unknown settings: {sorted(named - known)}"


@pytest.mark.parametrize("path", DOCKER_FILES, ids=lambda p: p.name)
def test_every_command_run_parses(path: Path):
    text = path.read_text()
    commands = [json_list(m) for m in re.findall(r'\[("mrc-ingest"[^\]]*)\]', text)]
    if path.name in ("Dockerfile", "compose.replicas.yaml"):
        assert commands, f"{path.name} runs no mrc-ingest command"
    parser = build_parser()
    for argv in commands:
        parser.parse_args(argv[1:])  # SystemExit (a failure) on an unknown command/flag


def json_list(inner: str) -> list[str]:
    return [shlex.split(item)[0] for item in inner.split(",")]
