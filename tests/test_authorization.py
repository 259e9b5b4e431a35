"""Authorization on every route, read from the app itself.

What this proves:

- ``ROUTES`` names the least role of every (method, path) the app serves, and the app
  serves exactly those: a route added later without a row here fails
  ``test_every_route_has_an_expected_role``.
- For every row and every caller (no token, an unknown token, read, write, admin), with
  ids that do not exist: a caller below the least role gets 401 (no or unknown token,
  with ``WWW-Authenticate: Bearer``) or 403 (a lower role, naming the role needed), as
  ``{"error", "detail"}`` JSON, before anything looks the id up; a caller at or above it
  is never refused (any other status: 404, 400, 422 ...) and never gets a 5xx.
- A request body is not read before the token is checked (POST /v1/registrations
  reads its bounded body inside the handler, after the check).
- tus: OPTIONS (discovery) is open, as tus 1.0 has it (no Tus-Resumable, no credentials
  needed); create, HEAD, PATCH and DELETE need write; terminating a finished upload
  never deletes its dataset, so write may do it.
- End to end with real data: read reads (dataset, frame stats, previews, the download,
  a job and its result, a particle set) and changes nothing; write uploads, registers,
  verifies, converts and creates particle sets but deletes nothing; admin deletes.
"""

from __future__ import annotations

import base64
import time

import pytest

from service.auth import hash_token
from tests.api_helpers import make_client
from tests.reference import counting_movie, synthetic, write_raw_mrc

READ, WRITE, ADMIN = "read", "write", "admin"
RANK = {None: 0, "unknown": 0, READ: 1, WRITE: 2, ADMIN: 3}
CALLERS = (None, "unknown", READ, WRITE, ADMIN)  # a token is named after its role
SECRETS = {"unknown": "mrci_authz-nobody", READ: "mrci_authz-read",
           WRITE: "mrci_authz-write", ADMIN: "mrci_authz-admin"}
TUS = {"Tus-Resumable": "1.0.0"}

#: (method, path template) -> the least role it needs; None: open to anyone.
ROUTES: dict[tuple[str, str], str | None] = {
    # documentation, the dashboard page and its files: no data in them
    ("GET", "/openapi.json"): None, ("HEAD", "/openapi.json"): None,
    ("GET", "/docs"): None, ("HEAD", "/docs"): None,
    ("GET", "/docs/oauth2-redirect"): None, ("HEAD", "/docs/oauth2-redirect"): None,
    ("GET", "/redoc"): None, ("HEAD", "/redoc"): None,
    ("GET", "/"): None, ("GET", "/web/{name}"): None,
    # operations: probes cannot be asked for a token; metrics are the facility's business
    ("GET", "/healthz"): None, ("GET", "/metrics"): READ,
    # uploads and registrations
    ("PUT", "/v1/uploads/{filename}"): WRITE, ("POST", "/v1/uploads"): WRITE,
    ("POST", "/v1/registrations"): WRITE,
    # tus: discovery is open (tus 1.0: OPTIONS carries no Tus-Resumable, nor credentials)
    ("OPTIONS", "/v1/tus/"): None, ("OPTIONS", "/v1/tus/{upload_id}"): None,
    ("POST", "/v1/tus/"): WRITE, ("HEAD", "/v1/tus/{upload_id}"): WRITE,
    ("PATCH", "/v1/tus/{upload_id}"): WRITE, ("DELETE", "/v1/tus/{upload_id}"): WRITE,
    # the catalog
    ("GET", "/v1/datasets"): READ, ("GET", "/v1/datasets/{dataset_id}"): READ,
    ("GET", "/v1/datasets/{dataset_id}/frames/stats"): READ,
    ("GET", "/v1/datasets/{dataset_id}/frames/{k}.png"): READ,
    ("GET", "/v1/datasets/{dataset_id}/sum.png"): READ,
    ("GET", "/v1/datasets/{dataset_id}/download"): READ,
    ("POST", "/v1/datasets/{dataset_id}/verify"): WRITE,
    ("DELETE", "/v1/datasets/{dataset_id}"): ADMIN,
    # conversions and jobs
    ("POST", "/v1/conversions"): WRITE,
    ("GET", "/v1/jobs"): ADMIN, ("GET", "/v1/jobs/{job_id}"): READ,
    ("GET", "/v1/jobs/{job_id}/result"): READ,
    # particle sets
    ("POST", "/v1/particle-sets"): WRITE, ("GET", "/v1/particle-sets/{set_id}"): READ,
    ("GET", "/v1/particle-sets/{set_id}/particles"): READ,
    ("GET", "/v1/particle-sets/{set_id}/particles/{n}.png"): READ,
    ("GET", "/v1/particle-sets/{set_id}/export"): READ,
    ("DELETE", "/v1/particle-sets/{set_id}"): ADMIN,
    # sessions and projects: read lists and details; admin renames, moves and deletes
    ("GET", "/v1/sessions"): READ, ("GET", "/v1/sessions/{session_id}"): READ,
    ("GET", "/v1/projects"): READ,
    ("PATCH", "/v1/sessions/{session_id}"): ADMIN,
    ("DELETE", "/v1/sessions/{session_id}"): ADMIN,
    ("GET", "/v1/sessions/{session_id}/movies.star"): READ,
    ("GET", "/v1/sessions/{session_id}/movies.csv"): READ,
}

