"""One contract for every datastore: the local folder and S3 (a real SeaweedFS from
``tests/servers.py``; no mocks: a mock would agree with whatever we believe S3 does).

S3 facts the contract leans on: parts are at least 5 MiB but the last, so multipart
objects here are ~11 MiB over 5 MiB parts; ListMultipartUploads shows what an aborted
or failed upload would have left.
"""

from __future__ import annotations

import base64
import zlib

import functools
import threading
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import boto3
import numpy as np
import pytest

from service.datastore import (DataStore, LocalStore, ObjectMissing, S3Store,
                               StoreError, StoreUnavailable, open_store)
from service.datastore.s3 import MIN_PART_BYTES, MultipartUploadMissing
from tests.servers import SeaweedFS, free_port_pairs

PART = MIN_PART_BYTES
HEAD = 1024


@dataclass
class Backend:
    """A store under test and a look behind its back at what it left unfinished."""

    name: str
    store: DataStore
    leftovers: Callable[[], list[str]]


def local_backend(root: Path) -> Backend:
    store = LocalStore(root)

    def leftovers() -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                      if p.is_file() and p.name.startswith("."))

    return Backend("local", store, leftovers)


@functools.cache
def boto_session() -> boto3.session.Session:
    """One session for the suite's stores: a client from a fresh one costs ~0.1 s."""
    return boto3.session.Session()


@contextmanager
def s3_backend(server: SeaweedFS, **options) -> Iterator[Backend]:
    """An S3Store under a fresh prefix of the shared server, emptied afterwards."""
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    store = S3Store(server.url(prefix), endpoint_url=server.endpoint_url,
                    part_bytes=PART, session=boto_session(), **options)
    client = server.client()

    def leftovers() -> list[str]:
        answer = client.list_multipart_uploads(Bucket=server.bucket, Prefix=prefix + "/")
        return sorted(upload["Key"] for upload in answer.get("Uploads", ()))

    try:
        yield Backend("s3", store, leftovers)
    finally:
        store.delete_prefix("")  # keep the shared server small
        store.close()


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path) -> Iterator[Backend]:
    if request.param == "local":
        yield local_backend(tmp_path / "store")
        return
    with s3_backend(request.getfixturevalue("seaweedfs")) as chosen:
        yield chosen


@pytest.fixture
def s3(seaweedfs) -> Iterator[Backend]:  # noqa: F811 (the fixture imported above)
    with s3_backend(seaweedfs) as chosen:
        yield chosen


def payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def write_in_pieces(writer, data: bytes, piece: int = (1 << 20) + 7) -> None:
    """Odd-sized writes, so part boundaries fall inside them."""
    view = memoryview(data)
    for start in range(0, len(data), piece):
        writer.write(view[start:start + piece])


def s3_etag(server: SeaweedFS, store: S3Store, key: str) -> str:
    return server.client().head_object(Bucket=server.bucket, Key=store.prefix + key)["ETag"]


# -- the contract ----------------------------------------------------------------------


def test_object_appears_only_on_commit(backend):
    store, data = backend.store, payload(2 * PART + 12345)
    writer = store.open_writer("datasets/d1/archive.mrcz")
    write_in_pieces(writer, data)
    assert writer.written == len(data)
    assert store.size("datasets/d1/archive.mrcz") is None
    assert list(store.list("datasets/")) == []
    with pytest.raises(ObjectMissing):
        store.get_bytes("datasets/d1/archive.mrcz")
    assert writer.commit() == len(data)
    store.ping()
    assert store.size("datasets/d1/archive.mrcz") == len(data)
    assert store.get_bytes("datasets/d1/archive.mrcz") == data
    assert [info.key for info in store.list("datasets/")] == ["datasets/d1/archive.mrcz"]
    assert backend.leftovers() == []


@pytest.mark.parametrize("size", [1000, 2 * PART + 5], ids=["small", "multipart"])
def test_abort_leaves_nothing(backend, size):
    store = backend.store
    writer = store.open_writer("datasets/d2/archive.mrcz", reserve_head=HEAD)
    write_in_pieces(writer, payload(size))
    writer.abort()
    writer.abort()  # twice is fine
    assert store.size("datasets/d2/archive.mrcz") is None
    assert list(store.list("")) == []
    assert backend.leftovers() == []


@pytest.mark.parametrize("body_size", [0, 5000, PART - HEAD, PART - HEAD + 1, 2 * PART + 99],
                         ids=["head-only", "small", "one-part", "part-and-a-byte",
                              "multipart"])
