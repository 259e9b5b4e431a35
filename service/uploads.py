"""What arrives with an upload besides its bytes: the file name (checked), the client's
digest of the body, and a multipart body parsed incrementally into its file part and
small companion parts. The bytes themselves go through :mod:`service.receiver`."""

from __future__ import annotations

import base64
import binascii
import re
from typing import AsyncIterator

from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from .errors import BadRequest, ServiceError, TooLarge
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\-]{0,199}$")


def check_filename(name: str) -> str:
    """A plain file name: no folders, no leading dot, a conservative character set (it
    becomes a path on disk and a Content-Disposition value)."""
    if not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise BadRequest(f"file name {name!r} is not allowed: use letters, digits and "
                         "'._+-', start with a letter or digit, at most 200 characters, "
                         "no folders")
    return name


def parse_digest(headers: dict[str, str]) -> str | None:
    """The client's SHA-256 of the body, hex, from ``X-Content-SHA256: <hex>`` or
    ``Content-Digest``/``Repr-Digest: sha-256=:<base64>:`` (RFC 9530) or
    ``Digest: SHA-256=<base64>`` (RFC 3230); None when none is sent."""
    value = headers.get("x-content-sha256")
    if value is not None:
        value = value.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise BadRequest("X-Content-SHA256 must be 64 hex digits")
        return value
    for name in ("content-digest", "repr-digest", "digest"):
        header = headers.get(name)
        if header is None:
            continue
        for item in header.split(","):
            algo, _, encoded = item.strip().partition("=")
            if algo.strip().lower() != "sha-256":
                continue
            try:
                raw = base64.b64decode(encoded.strip().strip(":"), validate=True)
            except binascii.Error:
                raise BadRequest(f"{name}: sha-256 value is not base64") from None
            if len(raw) != 32:
                raise BadRequest(f"{name}: sha-256 value must be 32 bytes")
            return raw.hex()
        raise BadRequest(f"{name} header carries no sha-256 digest (the only one supported)")
    return None


class MultipartFile:
    """The main file part of a ``multipart/form-data`` body, as an async stream of its
    bytes, parsed incrementally (python-multipart) straight from the request stream.

    Parts whose names say they are small text companions (``extra_suffixes``: SerialEM
    ``.mdoc``, Direct Electron ``_info.txt``), before or after the main file, are kept
    in :attr:`extras` (name -> bytes, each at most ``extra_max_bytes``).

    Bounds (413 ``too_large``, as soon as they are passed): the body counts whole against
    ``max_bytes`` (the file part, the companions, every other part and the framing:
    ``MRC_INGEST_MAX_UPLOAD_BYTES``), and it may have at most ``max_parts`` parts
    (``MRC_INGEST_MAX_MULTIPART_PARTS``), so few companions are ever held.
    python-multipart bounds each part's headers itself. None: no bound."""

    def __init__(self, content_type: str, body: AsyncIterator[bytes],
                 extra_suffixes: tuple[str, ...] = (), extra_max_bytes: int = 16 << 20,
                 *, max_bytes: int | None = None, max_parts: int | None = None):
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise BadRequest("expected a multipart/form-data body with a boundary "
                             "(curl -F file=@movie.mrc)")
        self.body = body
        self.filename: str | None = None
        self._chunks: list[bytes] = []
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._in_file = False
        self._file_done = False
        self._name_checked = False
        self.extra_suffixes, self.extra_max_bytes = extra_suffixes, extra_max_bytes
        self.extras: dict[str, bytes] = {}
        self._extra: tuple[str, list[bytes]] | None = None
        self.max_bytes, self.max_parts = max_bytes, max_parts
        self.received = 0  # bytes of the body so far, framing included
        self.parts = 0
        self._parser = MultipartParser(boundary, callbacks={
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        })

    def _part_begin(self) -> None:
        self.parts += 1
        if self.max_parts is not None and self.parts > self.max_parts:
            raise TooLarge(f"the multipart body has more than {self.max_parts} parts, the "
                           "limit (MRC_INGEST_MAX_MULTIPART_PARTS); nothing was stored")
        self._headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field = data[start:end].lower()

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._headers[self._field] = self._headers.get(self._field, b"") + data[start:end]

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        filename = options.get(b"filename")
        if filename is None:
            return
        name = filename.decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1]
        if self.extra_suffixes and name.lower().endswith(self.extra_suffixes):
            self._extra = (check_filename(name), [])
        elif self.filename is None and not self._file_done:
            self.filename = name
            self._in_file = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self._chunks.append(data[start:end])
        elif self._extra is not None:
            self._extra[1].append(data[start:end])
            if sum(map(len, self._extra[1])) > self.extra_max_bytes:
                raise TooLarge(f"{self._extra[0]}: at most {self.extra_max_bytes} bytes")

    def _part_end(self) -> None:
        if self._in_file:
            self._in_file, self._file_done = False, True
        elif self._extra is not None:
            self.extras[self._extra[0]] = b"".join(self._extra[1])
            self._extra = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.body:
            self.received += len(chunk)
            if self.max_bytes is not None and self.received > self.max_bytes:
                raise TooLarge(f"the multipart body is over the upload limit of "
                               f"{self.max_bytes} bytes (MRC_INGEST_MAX_UPLOAD_BYTES), "
                               "counting every part; nothing was stored")
            try:
                self._parser.write(chunk)
            except ServiceError:
                raise
            except Exception as exc:  # python-multipart's parse errors
                raise BadRequest(f"malformed multipart body: {exc}") from None
            if self.filename is not None and not self._name_checked:
                self.filename = check_filename(self.filename)  # before the bulk arrives
                self._name_checked = True
            if self._chunks:
                data, self._chunks = b"".join(self._chunks), []
                yield data
        self._parser.finalize()
        if self._chunks:
            data, self._chunks = b"".join(self._chunks), []
            yield data
        if self.filename is None:
            raise BadRequest("the multipart body has no file part (use -F file=@movie.mrc)")
        if not self._file_done:
            raise BadRequest("the multipart body ended inside the file part")
