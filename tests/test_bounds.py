"""Bounds on what a request can make the service hold or do.

- A header declaring absurdly many frames (more than ``MRC_INGEST_MAX_FRAMES``), or many
  tiny ones (more than ``MRC_INGEST_MAX_SMALL_FRAMES`` under
  ``MRC_INGEST_MIN_FRAME_BYTES``), is refused as it arrives: 422 ``invalid_mrc`` whose
  finding names the field, the limit and the setting; nothing is stored. PUT,
  multipart, tus and registrations alike. Huge frames (NX x NY) are a finding on a
  rejected dataset, handled in bounded time and memory. Real shapes (a K3 movie, a
  particle stack of 10^5 small images) are within the defaults.
- A multipart body counts whole against ``MRC_INGEST_MAX_UPLOAD_BYTES`` (sidecars too)
  and has at most ``MRC_INGEST_MAX_MULTIPART_PARTS`` parts: 413, saying which limit.
- A JSON body (registrations, conversion requests) is at most ``MRC_INGEST_MAX_JSON_BYTES``:
  413, without reading the rest.
- ``POST /v1/registrations`` checks the token before it reads the body.

Wall-clock timeouts here are hang guards only, not performance assertions.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from service.auth import hash_token
from service.mrc.validate import FrameLimits, check_frame_limits, check_header_bytes
from tests.api_helpers import files_under, make_client, multipart, wait_job
from tests.reference import counting_movie, raw_header, synthetic, write_raw_mrc
from tests.test_api import error_of

HANG_GUARD = 120.0  # seconds; a request still unanswered after this is a hang
TUS = {"Tus-Resumable": "1.0.0"}
MiB = 1 << 20


def within(call, seconds: float = HANG_GUARD):
    """``call()``'s result, failing the test (not hanging it) when there is none in time."""
    out: dict = {}

    def run():
        try:
            out["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test below
            out["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no answer within {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def drive(client, requests):
    """Run ``requests(async_client)`` on the app's event loop, with httpx's ASGI transport
    (which, unlike the TestClient, streams a request body chunk by chunk)."""
    async def main():
        transport = httpx.ASGITransport(app=client.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as ac:
            return await requests(ac)
    return within(lambda: client.portal.call(main))


class Counted:
    """An async body of ``total`` bytes in ``chunk``-byte pieces (no Content-Length),
    remembering how much of it the server asked for."""

    def __init__(self, total: int, chunk: int = 64 << 10, fill: bytes = b" ",
                 head: bytes = b""):
        self.total, self.chunk, self.fill, self.head = total, chunk, fill, head
        self.sent = 0

    async def __aiter__(self):
        if self.head:
            self.sent += len(self.head)
            yield self.head
        while self.sent < self.total:
            piece = self.fill * min(self.chunk, self.total - self.sent)
            self.sent += len(piece)
            yield piece


def nothing_stored(client, data) -> None:
    assert files_under(data / "incoming") == []
    assert files_under(data / "datasets") == []
    assert client.get("/v1/datasets").json()["items"] == []



@pytest.fixture
def movie(tmp_path):
    return write_raw_mrc(tmp_path / "movie.mrc", counting_movie((4, 32, 48)), 101)


# -- absurd headers ----------------------------------------------------------------------

#: (what, NX, NY, NZ, mode, data bytes after the header, refused field or None: ingested)
ABSURD = [
    ("2e6 frames of 1x1", 1, 1, 2_000_000, 0, 2_000_000, "nz"),
    ("1e9 frames, tiny data", 1, 1, 10 ** 9, 0, 1000, "nz"),
    ("20000 frames of 4 bytes", 2, 2, 20_000, 0, 80_000, "nx"),
    ("max int everywhere", 2 ** 31 - 1, 2 ** 31 - 1, 2 ** 31 - 1, 2, 1000, "nz"),
    ("one 16 GiB frame, tiny data", 65536, 65536, 1, 2, 100_000, None),
]


def absurd_body(nx: int, ny: int, nz: int, mode: int, data: int) -> bytes:
    return raw_header(nx=nx, ny=ny, nz=nz, mode=mode) + bytes(range(256)) * (data // 256) \
        + bytes(data % 256)


def assert_refused(response, field: str) -> dict:
    detail = error_of(response, 422, "invalid_mrc")
    assert "nothing was stored" in detail["message"]
    [finding] = detail["findings"]
    assert (finding["severity"], finding["field"]) == ("error", field)
    if field == "nz":
        assert "NZ is" in finding["message"] and "over the limit of 100000 frames" in \
            finding["message"] and "MRC_INGEST_MAX_FRAMES" in finding["message"]
    else:
        for word in ("NX x NY", "NZ is", "10000", "MRC_INGEST_MAX_SMALL_FRAMES", "256 bytes",
                     "MRC_INGEST_MIN_FRAME_BYTES"):
            assert word in finding["message"], finding["message"]
    return detail


@pytest.mark.parametrize("what, nx, ny, nz, mode, data, field", ABSURD,
                         ids=[a[0] for a in ABSURD])
def test_an_absurd_header_is_refused_or_ingested_in_bounded_time(
        client, tmp_path, what, nx, ny, nz, mode, data, field):
    body = absurd_body(nx, ny, nz, mode, data)
    response = within(lambda: client.put("/v1/uploads/absurd.mrc", content=body))
    if field is not None:
        assert_refused(response, field)
        nothing_stored(client, tmp_path / "data")
    else:  # frames past the frame-by-frame limit: the bytes kept, the dataset rejected
        assert response.status_code == 201, response.text
        dataset = response.json()["dataset"]
        assert dataset["status"] == "rejected" and dataset["size_bytes"] == len(body)
        detail = client.get(f"/v1/datasets/{dataset['id']}").json()
        assert any("frame-by-frame" in f["message"] for f in detail["findings"])


@pytest.mark.parametrize("what, nx, ny, nz, mode, data, field",
                         [a for a in ABSURD if a[-1]][:3], ids=[a[0] for a in ABSURD[:3]])
def test_an_absurd_header_is_refused_in_multipart_and_tus(
        client, tmp_path, what, nx, ny, nz, mode, data, field):
    body = absurd_body(nx, ny, nz, mode, data)
    form, headers = multipart([("file", "absurd.mrc", body),
                               ("mdoc", "absurd.mrc.mdoc", b"[ZValue = 0]\n")])
    assert_refused(within(lambda: client.post("/v1/uploads", content=form,
                                              headers=headers)), field)
    nothing_stored(client, tmp_path / "data")
    # tus: refused once the header is in, and the upload terminated
    created = client.post("/v1/tus/", headers={**TUS, "Upload-Length": str(len(body))})
    url = created.headers["location"]
    refused = within(lambda: client.patch(url, content=body, headers={
        **TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}))
    assert_refused(refused, field)
    assert client.head(url, headers=TUS).status_code == 404
    nothing_stored(client, tmp_path / "data")
    assert list((tmp_path / "data" / "tus").iterdir()) == []


def test_an_absurd_header_resumed_past_the_header_is_refused(client, tmp_path):
    """A tus upload whose header came in an earlier PATCH of a stream that was lost: the
    door check on the stored first bytes applies the same limits."""
    body = absurd_body(1, 1, 2_000_000, 0, 4096)
    url = client.post("/v1/tus/", headers={**TUS, "Upload-Length": str(len(body))}
                      ).headers["location"]
    first = client.patch(url, content=body[:500], headers={
        **TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"})
    assert first.status_code == 204, first.text
    client.app.state.service.tus._streams.clear()  # as after a restart
    rest = within(lambda: client.patch(url, content=body[500:], headers={
        **TUS, "Upload-Offset": "500", "Content-Type": "application/offset+octet-stream"}))
    assert_refused(rest, "nz")
    assert client.head(url, headers=TUS).status_code == 404


def test_a_registered_absurd_file_fails_its_job_with_the_reason(client, shared):
    path = shared / "absurd.mrc"
    path.write_bytes(absurd_body(1, 1, 2_000_000, 0, 2_000_000))
    response = client.post("/v1/registrations", json={"path": str(path)})
    assert response.status_code == 202, response.text
    job = within(lambda: wait_job(client, response.json()["job"]["id"]))
    assert job["state"] == "failed" and job["error"]["error"] == "invalid_mrc"
    [finding] = job["error"]["detail"]["findings"]
    assert finding["field"] == "nz" and "MRC_INGEST_MAX_FRAMES" in finding["message"]


def test_the_frame_limits_are_settings(tmp_path):
    with make_client(tmp_path / "data", max_frames=6, max_small_frames=3,
                     min_frame_bytes=64) as c:
        ok = write_raw_mrc(tmp_path / "ok.mrc", synthetic(2, (6, 4, 4)), 2)  # 6 x 64 B
        assert c.put("/v1/uploads/ok.mrc", content=ok.read_bytes()).status_code == 201
        many = write_raw_mrc(tmp_path / "many.mrc", synthetic(2, (7, 4, 4)), 2)
        detail = error_of(c.put("/v1/uploads/many.mrc", content=many.read_bytes()), 422,
                          "invalid_mrc")
        assert "over the limit of 6 frames (MRC_INGEST_MAX_FRAMES)" in detail["message"]
        small = write_raw_mrc(tmp_path / "small.mrc", synthetic(2, (4, 2, 4)), 2)  # 32 B
        detail = error_of(c.put("/v1/uploads/small.mrc", content=small.read_bytes()), 422,
                          "invalid_mrc")
        assert "more than the 3 frames (MRC_INGEST_MAX_SMALL_FRAMES) of fewer than 64 " \
               "bytes (MRC_INGEST_MIN_FRAME_BYTES)" in detail["message"]
        few = write_raw_mrc(tmp_path / "few.mrc", synthetic(2, (3, 2, 4)), 2)
        assert c.put("/v1/uploads/few.mrc", content=few.read_bytes()).status_code == 201
    with make_client(tmp_path / "data2", min_frame_bytes=0, max_small_frames=0) as c:
        small = write_raw_mrc(tmp_path / "tiny.mrc", synthetic(0, (5, 1, 1)), 0)
        assert c.put("/v1/uploads/tiny.mrc", content=small.read_bytes()).status_code == 201


@pytest.mark.parametrize("what, nx, ny, nz, mode", [
    ("K3 movie, 4-bit", 5760, 4092, 1000, 101),
    ("K3 super-resolution, 8-bit", 11520, 8184, 200, 0),
    ("Falcon 4 EER-derived, 16-bit", 4096, 4096, 1000, 1),
    ("particle stack of 64x64 float32", 64, 64, 100_000, 2),
    ("particle stack of 16x16 float32", 16, 16, 100_000, 2),
    ("tilt series", 4096, 4096, 121, 2),
    ("10000 frames of 1 byte", 1, 1, 10_000, 0),
])
def test_the_default_limits_never_refuse_a_real_shape(what, nx, ny, nz, mode):
    from service.config import Settings

    layout, _ = check_header_bytes(raw_header(nx=nx, ny=ny, nz=nz, mode=mode))
    assert layout is not None
    assert check_frame_limits(layout, Settings().frame_limits) == []
    assert check_frame_limits(layout, FrameLimits()) == []  # no limits: nothing refused


def test_the_cutter_refuses_before_it_hands_on_a_piece():
    from service.mrc.stream import HeaderOverLimit, StreamCutter

    limits = FrameLimits(max_frames=10, min_frame_bytes=64, max_small_frames=2,
                         setting_prefix="X_")
    body = raw_header(nx=8, ny=8, nz=11, mode=0) + bytes(64 * 11)
    cutter = StreamCutter(limits=limits)
    pieces = []
    with pytest.raises(HeaderOverLimit) as refused:
        for piece in cutter.feed(body):
            pieces.append(piece)
    assert pieces == [] and cutter.layout is None
    assert [f.field for f in refused.value.findings] == ["nz"]
    assert "(X_MAX_FRAMES)" in str(refused.value)
    small = raw_header(nx=4, ny=4, nz=3, mode=0) + bytes(16 * 3)
    with pytest.raises(HeaderOverLimit, match="X_MIN_FRAME_BYTES"):
        list(StreamCutter(limits=limits).feed(small))
    fine = raw_header(nx=4, ny=4, nz=2, mode=0) + bytes(16 * 2)
    kinds = [p.kind for p in StreamCutter(limits=limits).feed(fine)]
    assert kinds == ["header", "extended", "frame", "frame"]


# -- multipart ---------------------------------------------------------------------------

def test_multipart_part_count_is_capped(client, tmp_path, movie):
    parts = [("file", "movie.mrc", movie.read_bytes())] + \
        [(f"f{i}", None, b"x") for i in range(999)]
    form, headers = multipart(parts)
    detail = error_of(within(lambda: client.post("/v1/uploads", content=form,
                                                 headers=headers)), 413, "too_large")
    assert "more than 16 parts" in detail and "MRC_INGEST_MAX_MULTIPART_PARTS" in detail
    nothing_stored(client, tmp_path / "data")
    # sidecars first, then the movie: the same count
    form, headers = multipart([(f"s{i}", f"movie{i}.mdoc", b"[ZValue = 0]\n")
                               for i in range(20)] + [("file", "movie.mrc",
                                                       movie.read_bytes())])
    detail = error_of(client.post("/v1/uploads", content=form, headers=headers), 413,
                      "too_large")
    assert "MRC_INGEST_MAX_MULTIPART_PARTS" in detail
    nothing_stored(client, tmp_path / "data")
    # 16 parts is fine; the fields that are no file are ignored
    form, headers = multipart(parts[:16])
    response = client.post("/v1/uploads", content=form, headers=headers)
    assert response.status_code == 201 and response.json()["dataset"]["status"] == "ready"


def test_multipart_conversions_and_particle_sets_are_capped_too(client, shared, movie):
    form, headers = multipart([("file", "movie.mrc", movie.read_bytes())] +
                              [(f"f{i}", None, b"x") for i in range(20)])
    assert "MRC_INGEST_MAX_MULTIPART_PARTS" in error_of(
        client.post("/v1/conversions", content=form, headers=headers, params={"mode": 1}),
        413, "too_large")
    form, headers = multipart([(f"f{i}", None, b"x") for i in range(20)] +
                              [("file", "p.cs", b"not a cs")])
    assert "MRC_INGEST_MAX_MULTIPART_PARTS" in error_of(
        client.post("/v1/particle-sets", content=form, headers=headers,
                    params={"folder": str(shared)}), 413, "too_large")


@pytest.mark.parametrize("sidecar_first", [False, True])
def test_multipart_sidecars_count_against_the_upload_limit(tmp_path, movie, sidecar_first):
    raw = movie.read_bytes()
    limit = len(raw) + 4096
    small = b"[ZValue = 0]\n"
    big = small + b"; padding\n" * 1000  # 10 kB: over the limit with the movie
    with make_client(tmp_path / "data", max_upload_bytes=limit) as c:
        def send(sidecar: bytes, declare: bool):
            parts = [("file", "movie.mrc", raw), ("mdoc", "movie.mrc.mdoc", sidecar)]
            form, headers = multipart(parts[::-1] if sidecar_first else parts)

            async def run(ac):
                if declare:  # Content-Length: refused before a byte is read
                    return await ac.post("/v1/uploads", content=form, headers=headers)

                async def chunked():  # no Content-Length: counted while it streams
                    for i in range(0, len(form), 1024):
                        yield form[i:i + 1024]
                return await ac.post("/v1/uploads", content=chunked(), headers=headers)
            return drive(c, run)

        streamed = send(big, declare=False)
        detail = error_of(streamed, 413, "too_large")
        assert f"over the upload limit of {limit} bytes (MRC_INGEST_MAX_UPLOAD_BYTES)" in \
            detail and "counting every part" in detail
        nothing_stored(c, tmp_path / "data")
        declared = error_of(send(big, declare=True), 413, "too_large")
        assert f"exceeds the limit of {limit} bytes" in declared
        nothing_stored(c, tmp_path / "data")
        for declare in (False, True):
            ok = send(small, declare)
            assert ok.status_code in (200, 201), ok.text
            assert ok.json()["sidecars"][0]["name"] == "movie.mrc.mdoc"


# -- JSON bodies -------------------------------------------------------------------------

@pytest.mark.parametrize("route", ["/v1/registrations", "/v1/conversions"])
def test_json_bodies_are_capped_and_not_read_past_the_cap(client, route):
    huge = Counted(100 * MiB, head=b'{"path": "/x", "dataset_id": "x", "pad": "')

    async def streamed(ac):
        return await ac.post(route, content=huge, headers={
            "Content-Type": "application/json"})
    detail = error_of(drive(client, streamed), 413, "too_large")
    assert detail == f"the JSON body is over the limit of {MiB} bytes " \
                     "(MRC_INGEST_MAX_JSON_BYTES)"
    assert huge.sent < 2 * MiB  # stopped at the cap, not at the end

    declared = Counted(100 * MiB)

    async def with_length(ac):
        return await ac.post(route, content=declared, headers={
            "Content-Type": "application/json", "Content-Length": str(100 * MiB)})
    detail = error_of(drive(client, with_length), 413, "too_large")
    assert detail.endswith(f"Content-Length is {100 * MiB}")
    assert declared.sent <= 64 << 10  # nothing read past what was already in flight


def test_json_bodies_within_the_cap_are_answered(client, shared):
    padding = " " * (MiB - 200)
    absent = str(shared / "absent.mrc")
    response = client.post("/v1/registrations", content=f'{{"path": "{absent}"{padding}}}',
                           headers={"Content-Type": "application/json"})
    assert "no such file or folder" in error_of(response, 404, "not_found")
    response = client.post("/v1/conversions", content=f'{{"dataset_id": "nope"{padding}}}',
                           headers={"Content-Type": "application/json"})
    assert error_of(response, 404, "not_found") == "no dataset 'nope'"


def test_the_json_cap_is_a_setting(tmp_path, shared):
    with make_client(tmp_path / "data", allowed_roots=[shared], max_json_bytes=2048) as c:
        body = '{"path": "/x"' + " " * 2048 + "}"
        detail = error_of(c.post("/v1/registrations", content=body,
                                 headers={"Content-Type": "application/json"}), 413,
                          "too_large")
        assert "over the limit of 2048 bytes (MRC_INGEST_MAX_JSON_BYTES)" in detail


# -- registrations: the token before the body ----------------------------------------------

def test_registration_checks_the_token_before_it_reads_the_body(tmp_path, shared):
    secrets = {"read": "mrci_bounds-read", "write": "mrci_bounds-write"}
    tokens = [{"name": role, "role": role, "sha256": hash_token(secret)}
              for role, secret in secrets.items()]
    with make_client(tmp_path / "data", tokens=tokens, allowed_roots=[shared]) as c:
        def post(role: str | None, **kwargs):
            headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
            if role:
                headers["Authorization"] = f"Bearer {secrets[role]}"
            return c.post("/v1/registrations", headers=headers, **kwargs)

        assert error_of(post(None, content=b"{" * 4096), 401, "unauthorized")
        assert error_of(post(None, content=b"{" * (4 * MiB)), 401, "unauthorized")
        assert error_of(post("read", content=b"{" * 4096), 403, "forbidden")
        # with the right token, the body is read and checked as before
        [problem] = error_of(post("write", content=b"{" * 4096), 422, "invalid_request")
        assert problem["where"].startswith("body.") and problem["message"] == \
            "JSON decode error"
        [problem] = error_of(post("write", json={}), 422, "invalid_request")
        assert problem["where"] == "body.path" and problem["message"] == "Field required"
        assert error_of(post("write", content=b"{" * (4 * MiB)), 413, "too_large")
        response = post("write", json={"path": str(shared / "absent.mrc")})
        assert "no such file or folder" in error_of(response, 404, "not_found")

        huge = Counted(100 * MiB, head=b"{")

        async def anonymous(ac):  # an anonymous caller cannot make it read anything
            return await ac.post("/v1/registrations", content=huge,
                                 headers={"Content-Type": "application/json"})
        assert drive(c, anonymous).status_code == 401
        assert huge.sent <= 1 + (64 << 10)


def test_the_registration_body_is_documented(client):
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/registrations"]["post"]["requestBody"]
    assert body["required"] is True
    fields = body["content"]["application/json"]["schema"]["properties"]
    assert set(fields) == {"path", "normalize", "session", "project"}


# -- the ordinary still works ----------------------------------------------------------------

def test_a_normal_movie_still_ingests(client, shared, movie):
    raw = movie.read_bytes()
    started = time.monotonic()
    put = within(lambda: client.put("/v1/uploads/movie.mrc", content=raw))
    assert put.status_code == 201 and put.json()["dataset"]["status"] == "ready"
    other = write_raw_mrc(shared / "other.mrc", counting_movie((3, 32, 48), seed=1), 101)
    form, headers = multipart([("file", "other.mrc", other.read_bytes()),
                               ("mdoc", "other.mrc.mdoc", b"[ZValue = 0]\nExposureTime = 1\n")])
    posted = client.post("/v1/uploads", content=form, headers=headers)
    assert posted.status_code == 201, posted.text
    assert posted.json()["sidecars"][0]["name"] == "other.mrc.mdoc"
    registered = write_raw_mrc(shared / "third.mrc", counting_movie((3, 32, 48), seed=2), 101)
    response = client.post("/v1/registrations", json={"path": str(registered)})
    assert response.status_code == 202, response.text
    assert wait_job(client, response.json()["job"]["id"])["state"] == "done"
    converted = client.post("/v1/conversions", json={"dataset_id": put.json()["dataset"]["id"],
                                                     "format": "mrcz"})
    assert converted.status_code == 202, converted.text
    assert time.monotonic() - started < HANG_GUARD