def test_reserve_head_round_trip(backend, body_size):
    store, head, body = backend.store, payload(HEAD, seed=1), payload(body_size, seed=2)
    writer = store.open_writer("datasets/d3/archive.mrcz", reserve_head=HEAD)
    write_in_pieces(writer, body)
    assert writer.commit(head) == HEAD + body_size
    assert store.get_bytes("datasets/d3/archive.mrcz") == head + body
    assert backend.leftovers() == []


def test_reserved_head_left_unfilled_is_zeros(backend):
    writer = backend.store.open_writer("k", reserve_head=16)
    writer.write(b"body")
    assert writer.commit() == 20
    assert backend.store.get_bytes("k") == bytes(16) + b"body"


def test_head_of_the_wrong_length_is_refused_and_nothing_stays(backend):
    writer = backend.store.open_writer("k", reserve_head=HEAD)
    writer.write(payload(PART + 10))
    with pytest.raises(ValueError):
        writer.commit(b"short")
    assert backend.store.size("k") is None
    assert backend.leftovers() == []


def test_multipart_object_round_trip(backend, request):
    store, data = backend.store, payload(11 << 20, seed=3)
    writer = store.open_writer("big.bin")
    write_in_pieces(writer, data)
    assert writer.commit() == len(data)
    assert store.get_bytes("big.bin") == data
    if backend.name == "s3":  # three parts went up: 5 + 5 + 1 MiB
        etag = s3_etag(request.getfixturevalue("seaweedfs"), store, "big.bin")
        assert etag.strip('"').endswith("-3")


def test_empty_object(backend):
    store = backend.store
    assert store.put_bytes("empty", b"") == 0
    assert store.size("empty") == 0
    assert store.get_bytes("empty") == b""
    assert store.read_range("empty", 0, 10) == b""
    assert [(i.key, i.size) for i in store.list("")] == [("empty", 0)]


@pytest.mark.parametrize("offset, n, expected", [
    (0, 10, slice(0, 10)), (990, 10, slice(990, 1000)), (995, 10, slice(995, 1000)),
    (999, 1, slice(999, 1000)), (1000, 10, slice(0, 0)), (5000, 1, slice(0, 0)),
    (17, 0, slice(0, 0)), (0, 4000, slice(0, 1000))])
def test_ranged_reads(backend, offset, n, expected):
    data = payload(1000, seed=4)
    backend.store.put_bytes("r", data)
    assert backend.store.read_range("r", offset, n) == data[expected]


def test_reads_of_a_missing_object(backend):
    store = backend.store
    assert store.size("nothing/here") is None
    with pytest.raises(ObjectMissing) as caught:
        store.get_bytes("nothing/here")
    assert isinstance(caught.value, KeyError)
    with pytest.raises(ObjectMissing):
        store.read_range("nothing/here", 0, 10)
    with pytest.raises(ObjectMissing):
        store.source("nothing/here")


def test_source_reads_like_a_file(backend):
    data = payload(PART + 1_000_000, seed=5)
    backend.store.put_bytes("datasets/d4/archive.mrcz", data)
    source = backend.store.source("datasets/d4/archive.mrcz")
    try:
        assert source.size == len(data)
        assert "datasets/d4/archive.mrcz" in source.name
        assert source.read_at(100, 50) == data[100:150]
        assert source.read_at(len(data) - 5, 50) == data[-5:]
        assert source.read_at(len(data) + 1, 50) == b""
        frame = np.zeros((500, 1000), dtype=np.uint16)  # 1 MB across the 5 MiB mark
        offset = PART - 500_000
        assert source.readinto_at(frame, offset) == frame.nbytes
        assert frame.tobytes() == data[offset:offset + frame.nbytes]
        tail = np.zeros(8000, dtype=np.uint8)
        assert source.readinto_at(tail, len(data) - 3000) == 3000
        assert tail[:3000].tobytes() == data[-3000:]
        assert source.readinto_at(tail, len(data)) == 0
    finally:
        source.close()


