"""The datastore in an S3-compatible object store (AWS S3, SeaweedFS, MinIO, Ceph RGW).

Objects live under ``s3://<bucket>/<prefix>/<key>``. Facts this module is built on
(AWS S3 API reference and user guide, "Uploading and copying objects using multipart
upload"; ARCHITECTURE.md):

- A multipart upload's parts are at least 5 MiB except the last, at most 10,000 of them,
  numbered 1-10,000 and uploadable in any order; ``CompleteMultipartUpload`` assembles
  them by number and the object appears atomically. With the default 8 MiB parts an
  object can reach 8 MiB x 10,000 = 78 GiB; a store for larger objects needs a larger
  ``part_bytes`` (a writer does not know its size in advance, so it cannot grow them).
- An incomplete upload keeps its parts, and costs storage, until it is aborted: every
  failure path here aborts, and :meth:`S3Store.sweep_multipart_uploads` aborts what a
  crashed process left (the analogue of ``sweep_abandoned`` for the local folder).
- A GET whose range starts at or past the end answers 416 ``InvalidRange``.
- Since boto3 1.36 the SDK attaches a CRC32 to every PutObject/UploadPart by default;
  when an upload declares a checksum algorithm, ``CompleteMultipartUpload`` must repeat
  each part's checksum, and SeaweedFS 4.48's ListParts does not report them. We use the
  classic protocol (``request_checksum_calculation="when_required"``), which every S3
  implementation speaks for everything else. Content is checked with CRC-32 sent by
  us (AWS S3 user guide, "Checking object integrity"): every part and every single PUT carries ``ChecksumCRC32``,
  which the store verifies on receipt (a mismatch is ``BadDigest``); a multipart upload
  is created with ``ChecksumAlgorithm=CRC32`` and completed with each part's checksum,
  so the store reports the object's composite checksum (CRC-32 of the parts' CRC-32s,
  ``"...-N"``) on a HEAD with ``ChecksumMode=ENABLED``: :meth:`S3Store.read_back`
  compares it with the one computed here, without reading the object back. The tus
  layer records each part's checksum with its ETag, since SeaweedFS 4.48's ListParts
  does not report them.

Errors: a missing object is :class:`ObjectMissing`; an endpoint that does not answer,
times out, answers 5xx or throttles, a missing bucket and rejected credentials are
:class:`StoreUnavailable` (HTTP 503 at the API); anything else is :class:`StoreError`
naming the S3 operation and error code.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple
from urllib.parse import urlsplit

import boto3
import numpy as np
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError,
                                 CredentialRetrievalError, HTTPClientError,
                                 IncompleteReadError, NoCredentialsError,
                                 PartialCredentialsError)

from ..mrc.buffers import copy_into
from ..mrc.checksum import crc32
from .base import (DataStore, ObjectCorrupt, ObjectInfo, ObjectMissing, Receipt, StoreError,
                   StoreUnavailable, check_key, crc32_text)

log = logging.getLogger(__name__)

MIN_PART_BYTES = 5 << 20
MAX_PARTS = 10_000
DEFAULT_PART_BYTES = 8 << 20
#: DeleteObjects takes at most this many keys per request
DELETE_BATCH = 1000

#: transport failures: the endpoint is down, unreachable, or cut the connection
_TRANSPORT_ERRORS = (ConnectionError, HTTPClientError, IncompleteReadError)
_CREDENTIAL_ERRORS = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)
#: S3 error codes meaning "not now" or "not with this configuration" rather than a
#: problem with the request: the whole store is unusable until someone acts
_UNAVAILABLE_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "NoSuchBucket",
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"})
_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
#: loose on purpose (some S3 implementations allow capitals and underscores); it
#: catches URLs with a port or user in place of a bucket
_BUCKET = re.compile(r"[A-Za-z0-9._-]{3,255}")


class MultipartUploadMissing(ObjectMissing):
    """No such multipart upload (completed, aborted, swept or never made)."""


class PartInfo(NamedTuple):
    """A part of a multipart upload: number, size, ETag and (when it was sent with one)
    its CRC-32 as S3 spells it."""

    number: int
    size: int
    etag: str
    crc32: str | None = None


def composite_crc32(part_crcs: list[str]) -> str:
    """The checksum S3 reports for a multipart object whose parts were sent with these
    CRC-32s: the CRC-32 of their concatenated bytes, then ``-<parts>``."""
    import base64

    joined = b"".join(base64.b64decode(c) for c in part_crcs)
    return f"{crc32_text(crc32(joined))}-{len(part_crcs)}"


class PendingUpload(NamedTuple):
    """An incomplete multipart upload: its key (without the store prefix), its id and
    when it was started (seconds since the epoch, by the store's clock)."""

    key: str
    upload_id: str
    initiated: float


def _under(prefix: str, key: str) -> bool:
    """Whether ``key`` is under ``prefix`` the way a folder is: ``a/b`` holds ``a/b`` and
    ``a/b/c`` but not ``a/bc`` (the local store's semantics; S3 prefixes are textual)."""
    return not prefix or prefix.endswith("/") or key == prefix or key.startswith(prefix + "/")


class S3Store(DataStore):
    """Objects in an S3 bucket under a key prefix.

    ``url`` is ``s3://bucket`` or ``s3://bucket/prefix``; ``endpoint_url`` None means AWS.
    Credentials and region come from boto3's usual chain (``AWS_*`` variables, shared
    config, instance roles) or from ``session``; the region defaults to us-east-1. A
    writer keeps at most ``parallel_parts`` parts uploading at once; see
    :class:`S3Writer` for its memory. Timeouts are in seconds; ``max_attempts`` counts
    the first try (botocore's "standard" retries: jittered exponential backoff).
    """

    kind = "s3"

    def __init__(self, url: str, *, endpoint_url: str | None = None,
                 region: str | None = None, part_bytes: int = DEFAULT_PART_BYTES,
                 parallel_parts: int = 4, connect_timeout: float = 5.0,
                 read_timeout: float = 60.0, max_attempts: int = 3,
                 session: boto3.session.Session | None = None):
        parts = urlsplit(url)
        if (parts.scheme != "s3" or not _BUCKET.fullmatch(parts.netloc) or parts.query
                or parts.fragment):
            raise ValueError(f"an S3 storage URL looks like s3://bucket/prefix, not {url!r}")
        if part_bytes < MIN_PART_BYTES:
            raise ValueError(f"part_bytes must be at least {MIN_PART_BYTES} (S3's minimum "
                             f"for every part but the last), not {part_bytes}")
        if parallel_parts < 1:
            raise ValueError("parallel_parts must be at least 1")
        self.bucket = parts.netloc
        prefix = parts.path.strip("/")
        self.prefix = check_key(prefix) + "/" if prefix else ""
        self.endpoint_url = endpoint_url
        self.part_bytes = part_bytes
        self.parallel_parts = parallel_parts
        self._upload_threads = 4 * parallel_parts  # shared by all writers of this store
        session = session or boto3.session.Session()
        self.region = region or session.region_name or "us-east-1"
        options = {}
        if "request_checksum_calculation" in Config.OPTION_DEFAULTS:  # botocore >= 1.36
            options["request_checksum_calculation"] = "when_required"  # module notes
        config = Config(
            region_name=self.region, connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            max_pool_connections=self._upload_threads + 16,
            # Path-style for other implementations (SeaweedFS, MinIO want it); AWS
            # chooses itself (it is retiring path-style).
            s3={"addressing_style": "path" if endpoint_url else "auto"}, **options)
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._warned_no_checksums = False

    # -- naming and errors ------------------------------------------------------------

    def describe(self) -> str:
        return f"S3 s3://{self.bucket}/{self.prefix} at {self.endpoint_url or 'AWS'}"

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def _full(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _unavailable(self, reason: str) -> StoreUnavailable:
        where = self.endpoint_url or f"AWS ({self.region})"
        return StoreUnavailable(f"S3 store unavailable (endpoint {where}, bucket "
                                f"{self.bucket}): {reason}")

    @contextmanager
    def _translated(self, operation: str, key: str | None = None) -> Iterator[None]:
        """Turn what boto3 raises into the datastore's errors (module notes)."""
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "?"))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code == "NoSuchUpload":
                raise MultipartUploadMissing(f"{key}: {error.get('Message', code)}") from exc
            if code in _MISSING_CODES and key is not None:
                raise ObjectMissing(key) from exc
            if code in _UNAVAILABLE_CODES or status >= 500:
                raise self._unavailable(f"{operation} answered {code}") from exc
            raise StoreError(f"S3 {operation} of {key or self.bucket!r} failed: {code} "
                             f"({error.get('Message', '')})") from exc
        except _TRANSPORT_ERRORS as exc:
            raise self._unavailable(f"{operation}: {exc}") from exc
        except _CREDENTIAL_ERRORS as exc:
            raise self._unavailable(f"no usable credentials: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"S3 {operation} of {key or self.bucket!r} failed: {exc}") from exc

    # -- whole objects -----------------------------------------------------------------

    def open_writer(self, key: str, *, reserve_head: int = 0) -> S3Writer:
        return S3Writer(self, key, reserve_head)

    def put_object(self, key: str, data: bytes | bytearray) -> str:
        """One PutObject: the object appears whole or not at all. The store checks the
        CRC-32 sent with it; returns that checksum."""
        crc = crc32_text(crc32(data))
        with self._translated("PutObject", key):
            self._client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data,
                                    ChecksumCRC32=crc)
        return crc

    def read_back(self, receipt: Receipt) -> None:
        """Compare the object's size and the checksum the store keeps for it (HEAD with
        ``ChecksumMode=ENABLED``) with the receipt's; no byte is read again."""
        try:
            with self._translated("HeadObject", receipt.key):
                head = self._client.head_object(Bucket=self.bucket,
                                                Key=self._full(receipt.key),
                                                ChecksumMode="ENABLED")
        except ObjectMissing:
            raise
        if head.get("ChecksumCRC32") is None:  # a store that keeps no checksums
            if not self._warned_no_checksums:
                self._warned_no_checksums = True
                log.warning("the S3 store reports no object checksums: read-back checks "
                            "sizes only")
            found = receipt.checksum
        else:
            found = f"crc32:{head['ChecksumCRC32']}"
        if head["ContentLength"] != receipt.size or found != receipt.checksum:
            raise ObjectCorrupt(f"{receipt.key}: the store holds {head['ContentLength']} "
                                f"bytes ({found}), {receipt.size} ({receipt.checksum}) "
                                "were written")

    def copy(self, source: str, target: str) -> int:
        """Server-side copy (multipart for large objects, by boto3's transfer manager)."""
        size = self.size(source)
        if size is None:
            raise ObjectMissing(source)
        with self._translated("CopyObject", source):
            self._client.copy({"Bucket": self.bucket, "Key": self._full(source)},
                              self.bucket, self._full(target))
        return size

    def put_file(self, key: str, path: Path) -> int:
        """Upload the local file through a writer (parallel parts), then remove it."""
        path = Path(path)
        writer = self.open_writer(key)
        try:
            with open(path, "rb") as f:
                while block := f.read(self.part_bytes):
                    writer.write(block)
        except BaseException:
            writer.abort()
            raise
        size = writer.commit()
        path.unlink()
        return size

    def read_range(self, key: str, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes from ``offset``: fewer at the end, none past it."""
        if offset < 0 or n < 0:
            raise ValueError(f"bad range: offset {offset}, length {n}")
        if n == 0:
            if self.size(key) is None:
                raise ObjectMissing(key)
            return b""
        response = self._get(key, offset, n)
        if response is None:
            return b""
        with self._translated("GetObject", key):
            return response["Body"].read()

    def read_into(self, key: str, offset: int, view: memoryview) -> int:
        """Fill ``view`` from ``offset`` with one ranged GET; returns the bytes read
        (fewer at the end)."""
        if not len(view):
            return 0
        response = self._get(key, offset, len(view))
        if response is None:
            return 0
        done = 0
        with self._translated("GetObject", key):
            body = response["Body"]
            while done < len(view):
                n = body.readinto(view[done:])
                if not n:
                    break
                done += n
            body.read()  # reach the end, so the connection goes back to the pool
        return done

    def _get(self, key: str, offset: int, n: int) -> dict | None:
        """A ranged GET's response, or None when the range starts past the end."""
        with self._translated("GetObject", key):
            try:
                return self._client.get_object(Bucket=self.bucket, Key=self._full(key),
                                               Range=f"bytes={offset}-{offset + n - 1}")
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                    return None
                raise

    def source(self, key: str) -> S3Source:
        size = self.size(key)
        if size is None:
            raise ObjectMissing(key)
        return S3Source(self, key, size)

    def size(self, key: str) -> int | None:
        try:
            with self._translated("HeadObject", key):
                head = self._client.head_object(Bucket=self.bucket, Key=self._full(key))
        except ObjectMissing:
            return None
        return head["ContentLength"]

    def delete(self, key: str) -> None:
        with self._translated("DeleteObject", key):
            self._client.delete_object(Bucket=self.bucket, Key=self._full(key))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self._client.get_paginator("list_objects_v2")
        start = len(self.prefix)
        with self._translated("ListObjectsV2", prefix):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", ()):
                    key = item["Key"][start:]
                    if _under(prefix, key):
                        yield ObjectInfo(key, item["Size"], item["LastModified"].timestamp())

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix`` (DeleteObjects, 1,000 keys a request)
        and abort the multipart uploads in progress there (as the local store removes
        writers' temporaries)."""
        keys = [info.key for info in self.list(prefix)]
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": self._full(key)} for key in keys[start:start + DELETE_BATCH]]
            with self._translated("DeleteObjects", prefix):
                response = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if errors := response.get("Errors"):
                first = errors[0]
                raise StoreError(f"S3 DeleteObjects under {prefix!r} failed for "
                                 f"{len(errors)} keys, e.g. {first.get('Key')}: "
                                 f"{first.get('Code')} ({first.get('Message', '')})")
        self.sweep_multipart_uploads(prefix, older_than_seconds=0)
        return len(keys)

    def ping(self) -> None:
        """HeadBucket; whatever goes wrong means the store cannot be used."""
        try:
            with self._translated("HeadBucket"):
                try:
                    self._client.head_bucket(Bucket=self.bucket)
                except ClientError as exc:
                    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                    reason = {404: "the bucket does not exist",
                              403: "access denied (check the credentials)"}.get(
                                  status, f"HeadBucket answered {status}")
                    raise self._unavailable(reason) from exc
        except StoreUnavailable:
            raise
        except StoreError as exc:
            raise self._unavailable(str(exc)) from exc

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self._client.close()

    # -- multipart primitives (also for the resumable-upload layer) ---------------------

    def create_multipart(self, key: str) -> str:
        """Start a multipart upload for ``key`` whose parts carry CRC-32 checksums;
        returns its upload id."""
        with self._translated("CreateMultipartUpload", key):
            return self._client.create_multipart_upload(
                Bucket=self.bucket, Key=self._full(key),
                ChecksumAlgorithm="CRC32")["UploadId"]

    def upload_part(self, key: str, upload_id: str, part_number: int,
                    data: bytes | bytearray | memoryview) -> PartInfo:
        """Upload part ``part_number`` (1-10,000) with its CRC-32, which the store checks
        on receipt. Every part but the last must be at least 5 MiB, which S3 checks
        only at completion."""
        if not 1 <= part_number <= MAX_PARTS:
            raise ValueError(f"part numbers run from 1 to {MAX_PARTS}, not {part_number}")
        if isinstance(data, memoryview):
            data = data.tobytes()
        crc = crc32_text(crc32(data))
        with self._translated("UploadPart", key):
            etag = self._client.upload_part(Bucket=self.bucket, Key=self._full(key),
                                            UploadId=upload_id, PartNumber=part_number,
                                            Body=data, ChecksumCRC32=crc)["ETag"]
        return PartInfo(part_number, len(data), etag, crc)

    def list_parts(self, key: str, upload_id: str) -> list[PartInfo]:
        """The parts uploaded so far, by number."""
        paginator = self._client.get_paginator("list_parts")
        parts = []
        with self._translated("ListParts", key):
            for page in paginator.paginate(Bucket=self.bucket, Key=self._full(key),
                                           UploadId=upload_id):
                parts += [PartInfo(p["PartNumber"], p["Size"], p["ETag"],
                                   p.get("ChecksumCRC32"))
                          for p in page.get("Parts", ())]
        return sorted(parts)

    def complete_multipart(self, key: str, upload_id: str,
                           parts: Iterable[tuple]) -> int:
        """Assemble ``parts`` (number, size, ETag and, when sent with one, CRC-32) into
        the object, which appears atomically. Returns its size."""
        parts = sorted(PartInfo(*part) for part in parts)
        with self._translated("CompleteMultipartUpload", key):
            self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=self._full(key), UploadId=upload_id,
                MultipartUpload={"Parts": [
                    {"PartNumber": p.number, "ETag": p.etag,
                     **({"ChecksumCRC32": p.crc32} if p.crc32 else {})} for p in parts]})
        return sum(p.size for p in parts)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Drop the upload and its parts; an upload already gone is fine."""
        self._abort(self._full(key), upload_id)

    def _abort(self, full_key: str, upload_id: str) -> None:
        try:
            with self._translated("AbortMultipartUpload", full_key):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=full_key,
                                                    UploadId=upload_id)
        except MultipartUploadMissing:
            pass

    def stale_multipart_uploads(self, prefix: str,
                                older_than_seconds: float) -> list[PendingUpload]:
        """Incomplete uploads under ``prefix`` started more than ``older_than_seconds``
        ago (ListMultipartUploads)."""
        cutoff = time.time() - older_than_seconds
        paginator = self._client.get_paginator("list_multipart_uploads")
        start = len(self.prefix)
        stale = []
        with self._translated("ListMultipartUploads", prefix):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for upload in page.get("Uploads", ()):
                    key, initiated = upload["Key"][start:], upload["Initiated"].timestamp()
                    if _under(prefix, key) and initiated <= cutoff:
                        stale.append(PendingUpload(key, upload["UploadId"], initiated))
        return stale

    def sweep_multipart_uploads(self, prefix: str, older_than_seconds: float) -> int:
        """Abort the incomplete uploads :meth:`stale_multipart_uploads` finds (those a
        crashed writer or an abandoned resumable upload left); returns how many. Keep
        ``older_than_seconds`` above the longest upload a client may pause."""
        stale = self.stale_multipart_uploads(prefix, older_than_seconds)
        for upload in stale:
            self.abort_pending(upload)
        return len(stale)

    def abort_pending(self, upload: PendingUpload) -> None:
        """Abort one upload :meth:`stale_multipart_uploads` listed. Listed keys may fall
        outside check_key's grammar (other tools write to buckets too), so they go back
        to S3 as they came."""
        self._abort(self.prefix + upload.key, upload.upload_id)

    def _upload_pool(self) -> ThreadPoolExecutor:
        """The threads that upload writers' parts, started on first use."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._upload_threads,
                                                thread_name_prefix="s3-part")
            return self._pool


