"""Access: bearer tokens with roles (read < write < admin), hashed at rest; loopback-only
without tokens; client file names never become paths; registrations cannot escape the
allowed roots by '..', symlinks or hard links."""

from __future__ import annotations

import hashlib
import os

import pytest

from service.auth import Role, TokenSpec, hash_token
from service.cli import main as cli_main
from service.config import Settings
from tests.api_helpers import files_under, make_client, wait_job
from tests.test_api import error_of
from tests.reference import counting_movie, write_raw_mrc

TOKENS = {"reader": "mrci_read-secret", "scope": "mrci_write-secret",
          "boss": "mrci_admin-secret"}
ROLES = {"reader": "read", "scope": "write", "boss": "admin"}


def bearer(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[who]}"}


@pytest.fixture
def movie(tmp_path):
    return write_raw_mrc(tmp_path / "m.mrc", counting_movie((2, 16, 16)), 101)


@pytest.fixture
def client(tmp_path):
    tokens = [{"name": who, "role": ROLES[who], "sha256": hash_token(secret)}
              for who, secret in TOKENS.items()]
    with make_client(tmp_path / "data", tokens=tokens, allowed_roots=[tmp_path]) as c:
        yield c


def test_requests_without_a_valid_token_get_401(client, movie):
    ask = "send 'Authorization: Bearer <token>'"
    for headers, why in (({}, ask), ({"Authorization": "Basic dXNlcjpwdw=="}, ask),
                         ({"Authorization": "Bearer"}, ask),
                         ({"Authorization": "Bearer mrci_wrong"}, "unknown token")):
        response = client.get("/v1/datasets", headers=headers)
        assert error_of(response, 401, "unauthorized") == why, headers
        assert response.headers["www-authenticate"] == 'Bearer realm="mrc-ingest"'
    response = client.put("/v1/uploads/m.mrc", content=movie.read_bytes())
    assert error_of(response, 401, "unauthorized") == ask
    assert files_under(client.app.state.service.storage.root / "datasets") == []


def needs(response, who: str, role: str) -> None:
    assert error_of(response, 403, "forbidden") == \
        f"token {who!r} has role {ROLES[who]}; this needs {role}"


def test_roles(client, movie):
    needs(client.put("/v1/uploads/m.mrc", content=movie.read_bytes(),
                     headers=bearer("reader")), "reader", "write")
    up = client.put("/v1/uploads/m.mrc", content=movie.read_bytes(), headers=bearer("scope"))
    assert up.status_code == 201
    ds_id = up.json()["dataset"]["id"]
    job = up.json()["job"]["id"]
    client.headers.update(bearer("reader"))
    wait_job(client, job)
    for url in (f"/v1/datasets/{ds_id}", "/v1/datasets", f"/v1/datasets/{ds_id}/frames/0.png",
                f"/v1/datasets/{ds_id}/sum.png", f"/v1/datasets/{ds_id}/download",
                f"/v1/jobs/{job}", "/metrics"):
        assert client.get(url).status_code == 200, url
    forbidden = client.delete(f"/v1/datasets/{ds_id}")
    assert forbidden.json() == {"error": "forbidden", "detail": "token 'reader' has role "
                                                                "read; this needs admin"}
    needs(client.post("/v1/conversions", json={"dataset_id": ds_id}), "reader", "write")
    needs(client.get("/v1/jobs"), "reader", "admin")
    client.headers.update(bearer("scope"))  # write includes read
    assert client.get(f"/v1/datasets/{ds_id}").json()["id"] == ds_id
    assert client.post("/v1/conversions", json={"dataset_id": ds_id}).status_code == 202
    needs(client.delete(f"/v1/datasets/{ds_id}"), "scope", "admin")
    client.headers.update(bearer("boss"))
    assert sorted(j["kind"] for j in client.get("/v1/jobs").json()["items"]) == \
        ["convert", "upload"]
    [problem] = error_of(client.get("/v1/jobs", params={"state": "bogus"}), 422,
                         "invalid_request")
    assert (problem["where"], problem["input"]) == ("query.state", "bogus")
    assert client.delete(f"/v1/datasets/{ds_id}").json() == {"deleted": ds_id}