def test_list_delete_and_delete_prefix(backend):
    store = backend.store
    for key, size in [("a/1", 1), ("a/2", 2), ("a/b/3", 3), ("ab/4", 4)]:
        store.put_bytes(key, bytes(size))
    listed = sorted(store.list("a/"), key=lambda info: info.key)
    assert [(i.key, i.size) for i in listed] == [("a/1", 1), ("a/2", 2), ("a/b/3", 3)]
    assert all(abs(i.modified - time.time()) < 3600 for i in listed)
    assert sorted(i.key for i in store.list("a")) == ["a/1", "a/2", "a/b/3"]  # a folder
    assert [i.key for i in store.list("a/b/3")] == ["a/b/3"]
    assert store.usage("") == 10
    store.delete("a/1")
    store.delete("a/1")  # deleting what is gone is fine
    assert store.size("a/1") is None
    assert store.delete_prefix("a/") == 2
    assert sorted(i.key for i in store.list("")) == ["ab/4"]


def test_put_file_stores_and_takes_the_file(backend, tmp_path):
    data = payload(PART + 4321, seed=6)
    path = tmp_path / "finished.mrcz"
    path.write_bytes(data)
    assert backend.store.put_file("datasets/d5/archive.mrcz", path) == len(data)
    assert not path.exists()
    assert backend.store.get_bytes("datasets/d5/archive.mrcz") == data
    assert backend.leftovers() == []


@pytest.mark.parametrize("key", ["", "/abs", "../up", "a/../b", "a//b", "a/./b", "a b"])
def test_bad_keys_are_refused(backend, key):
    store = backend.store
    for call in (lambda: store.open_writer(key), lambda: store.size(key),
                 lambda: store.read_range(key, 0, 1), lambda: store.delete(key),
                 lambda: store.put_bytes(key, b"x"), lambda: store.source(key)):
        with pytest.raises(ValueError):
            call()


# -- S3 only: the multipart primitives, the sweep, failures ------------------------------


def test_multipart_primitives(s3):
    store = s3.store
    upload_id = store.create_multipart("tus/u1")
    first, last = payload(PART, seed=7), payload(1234, seed=8)
    part_last = store.upload_part("tus/u1", upload_id, 2, last)  # any order will do
    part_first = store.upload_part("tus/u1", upload_id, 1, memoryview(first))
    assert part_first.crc32 == base64.b64encode(zlib.crc32(first).to_bytes(4, "big")).decode()
    listed = store.list_parts("tus/u1", upload_id)
    assert [p[:3] for p in listed] == [(1, PART, part_first.etag), (2, 1234, part_last.etag)]
    assert store.size("tus/u1") is None
    assert s3.leftovers() == [store.prefix + "tus/u1"]
    parts = [part_first, part_last]  # with their checksums (SeaweedFS does not list them)
    assert store.complete_multipart("tus/u1", upload_id, parts) == PART + 1234
    assert store.get_bytes("tus/u1") == first + last
    assert s3.leftovers() == []
    with pytest.raises(MultipartUploadMissing):
        store.list_parts("tus/u1", upload_id)
    with pytest.raises(ValueError):
        store.upload_part("tus/u1", upload_id, 0, b"x")


def test_abort_multipart_is_idempotent(s3):
    upload_id = s3.store.create_multipart("tus/u2")
    s3.store.upload_part("tus/u2", upload_id, 1, b"some bytes")
    s3.store.abort_multipart("tus/u2", upload_id)
    s3.store.abort_multipart("tus/u2", upload_id)
    assert s3.leftovers() == []
    assert s3.store.size("tus/u2") is None


def test_sweep_aborts_only_old_uploads_under_the_prefix(s3):
    store = s3.store
    for key in ("tus/a", "tus/b", "tusk/c"):
        store.create_multipart(key)
    assert store.stale_multipart_uploads("tus/", older_than_seconds=3600) == []
    stale = store.stale_multipart_uploads("tus/", older_than_seconds=0)
    assert sorted(u.key for u in stale) == ["tus/a", "tus/b"]
    assert all(abs(u.initiated - time.time()) < 3600 for u in stale)
    assert store.sweep_multipart_uploads("tus", older_than_seconds=0) == 2  # folder-like
    assert s3.leftovers() == [store.prefix + "tusk/c"]
    assert store.sweep_multipart_uploads("", older_than_seconds=0) == 1
    assert s3.leftovers() == []


def test_a_failed_part_aborts_the_upload(s3, seaweedfs):  # noqa: F811
    """The upload vanishes mid-write (as if swept): the writer fails with a StoreError
    and no parts stay behind."""
    store = s3.store
    writer = store.open_writer("doomed", reserve_head=HEAD)
    write_in_pieces(writer, payload(2 * PART + 10))  # part 2 made the upload
    [upload] = seaweedfs.client().list_multipart_uploads(
        Bucket=seaweedfs.bucket, Prefix=store.prefix)["Uploads"]
    store.abort_multipart("doomed", upload["UploadId"])
    with pytest.raises(StoreError):
        write_in_pieces(writer, payload(2 * PART))
        writer.commit(bytes(HEAD))
    assert store.size("doomed") is None
    assert s3.leftovers() == []


