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
    for headers in ({}, {"Authorization": "Basic dXNlcjpwdw=="}, {"Authorization": "Bearer"},
                    {"Authorization": "Bearer mrci_wrong"}):
        response = client.get("/v1/datasets", headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"] == "unauthorized"
        assert response.headers["www-authenticate"].startswith("Bearer")
    response = client.put("/v1/uploads/m.mrc", content=movie.read_bytes())
    assert response.status_code == 401
    assert files_under(client.app.state.service.storage.root / "datasets") == []


def test_roles(client, movie):
    assert client.put("/v1/uploads/m.mrc", content=movie.read_bytes(),
                      headers=bearer("reader")).status_code == 403
    up = client.put("/v1/uploads/m.mrc", content=movie.read_bytes(), headers=bearer("scope"))
    assert up.status_code == 202
    ds_id = up.json()["dataset"]["id"]
    job = up.json()["job"]["id"]
    client.headers.update(bearer("reader"))
    wait_job(client, job)
    for url in (f"/v1/datasets/{ds_id}", "/v1/datasets", f"/v1/datasets/{ds_id}/frames/0.png",
                f"/v1/datasets/{ds_id}/sum.png", f"/v1/datasets/{ds_id}/download",
                f"/v1/jobs/{job}", "/metrics"):
        assert client.get(url).status_code == 200, url
    forbidden = client.delete(f"/v1/datasets/{ds_id}")
    assert forbidden.status_code == 403
    assert forbidden.json() == {"error": "forbidden", "detail": "token 'reader' has role "
                                                                "read; this needs admin"}
    assert client.post("/v1/conversions", json={"dataset_id": ds_id}).status_code == 403
    assert client.get("/v1/jobs").status_code == 403
    client.headers.update(bearer("scope"))  # write includes read
    assert client.get(f"/v1/datasets/{ds_id}").status_code == 200
    assert client.post("/v1/conversions", json={"dataset_id": ds_id}).status_code == 202
    assert client.delete(f"/v1/datasets/{ds_id}").status_code == 403
    client.headers.update(bearer("boss"))
    assert len(client.get("/v1/jobs").json()["items"]) == 2
    assert client.get("/v1/jobs", params={"state": "bogus"}).status_code == 422
    assert client.delete(f"/v1/datasets/{ds_id}").status_code == 200


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

@pytest.mark.parametrize("name", ["..", "...mrc", "a%2F..%2Fb.mrc", "%2e%2e%2fetc%2fpasswd",
                                  "/etc/passwd", "nul%00.mrc", "back%5Cslash.mrc", "-rf",
                                  "%20lead.mrc", "x" * 201])
def test_client_file_names_never_become_paths(tmp_path, movie, name):
    with make_client(tmp_path / "data") as c:
        response = c.put(f"/v1/uploads/{name}", content=movie.read_bytes())
        assert 400 <= response.status_code < 500, (name, response.status_code)
        assert response.json()["error"] in ("bad_request", "not_found", "method_not_allowed")
        assert files_under(tmp_path / "data" / "datasets") == []
        assert files_under(tmp_path / "data" / "incoming") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "m.mrc"]


def test_multipart_names_lose_their_folders_and_never_overwrite(tmp_path, movie):
    other = write_raw_mrc(tmp_path / "o.mrc", counting_movie((2, 16, 16), seed=5), 101)
    with make_client(tmp_path / "data") as c:
        first = c.post("/v1/uploads", files={"file": ("../../escape.mrc", movie.read_bytes())})
        second = c.post("/v1/uploads", files={"file": ("escape.mrc", other.read_bytes())})
        assert first.status_code == second.status_code == 202
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
        assert response.status_code == 403
        assert "2 hard links" in response.json()["detail"]
    with make_client(tmp_path / "data2", allowed_roots=[root], allow_hard_links=True) as c:
        assert c.post("/v1/registrations",
                      json={"path": str(root / "linked.mrc")}).status_code == 202