#: path parameters: plausible, and (but for the dashboard file) nowhere to be found
IDS = {"dataset_id": "01J0000000000000000000MISS", "job_id": "01J00000000000000000JOBMISS",
       "set_id": "01J00000000000000000SETMISS", "upload_id": "0" * 32,
       "session_id": "01J000000000000000SESSMISS",
       "filename": "movie.mrc", "k": "0", "n": "0", "name": "dashboard.js"}


def request_args(method: str, template: str, root) -> dict:
    """What a client would send besides the token (``root``: the allowed root)."""
    return {
        ("POST", "/v1/tus/"): {"headers": {**TUS, "Upload-Length": "2048",
                                           "Upload-Metadata": "filename bW92aWUubXJj"}},
        ("HEAD", "/v1/tus/{upload_id}"): {"headers": TUS},
        ("PATCH", "/v1/tus/{upload_id}"): {"content": b"\0" * 64, "headers": {
            **TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}},
        ("DELETE", "/v1/tus/{upload_id}"): {"headers": TUS},
        ("PUT", "/v1/uploads/{filename}"): {"content": b""},
        ("POST", "/v1/uploads"): {"files": {"file": ("movie.mrc", b"")}},
        ("POST", "/v1/registrations"): {"json": {"path": str(root / "absent.mrc")}},
        ("POST", "/v1/conversions"): {"json": {"dataset_id": IDS["dataset_id"]}},
        ("POST", "/v1/particle-sets"): {"params": {"folder": str(root)},
                                        "files": {"file": ("p.cs", b"not a .cs")}},
        ("PATCH", "/v1/sessions/{session_id}"): {"json": {"name": "renamed"}},
    }.get((method, template), {})


def auth(caller: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[caller]}"} if caller else {}