def test_a_part_that_fails_to_upload_aborts_the_upload(s3):
    """Part 3 fails (injected; the others really go up): the writer raises that error
    and aborts, so the parts already uploaded do not stay behind."""
    store, real_upload = s3.store, s3.store.upload_part

    def failing_upload(key, upload_id, number, data):
        if number == 3:
            raise StoreUnavailable("injected")
        return real_upload(key, upload_id, number, data)

    store.upload_part = failing_upload
    writer = store.open_writer("doomed")
    with pytest.raises(StoreUnavailable, match="injected"):
        write_in_pieces(writer, payload(4 * PART))
        writer.commit()
    assert store.size("doomed") is None
    assert s3.leftovers() == []


def test_parts_in_flight_are_bounded(seaweedfs):  # noqa: F811
    """write() waits while ``parallel_parts`` parts are uploading: memory stays bounded."""
    running, peak, lock = [0], [0], threading.Lock()
    with s3_backend(seaweedfs, parallel_parts=2) as backend:
        store, real_upload = backend.store, backend.store.upload_part

        def counting_upload(*args):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            try:
                time.sleep(0.05)  # slow enough for the writer to catch up
                return real_upload(*args)
            finally:
                with lock:
                    running[0] -= 1

        store.upload_part = counting_upload  # the real upload, counted
        data = payload(6 * PART + 1, seed=9)
        writer = store.open_writer("bounded")
        write_in_pieces(writer, data)
        writer.commit()
        assert peak[0] == 2
        assert store.get_bytes("bounded") == data


def test_unreachable_endpoint_is_unavailable_quickly(seaweedfs):  # noqa: F811
    [closed] = free_port_pairs(1)  # nothing listens there
    endpoint = f"http://127.0.0.1:{closed}"
    store = S3Store(seaweedfs.url("x"), endpoint_url=endpoint, part_bytes=PART,
                    connect_timeout=1, max_attempts=1)
    big = payload(PART + 1)

    def write_a_part():
        store.open_writer("k").write(big)

    def small_commit():
        writer = store.open_writer("k")
        writer.write(b"abc")
        writer.commit()

    calls = [store.ping, lambda: store.size("k"), lambda: store.read_range("k", 0, 1),
             lambda: store.source("k"), lambda: list(store.list("")),
             lambda: store.delete("k"), write_a_part, small_commit,
             lambda: store.create_multipart("k"),
             lambda: store.sweep_multipart_uploads("", 0)]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{closed}.*{seaweedfs.bucket}"):
            call()
        assert time.monotonic() - started < 2.0
    store.close()
    # With the default retries (3 attempts, jittered backoff) it is still seconds.
    default = S3Store(seaweedfs.url(), endpoint_url=endpoint)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        default.ping()
    assert time.monotonic() - started < 6.0
    default.close()


def test_missing_bucket_and_wrong_keys_are_unavailable(seaweedfs, monkeypatch):  # noqa: F811
    store = S3Store("s3://no-such-bucket", endpoint_url=seaweedfs.endpoint_url)
    with pytest.raises(StoreUnavailable, match="does not exist"):
        store.ping()
    store.close()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
    store = S3Store(seaweedfs.url(), endpoint_url=seaweedfs.endpoint_url)
    with pytest.raises(StoreUnavailable, match="credentials"):
        store.ping()
    with pytest.raises(StoreUnavailable, match="InvalidAccessKeyId"):
        store.read_range("k", 0, 1)
    store.close()


# -- construction ----------------------------------------------------------------------


def test_open_store_chooses_by_url(tmp_path):
    assert isinstance(open_store(None, tmp_path), LocalStore)
    assert isinstance(open_store("file:", tmp_path), LocalStore)
    store = open_store("s3://bucket/some/prefix", tmp_path,
                       endpoint_url="http://127.0.0.1:1", part_bytes=6 << 20)
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.part_bytes) == ("bucket", "some/prefix/",
                                                              6 << 20)
    assert store.uri("a/b") == "s3://bucket/some/prefix/a/b"
    assert S3Store("s3://bucket").prefix == ""
    for bad in ("ftp://host/x", "s3://", "s3:///prefix", "bucket/prefix",
                "s3://host:9000/bucket"):
        with pytest.raises(ValueError, match="s3://bucket/prefix"):
            open_store(bad, tmp_path)
    with pytest.raises(ValueError, match="at least"):
        S3Store("s3://bucket", part_bytes=1 << 20)
    with pytest.raises(ValueError):
        S3Store("s3://bucket/a//b")