def test_open_endpoints(client):
    client.headers.pop("Authorization", None)
    assert client.get("/healthz").status_code == 200
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_tokens_are_hashes_in_settings(monkeypatch):
    entry = {"name": "scope1", "role": "write", "sha256": hash_token("s3cret")}
    monkeypatch.setenv("MRC_INGEST_TOKENS", f'[{{"name": "scope1", "role": "write", '
                                            f'"sha256": "{entry["sha256"]}"}}]')
    settings = Settings()
    assert settings.tokens == [TokenSpec(**entry)]
    assert settings.tokens[0].role is Role.WRITE
    assert "s3cret" not in settings.model_dump_json()
    with pytest.raises(ValueError):
        TokenSpec(name="x", role="root", sha256="0" * 64)
    with pytest.raises(ValueError):
        TokenSpec(name="x", role="read", sha256="plain-text-token")


def test_token_command_prints_a_token_and_its_hash(capsys):
    assert cli_main(["token", "--name", "scope1", "--role", "write"]) == 0
    out = capsys.readouterr().out.splitlines()
    token = out[0].rsplit(" ", 1)[1]
    assert token.startswith("mrci_") and len(token) > 40
    assert hashlib.sha256(token.encode()).hexdigest() in out[1]


def test_serve_refuses_the_network_without_tokens(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("MRC_INGEST_TOKENS", raising=False)
    code = cli_main(["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)])
    assert code == 2
    assert "refusing to listen on 0.0.0.0 without API tokens" in capsys.readouterr().err


# -- names and paths -------------------------------------------------------------------

# A name that decodes to a slash is a different route (no such endpoint: 404); any other
# name reaches the upload and is refused by name (400), quoted as decoded.
@pytest.mark.parametrize("name, refused_as", [
    ("..", None), ("...mrc", "...mrc"), ("a%2F..%2Fb.mrc", None),
    ("%2e%2e%2fetc%2fpasswd", None), ("/etc/passwd", None), ("nul%00.mrc", "nul\x00.mrc"),
    ("back%5Cslash.mrc", "back\\slash.mrc"), ("-rf", "-rf"), ("%20lead.mrc", " lead.mrc"),
    ("x" * 201, "x" * 201)])
def test_client_file_names_never_become_paths(tmp_path, movie, name, refused_as):
    with make_client(tmp_path / "data") as c:
        response = c.put(f"/v1/uploads/{name}", content=movie.read_bytes())
        if refused_as is None:
            assert error_of(response, 404, "not_found") == "Not Found"
        elif "\x00" in refused_as:  # refused before any route: no URL holds a NUL
            assert error_of(response, 400, "bad_request") == {
                "message": "the URL holds a NUL byte (%00)", "where": "url"}
        else:
            assert error_of(response, 400, "bad_request").startswith(
                f"file name {refused_as!r} is not allowed")
        assert files_under(tmp_path / "data" / "datasets") == []
        assert files_under(tmp_path / "data" / "incoming") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "m.mrc"]


def test_multipart_names_lose_their_folders_and_never_overwrite(tmp_path, movie):
    other = write_raw_mrc(tmp_path / "o.mrc", counting_movie((2, 16, 16), seed=5), 101)
    with make_client(tmp_path / "data") as c:
        first = c.post("/v1/uploads", files={"file": ("../../escape.mrc", movie.read_bytes())})
        second = c.post("/v1/uploads", files={"file": ("escape.mrc", other.read_bytes())})
        assert first.status_code == second.status_code == 201
        stored = files_under(tmp_path / "data" / "datasets")
    originals = [p for p in stored if p.name == "escape.mrc"]
    assert len(originals) == 2 and originals[0].parent != originals[1].parent
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in originals}
    assert digests == {hashlib.sha256(movie.read_bytes()).hexdigest(),
                       hashlib.sha256(other.read_bytes()).hexdigest()}
    assert not (tmp_path / "escape.mrc").exists()


def test_registration_cannot_escape_by_hard_link(tmp_path, movie):
    root = tmp_path / "shared"
    root.mkdir()
    os.link(movie, root / "linked.mrc")
    with make_client(tmp_path / "data", allowed_roots=[root]) as c:
        response = c.post("/v1/registrations", json={"path": str(root / "linked.mrc")})
        detail = error_of(response, 403, "path_not_allowed")
        assert f"{str(root / 'linked.mrc')!r} has 2 hard links" in detail
        assert "MRC_INGEST_ALLOW_HARD_LINKS" in detail
    with make_client(tmp_path / "data2", allowed_roots=[root], allow_hard_links=True) as c:
        response = c.post("/v1/registrations", json={"path": str(root / "linked.mrc")})
        assert response.status_code == 202, response.text
        ds = c.get(response.headers["location"]).json()
        assert (ds["source"], ds["name"]) == ("registration", "linked.mrc")
