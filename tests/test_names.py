"""Hostile file names at every door: 10,000 seeded names (quotes, backslashes, CR, LF,
NUL, right-to-left overrides, emoji, spaces, ';', '%', non-ASCII letters, names of
exactly 255 UTF-8 bytes) through PUT, multipart, tus creation and registration.

The rules. Never a 5xx, and every 4xx is ``{"error", "detail"}`` JSON. A client's name
(PUT path, multipart part header, tus ``Upload-Metadata``) is accepted exactly when
:func:`service.uploads.check_filename` accepts it (multipart first keeps the last
component of a client path, ``C:\\dir\\movie.mrc`` -> ``movie.mrc``), else refused
with 400. A file on shared storage keeps its real name, whatever it is, and every
download of it carries that name in a ``Content-Disposition`` that a standard parser
(``email`` with ``policy.HTTP``, which reads RFC 2231/8187 ``filename*``) reads back
exactly, with a plain-ASCII ``filename=`` fallback.

All 10,000 names go through each door's cheap path (a refusal, or an acceptance that
stops at a body that is no MRC, a folder or a hard link); a few dozen tiny real movies
go all the way and are downloaded (whole, a range, a conversion, a job result). The
cheap requests go through ``httpx.ASGITransport`` on the test client's own event loop:
about 0.7 ms a request instead of 2.5 ms through the TestClient's thread hop."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import time
from email import policy
from email.message import EmailMessage, Message
from pathlib import PurePath
from urllib.parse import quote

import httpx
import pytest

from service.api.downloads import content_disposition
from service.errors import BadRequest
from service.sidecars import SIDECAR_SUFFIXES
from service.uploads import check_filename
from tests.api_helpers import make_client, wait_job
from tests.reference import counting_movie, write_raw_mrc

SEED = 20261205
COUNT = 10_000
NAME_MAX = 255  # bytes of one path component (Linux NAME_MAX)
TUS = {"Tus-Resumable": "1.0.0"}

SAFE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
PIECES = {
    "quote": ['"', "'", '""', '\\"'],
    "backslash": ["\\", "\\\\", "C:\\Users\\me\\", "..\\"],
    "cr": ["\r"],
    "lf": ["\n", "\r\n"],
    "nul": ["\x00"],
    "rtl": ["\u202e", "\u202egpj.exe", "\u200f", "\u2066\u2069"],
    "emoji": ["\U0001F600", "\U0001F9EC", "\U0001F469\u200d\U0001F52C",
              "\U0001F1E9\U0001F1EA"],
    "space": [" ", "  ", "\t", "\u00a0"],
    "semicolon": [";", '; filename="evil.sh"', ";x=1"],
    "percent": ["%", "%22", "%0D%0A", "%2F", "%00", "100%"],
    "letters": ["\u00e9", "\u00fc", "\u00df", "\u00f8", "\u00c5ngstr\u00f6m", "\u0436",
                "\u4e2d", "\u65e5\u672c", "\u0639\u0631\u0628\u064a", "\u05d0", "\ufb01",
                "\uff2d", "e\u0301"],
    "control": ["\x01", "\x1b[31m", "\x7f", "\x85", "\u2028"],
    "slash": ["/", "../", "./"],
    "header": ["\r\nSet-Cookie: a=b", "\r\n\r\n<html>", "=?utf-8?q?evil?=", "*", "=", ","],
}
SUFFIXES = [".mrc", ".mrcz", ".mrc", ".tif", "", ".mrc ", ".MRC", ".mdoc", "_info.txt",
            ".mrc.", ".mrc\x00.png"]


def _word(rng: random.Random, low: int = 1, high: int = 12) -> str:
    return "".join(rng.choice(SAFE + "._+-") for _ in range(rng.randint(low, high)))


def _fill(rng: random.Random, name: str, size: int) -> str:
    """``name`` grown (or cut) to exactly ``size`` UTF-8 bytes: characters of 1 to 4
    bytes while there is room, then ASCII letters."""
    widths = ["a", "\u00e9", "\u202e", "\U0001F600", '"', "\\", " ", ";", "%", "\u4e2d"]
    while len(name.encode()) > size:
        name = name[:-1]
    while len(name.encode()) < size - 4:
        name += rng.choice(widths)
    while len(name.encode()) < size:
        name += rng.choice(SAFE)
    return name


def hostile_names(count: int = COUNT, seed: int = SEED) -> list[str]:
    """``count`` distinct names, reproducible from ``seed``: one in ten plain (what a
    client may send), one in ten exactly 255 UTF-8 bytes, one in fifty 256 bytes (one
    over), the rest plain words mixed with 1-6 hostile pieces and a suffix."""
    rng = random.Random(seed)
    kinds = list(PIECES)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        i = len(names)
        if i % 10 == 0:
            name = rng.choice(SAFE) + _word(rng, 0, 40) + rng.choice([".mrc", ".mrcz", ""])
        else:
            parts = [_word(rng, 0, 8)]
            for _ in range(rng.randint(1, 6)):
                parts.append(rng.choice(PIECES[rng.choice(kinds)]))
                parts.append(_word(rng, 0, 6))
            rng.shuffle(parts)
            name = "".join(parts) + rng.choice(SUFFIXES)
            if i % 10 == 9:
                name = _fill(rng, name, NAME_MAX)
            elif i % 50 == 7:
                name = _fill(rng, name, NAME_MAX + 1)
            else:
                name = _fill(rng, name, min(len(name.encode()), NAME_MAX))
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


NAMES = hostile_names()


def plain(name: str) -> bool:
    """What a client may call an upload (the service's rule, the one every door uses)."""
    try:
        return check_filename(name) == name
    except BadRequest:
        return False


def on_disk(name: str) -> bool:
    """A name a file can have on Linux: no NUL, no '/', not '.'/'..', at most 255 bytes."""
    return "\x00" not in name and "/" not in name and name not in ("", ".", "..") and \
        len(name.encode()) <= NAME_MAX


def test_the_names_are_hostile_enough():
    assert len(NAMES) == len(set(NAMES)) == COUNT
    assert NAMES == hostile_names()  # reproducible
    for kind, pieces in PIECES.items():
        having = sum(any(p in n for p in pieces) for n in NAMES)
        assert having >= 300, (kind, having)
    exact = sum(len(n.encode()) == NAME_MAX for n in NAMES)
    assert exact >= 900 and sum(len(n.encode()) > NAME_MAX for n in NAMES) >= 150
    assert 900 <= sum(map(plain, NAMES)) <= 2000  # both answers at every door
    assert sum(map(on_disk, NAMES)) >= 5000


# -- driving the app -------------------------------------------------------------------

def drive(client, requests):
    """Run ``requests(async_client)`` on the app's event loop; its answer."""
    async def main():
        transport = httpx.ASGITransport(app=client.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as ac:
            return await requests(ac)
    return client.portal.call(main)


def answer(response: httpx.Response, what: str) -> httpx.Response:
    """Never a 5xx; a 4xx is ``{"error", "detail"}`` JSON."""
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text}"
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            raise AssertionError(f"{what}: {response.status_code} not JSON: "
                                 f"{response.text!r}") from None
        assert set(body) == {"error", "detail"} and body["error"] and body["detail"], \
            (what, body)
    return response


def refused_name(response: httpx.Response, what: str) -> None:
    assert response.status_code == 400, (what, response.status_code, response.text)
    assert response.json()["error"] == "bad_request", (what, response.text)
    detail = response.json()["detail"]
    # a NUL byte in the URL is refused before any route (service/api RefuseNul)
    assert "is not allowed" in detail or detail == {
        "message": "the URL holds a NUL byte (%00)", "where": "url"}, (what, response.text)


NOT_MRC = b"not an MRC movie, " * 64  # past the 1024-byte header: refused as not MRC


# -- the client doors: all 10,000 names ------------------------------------------------

def test_put_names(tmp_path):
    async def run(ac):
        seen: dict[int, int] = {}
        for i, name in enumerate(NAMES):
            what = f"PUT name #{i} {name!r}"
            response = answer(await ac.put(f"/v1/uploads/{quote(name, safe='')}",
                                           content=NOT_MRC), what)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            if "/" in name or name in (".", ".."):
                continue  # another route, a redirect or none: any answer below 500
            if plain(name):  # accepted: refused next for its body, or kept as a sidecar
                assert response.status_code in (201, 415), (what, response.text)
            else:
                refused_name(response, what)
        return seen
    with make_client(tmp_path / "data") as c:
        seen = drive(c, run)
    assert seen.get(400, 0) > 6000 and seen.get(415, 0) > 800, seen


def _multipart(name: str, style: int) -> tuple[bytes, str]:
    """A multipart body whose file part is called ``name``: 0 as a quoted string with
    '\\' and '"' escaped and the rest raw UTF-8 (CR/LF included: hostile framing); 1 as
    browsers and httpx send it ('"' and control characters percent-encoded, '\\'
    escaped); 2 only as RFC 2231 ``filename*``, which RFC 7578 forbids (the server
    ignores it)."""
    boundary = "names-fuzz-b0undary"
    if style == 0:
        param = 'filename="' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    elif style == 1:
        encoded = "".join(f"%{ord(c):02X}" if c == '"' or (ord(c) < 0x20 and c != "\x1b")
                          else "\\\\" if c == "\\" else c for c in name)
        param = f'filename="{encoded}"'
    else:
        param = f"filename*=UTF-8''{quote(name, safe='')}"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; {param}\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + NOT_MRC + \
        f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def multipart_name(name: str, style: int) -> str | None:
    """The name the server should take from ``_multipart(name, style)`` (its last path
    component), None when it cannot be told (raw CR/LF/NUL break the part header)."""
    if style == 2:
        return ""  # no plain filename parameter: no file part
    if style == 0:
        if any(c in name for c in "\r\n\x00"):
            return None
        sent = name
    else:
        sent = "".join(f"%{ord(c):02X}" if c == '"' or (ord(c) < 0x20 and c != "\x1b")
                       else c for c in name)
    return sent.replace("\\", "/").rsplit("/", 1)[-1]


def test_multipart_names(tmp_path):
    async def run(ac):
        seen: dict[int, int] = {}
        for i, name in enumerate(NAMES):
            style = i % 3
            what = f"multipart style {style} name #{i} {name!r}"
            body, content_type = _multipart(name, style)
            response = answer(await ac.post("/v1/uploads", content=body,
                                            headers={"Content-Type": content_type}), what)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            expected = multipart_name(name, style)
            if expected is None:
                continue
            if plain(expected) and not expected.lower().endswith(SIDECAR_SUFFIXES):
                assert response.status_code == 415, (what, expected, response.text)
            else:
                assert response.status_code == 400, (what, expected, response.text)
                assert response.json()["error"] == "bad_request", (what, response.text)
        return seen
    with make_client(tmp_path / "data") as c:
        seen = drive(c, run)
    assert seen.get(400, 0) > 7000 and seen.get(415, 0) > 500, seen


def test_tus_names(tmp_path):
    async def run(ac):
        created = 0
        for i, name in enumerate(NAMES):
            what = f"tus name #{i} {name!r}"
            metadata = "filename " + base64.b64encode(name.encode()).decode()
            response = answer(await ac.post("/v1/tus/", headers={
                **TUS, "Upload-Length": "4096", "Upload-Metadata": metadata}), what)
            if plain(name):
                assert response.status_code == 201, (what, response.text)
                created += 1
                if created % 25 == 1:  # and terminated (the rest expire: time)
                    deleted = await ac.delete(response.headers["location"], headers=TUS)
                    assert answer(deleted, what).status_code == 204, (what, deleted.text)
            else:
                refused_name(response, what)
                assert response.headers["tus-resumable"] == "1.0.0"
        return created
    with make_client(tmp_path / "data") as c:
        created = drive(c, run)
    assert created == sum(map(plain, NAMES))


def test_registration_names(tmp_path):
    """Every name a file can have, as a hard link (refused: 403), a folder (422) or
    nothing (404) inside the allowed root; names over 255 bytes too (422)."""
    shared = tmp_path / "shared"
    folder = shared / "names"
    folder.mkdir(parents=True)
    anchor = shared / "anchor.mrc"
    anchor.write_bytes(NOT_MRC)
    asked = []
    for i, name in enumerate(NAMES):
        if "\x00" in name or "/" in name or name in (".", ".."):
            continue  # no such file name on disk (NUL in a path: see below)
        kind = "long" if len(name.encode()) > NAME_MAX else ("link", "folder", "none")[i % 3]
        if kind == "link":
            os.link(anchor, folder / name)
        elif kind == "folder":
            (folder / name).mkdir()
        asked.append((i, name, kind))
    assert len(asked) > 5000

    expected = {"link": (403, "path_not_allowed"), "folder": (422, "unprocessable"),
                "none": (404, "not_found"), "long": (422, "unprocessable")}

    async def run(ac):
        for i, name, kind in asked:
            what = f"registration of a {kind} named #{i} {name!r}"
            path = str(folder / name)
            response = answer(await ac.post("/v1/registrations", json={"path": path}), what)
            assert (response.status_code, response.json()["error"]) == expected[kind], \
                (what, response.text)
            assert repr(path) in response.json()["detail"], (what, response.text)
    with make_client(tmp_path / "data", allowed_roots=[shared]) as c:
        drive(c, run)
        assert c.get("/v1/datasets").json()["items"] == []


def test_registration_path_with_nul_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    with make_client(tmp_path / "data", allowed_roots=[shared]) as c:
        async def run(ac):
            return await ac.post("/v1/registrations", json={"path": f"{shared}/a\x00b.mrc"})
        response = drive(c, run)
    answer(response, "registration of a path with NUL")
    assert response.status_code in (404, 422), response.text


def test_registration_of_a_name_that_is_not_utf8(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    path = os.fsencode(shared) + b"/not-utf8-\xff\xfe.mrc"
    with open(path, "wb") as out:
        out.write(write_raw_mrc(tmp_path / "m.mrc", counting_movie((2, 8, 8)), 1).read_bytes())
    with make_client(tmp_path / "data", allowed_roots=[shared]) as c:
        async def run(ac):  # JSON carries it as \udcff\udcfe, as os.fsdecode gives it
            return await ac.post("/v1/registrations", content=json.dumps(
                {"path": os.fsdecode(path)}), headers={"Content-Type": "application/json"})
        response = drive(c, run)
    answer(response, "registration of a name that is not UTF-8")
    assert response.status_code == 422 and "not valid UTF-8" in response.json()["detail"]


# -- Content-Disposition ---------------------------------------------------------------

@pytest.mark.parametrize("name, header", [
    ("movie.mrc", 'attachment; filename="movie.mrc"'),
    ("a b;c.mrc", 'attachment; filename="a b;c.mrc"'),
    ("\u20ac rates", "attachment; filename*=UTF-8''%E2%82%AC%20rates; filename=\"_ rates\""),
    ('caf\u00e9 "1"\r\n.mrc',
     "attachment; filename*=UTF-8''caf%C3%A9%20%221%22%0D%0A.mrc; "
     'filename="cafe _1___.mrc"'),
    ("=?utf-8?q?x?=", "attachment; filename*=UTF-8''%3D%3Futf-8%3Fq%3Fx%3F%3D; "
                      'filename="=_utf-8_q_x_="'),
    ("100%.mrc", "attachment; filename*=UTF-8''100%25.mrc; filename=\"100_.mrc\""),
    ("bad\udcff.mrc", "attachment; filename*=UTF-8''bad%EF%BF%BD.mrc; filename=\"bad_.mrc\""),
    ("\U0001F600", "attachment; filename*=UTF-8''%F0%9F%98%80; filename=\"_\""),
])
def test_content_disposition(name, header):
    assert content_disposition(name) == header


# -- all the way: real movies with hostile names, and their downloads ------------------

def parsed_filename(response: httpx.Response, what: str) -> str:
    """The file name in the response's Content-Disposition, read with the standard
    library's RFC 2231-aware parser; the header must be one plain-ASCII line with a
    plain-ASCII ``filename=`` fallback that is safe to use as it is."""
    values = [v for k, v in response.headers.raw if k.lower() == b"content-disposition"]
    assert len(values) == 1, (what, response.headers)
    raw = values[0]
    assert all(0x20 <= b < 0x7F for b in raw), (what, raw)
    value = raw.decode("ascii")
    msg = EmailMessage(policy=policy.HTTP)
    msg["Content-Disposition"] = value
    header = msg["content-disposition"]
    assert header.content_disposition == "attachment", (what, value)
    legacy = Message()  # no filename*: what a client that knows only filename= sees
    legacy["Content-Disposition"] = value
    fallback = [v for k, v in legacy.get_params(header="content-disposition")[1:]
                if k == "filename" and isinstance(v, str)]
    assert len(fallback) == 1 and fallback[0], (what, value)
    assert not any(c in fallback[0] for c in '"\\%?/'), (what, value)
    return header.params["filename"]


def e2e_names() -> list[str]:
    """The names of real registered movies: for each hostile piece the first generated
    name holding it (that a file can have), 255-byte ones, and a few by hand."""
    chosen = ["a\r\nSet-Cookie: x=1; filename=\"evil.sh\".mrc", '"; filename="x.sh',
              "=?utf-8?q?evil?=.mrc", "\u202egpj.mrc", "caf\u00e9 \U0001F52C 100%;.mrc",
              " lead and trail .mrc ", "-rf", ".hidden.mrc", "back\\slash\\.mrc",
              "\u65e5\u672c\u8a9e\u306e\u30d5\u30a1\u30a4\u30eb", "%22%0D%0A.mrc"]
    for kind, pieces in PIECES.items():
        if kind in ("nul", "slash"):
            continue
        chosen.append(next(n for n in NAMES if on_disk(n) and any(p in n for p in pieces)
                           and n not in chosen))
    chosen.append(('x"\\;% \t' * 50)[:NAME_MAX - 4] + ".mrc")
    chosen.append(next(n for n in NAMES if len(n.encode()) == NAME_MAX and on_disk(n)
                       and "\U0001F600" in n))
    return list(dict.fromkeys(n for n in chosen if on_disk(n)))


def check_downloads(c, dataset: dict, raw: bytes, what: str, convert: bool) -> None:
    """The whole file, a range and (``convert``) a conversion, each named right."""
    name, url = dataset["name"], f"/v1/datasets/{dataset['id']}/download"
    whole = c.get(url)
    assert whole.status_code == 200, (what, whole.text)
    assert hashlib.sha256(whole.content).digest() == hashlib.sha256(raw).digest(), what
    assert parsed_filename(whole, what) == name, what
    part = c.get(url, headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == raw[:100], what
    assert parsed_filename(part, what) == name, what
    same = c.get(url, headers={"If-None-Match": whole.headers["etag"]})
    assert same.status_code == 304, what
    assert parsed_filename(same, what) == name, what
    if convert:
        converted = c.get(url, params={"mode": 6})
        assert converted.status_code == 200, (what, converted.text)
        assert parsed_filename(converted, what) == f"{PurePath(name).stem}.mode6.mrc", what


def test_hostile_names_all_the_way(tmp_path):
    """Registered movies keep their real names; uploads keep theirs (multipart: the
    last component of a client path); every download says so."""
    shared = tmp_path / "shared"
    (shared / "e2e").mkdir(parents=True)
    started = time.monotonic()
    names = e2e_names()
    assert len(names) >= 20
    movies = {}
    for k, name in enumerate(names):
        path = write_raw_mrc(shared / "e2e" / name, counting_movie((2, 8, 8), seed=k), 1)
        movies[name] = (path, path.read_bytes())

    def movie(k):  # an upload's own bytes (a twin would be a duplicate of another name)
        out = write_raw_mrc(tmp_path / f"upload{k}.mrc",
                            counting_movie((2, 8, 8), seed=1000 + k), 1)
        return out.read_bytes()

    with make_client(tmp_path / "data", allowed_roots=[shared]) as c:
        registered = []
        for name, (path, raw) in movies.items():
            response = c.post("/v1/registrations", json={"path": str(path)})
            assert response.status_code == 202, (name, response.text)
            assert response.json()["dataset"]["name"] == name
            registered.append((name, raw, response.json()))
        for name, raw, body in registered:
            assert wait_job(c, body["job"]["id"])["state"] == "done", name
            dataset = c.get(f"/v1/datasets/{body['dataset']['id']}").json()
            assert dataset["status"] == "ready" and dataset["name"] == name, dataset
            check_downloads(c, dataset, raw, f"registered {name!r}", convert=True)
        # a conversion job's result carries the converted name too
        name, _, body = registered[0]
        job = c.post("/v1/conversions", json={"dataset_id": body["dataset"]["id"],
                                              "mode": 6}).json()["job"]
        assert wait_job(c, job["id"])["state"] == "done"
        result = c.get(f"/v1/jobs/{job['id']}/result")
        assert result.status_code == 200, result.text
        assert parsed_filename(result, name) == f"{PurePath(name).stem}.mode6.mrc"

        uploads = []
        for k, name in enumerate(["movie.mrc", "A" * 196 + ".mrc", "x+y-z_1.2.mrcz",
                                  "0.mrc", "TS_01_003_-9.0.mrc"]):
            raw = movie(k)
            response = c.put(f"/v1/uploads/{quote(name, safe='')}", content=raw)
            uploads.append((name, raw, response))
        client_paths = [("C:\\Users\\me\\scope 1\\movie_m.mrc", "movie_m.mrc"),
                        ("../../etc/grid.mrc", "grid.mrc"),
                        ("plain+name.mrc", "plain+name.mrc")]
        for k, (sent, name) in enumerate(client_paths):
            raw = movie(10 + k)
            body, content_type = _multipart(sent, 0)
            body = body.replace(NOT_MRC, raw)
            response = c.post("/v1/uploads", content=body,
                              headers={"Content-Type": content_type})
            uploads.append((name, raw, response))
        for k, name in enumerate(["tus_movie.mrc", "B" * 200, "t.mrc"]):
            raw = movie(20 + k)
            created = c.post("/v1/tus/", headers={
                **TUS, "Upload-Length": str(len(raw)),
                "Upload-Metadata": "filename " + base64.b64encode(name.encode()).decode()})
            assert created.status_code == 201, (name, created.text)
            patched = c.patch(created.headers["location"], content=raw, headers={
                **TUS, "Upload-Offset": "0",
                "Content-Type": "application/offset+octet-stream"})
            assert patched.status_code == 204, (name, patched.text)
            uploads.append((name, raw, patched))
        for name, raw, response in uploads:
            assert response.status_code in (201, 204), (name, response.text)
            where = response.headers.get("location") or \
                response.headers["mrc-ingest-dataset"]
            dataset = c.get(where).json()
            for _ in range(500):
                if dataset["status"] in ("ready", "rejected", "failed"):
                    break
                time.sleep(0.02)
                dataset = c.get(where).json()
            assert dataset["status"] == "ready" and dataset["name"] == name, dataset
            check_downloads(c, dataset, raw, f"uploaded {name!r}", convert=name == "t.mrc")
    assert time.monotonic() - started < 40