def test_reserve_must_fit_in_the_first_part(tmp_path):
    store = S3Store("s3://bucket", endpoint_url="http://127.0.0.1:1", part_bytes=PART)
    with pytest.raises(ValueError, match="reserve_head"):
        store.open_writer("k", reserve_head=PART)


def test_the_maintenance_sweep_spares_live_writers_and_tus(s3, tmp_path):
    """Storage.sweep on S3: an incomplete upload whose dataset has a live job stays, as
    do tus uploads (the catalog's, dropped by expiry); the rest is aborted."""
    from service.storage import Storage

    store = s3.store
    for key in ("datasets/dead/archive.mrcz", "datasets/live/archive.mrcz",
                "conversions/dead/m.mode1.mrc", "particle_sets/p1/export.mrc", "tus/t1"):
        store.create_multipart(key)
    storage = Storage(tmp_path / "scratch", store)
    assert storage.sweep(lambda dataset_id: True, older_than_seconds=3600) == 0
    assert storage.sweep(lambda dataset_id: dataset_id == "live", older_than_seconds=0) == 3
    assert sorted(s3.leftovers()) == [store.prefix + "datasets/live/archive.mrcz",
                                      store.prefix + "tus/t1"]


def test_the_maintenance_sweep_on_the_local_folder_takes_only_free_temporaries(tmp_path):
    import fcntl

    from service.storage import Storage

    storage = Storage(tmp_path)
    storage.prepare()
    folder = tmp_path / "datasets" / "d1"
    folder.mkdir(parents=True)
    dead, live = folder / ".archive.mrcz.aaaa.part", folder / ".sum.bin.bbbb.part"
    young = folder / ".restore.npz.cccc.part"  # created an instant before its lock
    for path in (dead, live, young):
        path.write_bytes(b"bytes")
    an_hour_ago = time.time() - 3600
    for path in (dead, live):
        os.utime(path, (an_hour_ago, an_hour_ago))
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert storage.sweep(lambda dataset_id: False, older_than_seconds=0) == 1
    assert not dead.exists() and live.exists() and young.exists()


# -- read back: what the commit protocol checks before anything is committed ------------

@pytest.mark.parametrize("size,head", [(0, 0), (1234, 0), (3 * PART + 17, 1024)])
def test_a_receipt_reads_back_and_a_changed_object_does_not(backend, size, head):
    """A writer's receipt (size + CRC-32, from the bytes as written) matches what the
    store gives back -- on S3 the composite checksum the store itself keeps, with a
    reserved head filled at commit -- and a changed or missing object is caught."""
    from service.datastore import ObjectCorrupt

    store, data = backend.store, payload(size, seed=size)
    writer = store.open_writer("datasets/x/g/archive.mrcz", reserve_head=head)
    write_in_pieces(writer, data)
    writer.commit(b"H" * head if head else None)
    receipt = writer.receipt
    assert receipt.size == head + size
    store.read_back(receipt)
    small = store.put("datasets/x/g/record", b"a record")
    store.read_back(small)
    store.put_bytes("datasets/x/g/record", b"A record")  # same size, other bytes
    with pytest.raises(ObjectCorrupt):
        store.read_back(small)
    store.delete("datasets/x/g/archive.mrcz")
    with pytest.raises(ObjectMissing):
        store.read_back(receipt)


def test_s3_refuses_a_part_whose_checksum_does_not_match(s3):
    """The store verifies each part's CRC-32 on receipt (AWS S3 user guide, "Checking object integrity")."""
    from botocore.exceptions import ClientError

    store = s3.store
    upload_id = store.create_multipart("tus/u9")
    with pytest.raises(ClientError) as refused:
        store._client.upload_part(Bucket=store.bucket, Key=store._full("tus/u9"),
                                  UploadId=upload_id, PartNumber=1, Body=b"some bytes",
                                  ChecksumCRC32="AAAAAA==")
    assert refused.value.response["Error"]["Code"] in ("BadDigest", "InvalidRequest")
    store.abort_multipart("tus/u9", upload_id)