def served_routes(app) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves, with included routers flattened
    (FastAPI >= 0.16x keeps them lazily in ``app.routes``)."""
    try:
        from fastapi.routing import iter_route_contexts
        routes = list(iter_route_contexts(app.routes))
    except ImportError:  # older FastAPI: app.routes is already flat
        routes = list(app.routes)
    served = set()
    for route in routes:
        path, methods = getattr(route, "path", None), getattr(route, "methods", None)
        assert path and methods, f"{route!r} (a mount?) has no methods: give it rows here"
        served |= {(method, path) for method in methods}
    return served


def refused(response, caller: str | None, needed: str) -> None:
    """The response is the auth refusal for ``caller`` on a route needing ``needed``."""
    body = response.content and response.json()  # HEAD has no body
    if caller in (None, "unknown"):
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"].startswith("Bearer")
        why = "unknown token" if caller else "send 'Authorization: Bearer <token>'"
        assert not body or body == {"error": "unauthorized", "detail": why}, body
    else:
        assert response.status_code == 403, response.text
        assert not body or body == {"error": "forbidden", "detail": f"token {caller!r} has "
                                    f"role {caller}; this needs {needed}"}, body


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def client(tmp_path_factory, root):
    tokens = [{"name": who, "role": who, "sha256": hash_token(secret)}
              for who, secret in SECRETS.items() if who != "unknown"]
    with make_client(tmp_path_factory.mktemp("authz") / "data", tokens=tokens,
                     allowed_roots=[root]) as c:
        yield c


def test_every_route_has_an_expected_role(client):
    served = served_routes(client.app)
    missing = sorted(served - ROUTES.keys())
    assert not missing, "\n".join(f"route {m} {p} has no expected role in the table"
                                  for m, p in missing)
    stale = sorted(ROUTES.keys() - served)
    assert not stale, f"table rows for routes the app no longer serves: {stale}"


@pytest.mark.parametrize("caller", CALLERS, ids=lambda c: c or "no-token")
@pytest.mark.parametrize("method, template", list(ROUTES), ids=lambda x: x)
def test_route_x_token(client, root, method, template, caller):
    needed = ROUTES[method, template]
    args = request_args(method, template, root)
    headers = {**args.pop("headers", {}), **auth(caller)}
    response = client.request(method, template.format(**IDS), headers=headers, **args)
    if needed is not None and RANK[caller] < RANK[needed]:
        refused(response, caller, needed)
    else:
        assert response.status_code not in (401, 403, 405), response.text
        assert response.status_code < 500, response.text
        if response.status_code == 404 and response.content:  # the id, not the route
            assert response.json()["detail"] != "Not Found", "no route matched"


BODY_ROUTES = [("PUT", "/v1/uploads/{filename}"), ("POST", "/v1/uploads"),
               ("POST", "/v1/registrations"),
               ("POST", "/v1/conversions"), ("POST", "/v1/particle-sets"),
               ("POST", "/v1/tus/"), ("PATCH", "/v1/tus/{upload_id}")]


@pytest.mark.parametrize("caller", (None, READ), ids=lambda c: c or "no-token")
@pytest.mark.parametrize("method, template", BODY_ROUTES)
def test_a_body_is_not_read_before_the_token_is_checked(client, method, template, caller):
    response = client.request(method, template.format(**IDS), content=b"{" * 4096,
                              headers={**TUS, "Content-Type": "application/json",
                                       **auth(caller)})
    refused(response, caller, WRITE)


# -- tus --------------------------------------------------------------------------------

def test_tus_discovery_is_open_and_the_rest_needs_write(client, root):
    discovery = [client.options(url, headers=auth(caller)) for caller in (None, READ)
                 for url in ("/v1/tus/", f"/v1/tus/{IDS['upload_id']}")]
    for response in discovery:  # the same for any id: no hint whether an upload exists
        assert response.status_code == 204 and response.headers["tus-version"] == "1.0.0"
        assert "tus-resumable" not in response.headers
        assert response.headers["tus-max-size"] == discovery[0].headers["tus-max-size"]
    path = write_raw_mrc(root / "tus.mrc", counting_movie((2, 16, 16), seed=3), 101)
    data = path.read_bytes()
    create = {**TUS, "Upload-Length": str(len(data)),
              "Upload-Metadata": "filename " + base64.b64encode(b"tus.mrc").decode()}
    for caller in (None, READ):
        refused(client.post("/v1/tus/", headers={**create, **auth(caller)}), caller, WRITE)
    made = client.post("/v1/tus/", headers={**create, **auth(WRITE)})
    assert made.status_code == 201, made.text
    url = made.headers["location"]
    patch = {**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
    for caller in (None, READ):
        for response in (client.head(url, headers={**TUS, **auth(caller)}),
                         client.patch(url, content=data, headers={**patch, **auth(caller)}),
                         client.delete(url, headers={**TUS, **auth(caller)})):
            refused(response, caller, WRITE)
            assert response.headers["tus-resumable"] == "1.0.0"  # errors too
    assert client.head(url, headers={**TUS, **auth(WRITE)}).headers["upload-offset"] == "0"
    done = client.patch(url, content=data, headers={**patch, **auth(WRITE)})
    assert done.status_code == 204, done.text
    dataset = done.headers["mrc-ingest-dataset"]
    assert client.get(dataset, headers=auth(READ)).status_code == 200
    # Terminating a finished upload forgets the upload, never its dataset: write may.
    assert client.delete(url, headers={**TUS, **auth(WRITE)}).status_code == 204
    assert client.head(url, headers={**TUS, **auth(WRITE)}).status_code == 404
    assert client.get(dataset, headers=auth(READ)).status_code == 200
    refused(client.delete(dataset, headers=auth(WRITE)), WRITE, ADMIN)
    assert client.delete(dataset, headers=auth(ADMIN)).status_code == 200


# -- end to end ---------------------------------------------------------------------------

def finished(client, job_id: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}", headers=auth(READ)).json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['state']}"
        time.sleep(0.02)


def test_read_reads_write_writes_admin_deletes(client, root):
    movie = write_raw_mrc(root / "e2e.mrc", counting_movie((2, 16, 16), seed=7), 101)
    data = movie.read_bytes()
    refused(client.put("/v1/uploads/e2e.mrc", content=data, headers=auth(READ)), READ, WRITE)
    up = client.put("/v1/uploads/e2e.mrc", content=data, headers=auth(WRITE))
    assert up.status_code in (201, 202), up.text
    ds = up.json()["dataset"]["id"]
    if up.json()["job"]:
        assert finished(client, up.json()["job"]["id"])["state"] == "done"
    base = f"/v1/datasets/{ds}"
    for url in (base, f"{base}/frames/stats", f"{base}/frames/0.png", f"{base}/sum.png",
                "/v1/datasets", "/metrics"):
        assert client.get(url, headers=auth(READ)).status_code == 200, url
    download = client.get(f"{base}/download", headers=auth(READ))
    assert download.status_code == 200 and download.content == data
    # read changes nothing
    for response in (
            client.post("/v1/registrations", json={"path": str(movie)}, headers=auth(READ)),
            client.post(f"{base}/verify", headers=auth(READ)),
            client.post("/v1/conversions", json={"dataset_id": ds, "format": "mrc",
                                                 "mode": 1}, headers=auth(READ)),
            client.post("/v1/particle-sets", params={"folder": str(root)},
                        files={"file": ("p.cs", b"")}, headers=auth(READ))):
        refused(response, READ, WRITE)
    refused(client.delete(base, headers=auth(READ)), READ, ADMIN)
    refused(client.get("/v1/jobs", headers=auth(READ)), READ, ADMIN)
    # write: registers, verifies, converts; read fetches the result; write deletes nothing
    registered = client.post("/v1/registrations", json={"path": str(movie)},
                             headers=auth(WRITE))
    assert registered.status_code in (200, 202), registered.text
    verify = client.post(f"{base}/verify", headers=auth(WRITE))
    assert verify.status_code == 202, verify.text
    assert finished(client, verify.json()["id"])["state"] == "done"
    conversion = client.post("/v1/conversions", json={"dataset_id": ds, "format": "mrc",
                                                      "mode": 1}, headers=auth(WRITE))
    assert conversion.status_code == 202, conversion.text
    job = conversion.json()["job"]["id"]
    assert finished(client, job)["state"] == "done"
    assert client.get(f"/v1/jobs/{job}/result", headers=auth(READ)).status_code == 200
    refused(client.delete(base, headers=auth(WRITE)), WRITE, ADMIN)
    refused(client.get("/v1/jobs", headers=auth(WRITE)), WRITE, ADMIN)
    # admin: everything
    assert client.get("/v1/jobs", headers=auth(ADMIN)).status_code == 200
    assert client.delete(base, headers=auth(ADMIN)).json() == {"deleted": ds}
    assert client.get(base, headers=auth(READ)).status_code == 404


def test_particle_sets_read_write_admin(client, root):
    from tests.test_particles import make_cs

    folder = root / "extract"
    folder.mkdir()
    write_raw_mrc(folder / "a_particles.mrc", synthetic(2, (3, 12, 12)), 2,
                  cella=(12.72, 12.72, 1))
    cs = make_cs([("J5/extract/a_particles.mrc", k) for k in (2, 0, 1)])
    upload = {"params": {"folder": str(folder)}, "files": {"file": ("P1_J5.cs", cs)}}
    refused(client.post("/v1/particle-sets", headers=auth(READ), **upload), READ, WRITE)
    created = client.post("/v1/particle-sets", headers=auth(WRITE), **upload)
    assert created.status_code == 201, created.text
    base = created.headers["location"]
    for url in (base, f"{base}/particles", f"{base}/particles/0.png", f"{base}/export"):
        assert client.get(url, headers=auth(READ)).status_code == 200, url
    refused(client.delete(base, headers=auth(READ)), READ, ADMIN)
    refused(client.delete(base, headers=auth(WRITE)), WRITE, ADMIN)
    assert client.delete(base, headers=auth(ADMIN)).status_code == 200
    assert client.get(base, headers=auth(READ)).status_code == 404