class S3Writer:
    """An :class:`ObjectWriter` streaming into a multipart upload.

    Bytes gather in a part buffer; each full part goes to the store's thread pool, at
    most ``parallel_parts`` at a time (``write`` blocks while that many are in flight:
    back-pressure). With ``reserve_head`` the first part stays in memory until commit,
    when the head is filled in and it is uploaded as part 1 (parts may arrive in any
    order). Memory is at most ``(parallel_parts + 2) x part_bytes``: the parts in
    flight, the one filling and the held first part. An object smaller than one part is
    a single PutObject at commit; no multipart upload is made for it. Any failure aborts
    the upload, so no parts are left behind.
    """

    def __init__(self, store: S3Store, key: str, reserve_head: int):
        check_key(key)
        if not 0 <= reserve_head < store.part_bytes:
            raise ValueError(f"reserve_head must be below the part size "
                             f"({store.part_bytes}), not {reserve_head}")
        self.key = key
        self.written = 0
        self._store = store
        self._reserve = reserve_head
        self._part_bytes = store.part_bytes
        self._buffer = bytearray(self._part_bytes)
        self._fill = reserve_head  # the head's place stays zero until commit
        self._held_first: bytearray | None = None
        self._next_number = 1
        self._upload_id: str | None = None
        self._parts: list[tuple[int, int, Future]] = []
        self._slots = threading.BoundedSemaphore(store.parallel_parts)
        self._failure: BaseException | None = None
        self._closed = False
        self.receipt: Receipt | None = None

    def write(self, data: bytes | memoryview) -> None:
        self._check_open()
        view = memoryview(data).cast("B")
        size = view.nbytes
        try:
            while view:
                take = min(self._part_bytes - self._fill, len(view))
                copy_into(self._buffer, self._fill, view[:take])
                self._fill += take
                view = view[take:]
                if self._fill == self._part_bytes:
                    self._part_full()
        except BaseException:
            self.abort()
            raise
        self.written += size

    def commit(self, head: bytes | None = None, *, durable: bool = True) -> int:
        self._check_open()  # durable or not: a completed upload is what the store keeps
        try:
            if head is not None and len(head) != self._reserve:
                raise ValueError(f"head of {len(head)} bytes for a reserve of "
                                 f"{self._reserve}")
            tail = self._buffer
            del tail[self._fill:]
            first = self._held_first if self._held_first is not None else tail
            if head is not None:
                first[:self._reserve] = head
            if self._upload_id is None:  # it all fits in memory: one request
                whole = tail if first is tail else first + tail
                checksum = self._store.put_object(self.key, whole)
            else:
                if self._held_first is not None:
                    self._submit(1, self._held_first)
                if tail:
                    self._submit(self._next_number, tail)
                self._held_first = self._buffer = None
                parts = sorted(future.result() for _, _, future in self._parts)
                self._store.complete_multipart(self.key, self._upload_id, parts)
                checksum = composite_crc32([p.crc32 for p in parts])
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._held_first = self._buffer = None
        self.receipt = Receipt(self.key, self._reserve + self.written, f"crc32:{checksum}")
        return self._reserve + self.written

    def abort(self) -> None:
        """Cancel queued parts, let running ones finish, abort the upload. If the store
        cannot be reached the upload stays for the sweep; abort itself does not raise."""
        if self._closed:
            return
        self._closed = True
        self._held_first = self._buffer = None
        futures = [future for _, _, future in self._parts]
        for future in futures:
            future.cancel()
        wait(futures)  # S3 may keep a part that lands after the abort
        if self._upload_id is not None:
            try:
                self._store.abort_multipart(self.key, self._upload_id)
            except StoreError as exc:
                log.warning("could not abort the multipart upload of %s (%s); "
                            "sweep_multipart_uploads will: %s",
                            self.key, self._upload_id, exc)

    # -- internals --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the writer of {self.key} is already committed or aborted")

    def _part_full(self) -> None:
        part, number = self._buffer, self._next_number
        self._next_number += 1
        if number == 1 and self._reserve:
            self._held_first = part
        else:
            self._submit(number, part)
        self._buffer, self._fill = bytearray(self._part_bytes), 0

    def _submit(self, number: int, data: bytearray) -> None:
        """Hand a part to the pool once a slot is free (this wait is the back-pressure)."""
        if number > MAX_PARTS:
            raise StoreError(f"{self.key} outgrew {MAX_PARTS} parts of "
                             f"{self._part_bytes} bytes; configure larger parts")
        self._raise_failure()
        if self._upload_id is None:
            self._upload_id = self._store.create_multipart(self.key)
        self._slots.acquire()
        self._raise_failure()
        try:
            future = self._store._upload_pool().submit(
                self._store.upload_part, self.key, self._upload_id, number, data)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(self._part_done)
        self._parts.append((number, len(data), future))

    def _part_done(self, future: Future) -> None:
        self._slots.release()
        if not future.cancelled() and future.exception() is not None:
            self._failure = self._failure or future.exception()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure


class S3Source:
    """A :class:`ByteSource` over an object: ranged GETs, the size taken once by HEAD.
    Reads past the end come back short, as from a file. Threads may share one."""

    def __init__(self, store: S3Store, key: str, size: int):
        self._store = store
        self.key = key
        self.name = store.uri(key)
        self.size = size

    def _clamp(self, offset: int, n: int) -> int:
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        return max(0, min(n, self.size - offset))

    def read_at(self, offset: int, n: int) -> bytes:
        n = self._clamp(offset, n)
        return self._store.read_range(self.key, offset, n) if n else b""

    def readinto_at(self, buffer: np.ndarray, offset: int) -> int:
        view = memoryview(buffer).cast("B")
        return self._store.read_into(self.key, offset, view[:self._clamp(offset, len(view))])

    def close(self) -> None:
        pass

