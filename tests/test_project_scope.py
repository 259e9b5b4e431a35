"""Tokens limited to projects (issue #20, item 3), on every route the app serves.

One app holds two projects, ``alpha`` and ``beta``, each with a ready movie in a named
session, a finished conversion job, a tus upload in progress and a particle set. Tokens:
read and write limited to alpha, write limited to beta, write limited to both, write
without projects, admin.

What this proves:

- ``CASES`` holds a scoping case for every (method, path) the app serves, read from the
  app itself: a route added later without one fails ``test_every_route_has_a_scoping_case``.
- For every route, a token of alpha naming beta's resource (its dataset, session, job,
  upload, particle set, or ``project=beta`` on a write) gets 404 with a
  ``{"error": "not_found", ...}`` body, and neither that body nor the headers hold any of
  beta's names or ids but the one asked for; a write naming beta creates nothing (the
  catalog's rows and the admin token's lists are the same after it); and the same token
  gets its own alpha resource. Routes that need admin refuse the token for its role
  (403) before any lookup; open routes (documents, the dashboard page, probes, tus
  discovery) hold nothing of any project.
- Lists (datasets, sessions, projects) show alpha's rows only; ``?session=<beta's>`` on
  /v1/datasets and ``?project=beta`` on /v1/sessions show nothing; a token of both
  projects, one without projects and admin see both; /metrics (facility-wide) is 404 to a
  project-limited token.
- A write without a project from a one-project token lands in that project, on every
  arrival path; from a two-project token it is refused with 422 naming ``project``.
- A sidecar sent by an alpha token never attaches to beta's movie of the same name, and
  a beta movie never takes an alpha sidecar waiting for its name.
- Bytes identical to beta's movie, uploaded by alpha, never answer with beta's dataset.
- ``mrc-ingest token --project a --project b`` prints an entry the settings accept, with
  ``"projects": ["a", "b"]``; ``--project`` with ``--role admin`` is refused.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import sqlalchemy as sa

from service.auth import hash_token
from service.catalog.schema import (datasets, jobs, particle_sets, sessions, sidecars,
                                    tus_uploads)
from service.cli import main as cli_main
from service.config import Settings
from tests.api_helpers import make_client
from tests.reference import counting_movie, synthetic, write_raw_mrc
from tests.test_authorization import served_routes

ALPHA, BETA = "alpha", "beta"
SECRETS = {"alpha_read": "mrci_scope-alpha-read", ALPHA: "mrci_scope-alpha",
           BETA: "mrci_scope-beta", "both": "mrci_scope-both", "all": "mrci_scope-all",
           "admin": "mrci_scope-admin"}
TOKENS = [
    {"name": "alpha_read", "role": "read", "projects": [ALPHA]},
    {"name": ALPHA, "role": "write", "projects": [ALPHA]},
    {"name": BETA, "role": "write", "projects": [BETA]},
    {"name": "both", "role": "write", "projects": [ALPHA, BETA]},
    {"name": "all", "role": "write"},
    {"name": "admin", "role": "admin"},
]
TUS = {"Tus-Resumable": "1.0.0"}
PATCH_HEADERS = {**TUS, "Content-Type": "application/offset+octet-stream"}
FRAME = 128  # bytes of one 16 x 16 frame of a 4-bit movie
#: a project nobody has, and ids nothing has: what "does not exist" answers
GAMMA = "gamma"
MISSING = {"dataset_id": "01J0000000000000000000MISS", "job_id": "01J00000000000000000JOBMISS",
           "set_id": "01J00000000000000000SETMISS", "upload_id": "0" * 32,
           "session_id": "01J000000000000000SESSMISS", "k": "0", "n": "0",
           "filename": "missing.mrc", "name": "dashboard.js"}


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[who]}"}


def tus_metadata(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


@dataclass
class World:
    client: Any
    root: Path
    #: per project: the ids a route template may need
    ids: dict[str, dict[str, str]] = field(default_factory=dict)
    #: per project: every name and id of it a response could leak
    secrets: dict[str, set[str]] = field(default_factory=dict)
    seed: int = 100

    def call(self, who: str, method: str, url: str, headers: dict | None = None, **kw):
        return self.client.request(method, url, headers={**(headers or {}), **auth(who)},
                                   **kw)

    def movie(self, name: str, project: str = "") -> Path:
        """A new tiny 4-bit movie (new bytes every time) under the shared root."""
        self.seed += 1
        folder = self.root / (project or "misc")
        folder.mkdir(exist_ok=True)
        return write_raw_mrc(folder / name, counting_movie((2, 16, 16), seed=self.seed), 101)

    def rows(self) -> dict[str, Any]:
        """What exists: row counts of the catalog's tables, and the admin's lists."""
        engine = self.client.app.state.service.catalog.engine
        with engine.connect() as conn:
            counts = {t.name: conn.execute(sa.select(sa.func.count()).select_from(t))
                      .scalar() for t in (datasets, sessions, sidecars, particle_sets,
                                          tus_uploads, jobs)}
        listed = self.call("admin", "GET", "/v1/datasets", params={"limit": 1000}).json()
        sessions_listed = self.call("admin", "GET", "/v1/sessions",
                                    params={"limit": 1000, "sort": "name"}).json()
        return {**counts, "datasets listed": sorted(d["id"] for d in listed["items"]),
                "sessions listed": sorted(s["id"] for s in sessions_listed["items"]),
                "projects": self.call("admin", "GET", "/v1/projects").json()["items"]}

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        return self.call("admin", "GET", f"/v1/datasets/{dataset_id}").json()

    def wait_job(self, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.call("admin", "GET", f"/v1/jobs/{job_id}").json()
            if job["state"] in ("done", "failed", "cancelled"):
                return job
            assert time.monotonic() < deadline, f"job {job_id} still {job['state']}"
            time.sleep(0.02)

    def stacks(self, project: str) -> Path:
        folder = self.root / project / "extract"
        if not folder.is_dir():
            folder.mkdir(parents=True)
            write_raw_mrc(folder / "a_particles.mrc", synthetic(2, (3, 12, 12)), 2,
                          cella=(12.72, 12.72, 1))
        return folder


def particle_cs() -> bytes:
    from tests.test_particles import make_cs

    return make_cs([("J5/extract/a_particles.mrc", k) for k in (2, 0, 1)])


def build(world: World, project: str) -> None:
    """The project's movie (in its session), conversion job, tus upload in progress and
    particle set, made by its own token."""
    who, session = project, f"{project}-session"
    movie = world.movie(f"{project}_movie.mrc", project)
    up = world.call(who, "PUT", f"/v1/uploads/{movie.name}", content=movie.read_bytes(),
                    params={"project": project, "session": session})
    assert up.status_code == 201, up.text
    dataset = up.json()["dataset"]
    assert (dataset["project"], dataset["status"]) == (project, "ready"), dataset
    # its .mdoc (a pixel size and a voltage: it can go in a movies STAR file)
    side = world.call(who, "PUT", f"/v1/uploads/{movie.name}.mdoc",
                      content=b"PixelSpacing = 0.83\nVoltage = 300\n",
                      params={"project": project})
    assert side.status_code == 201 and side.json()["dataset"]["id"] == dataset["id"], \
        side.text
    conversion = world.call(who, "POST", "/v1/conversions", json={
        "dataset_id": dataset["id"], "format": "mrc", "mode": 1})
    assert conversion.status_code == 202, conversion.text
    job = conversion.json()["job"]["id"]
    # a tus upload in progress: the header and one frame of four arrived
    world.seed += 1
    tus_movie = write_raw_mrc(world.root / project / f"{project}_tus.mrc",
                              counting_movie((4, 16, 16), seed=world.seed), 101)
    data = tus_movie.read_bytes()
    made = world.call(who, "POST", "/v1/tus/", headers={
        **TUS, "Upload-Length": str(len(data)), "Upload-Metadata": tus_metadata(
            filename=tus_movie.name, project=project, session=session)})
    assert made.status_code == 201, made.text
    upload_url = made.headers["location"]
    patched = world.call(who, "PATCH", upload_url, content=data[:1024 + FRAME],
                         headers={**PATCH_HEADERS, "Upload-Offset": "0"})
    assert patched.status_code == 204, patched.text
    folder = world.stacks(project)
    created = world.call(who, "POST", "/v1/particle-sets",
                         params={"folder": str(folder), "project": project},
                         files={"file": (f"{project}_J5.cs", particle_cs())})
    assert created.status_code == 201, created.text
    assert world.wait_job(job)["state"] == "done"
    detail = world.dataset(dataset["id"])
    tus_dataset = patched.headers["mrc-ingest-dataset"].rsplit("/", 1)[1]  # receiving
    world.ids[project] = {
        "dataset_id": dataset["id"], "job_id": job, "set_id": created.json()["id"],
        "upload_id": upload_url.rsplit("/", 1)[1], "session_id": dataset["session_id"],
        "k": "0", "n": "0", "filename": f"{project}_new.mrc", "name": "dashboard.js",
        "tus_data": data}
    world.secrets[project] = {
        project, session, movie.name, tus_movie.name, f"{project}_J5.cs", dataset["id"],
        dataset["session_id"], dataset["sha256"], job, created.json()["id"],
        world.ids[project]["upload_id"], *(j["id"] for j in detail["jobs"]),
        tus_dataset}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("scope-shared")
    tokens = [{**spec, "sha256": hash_token(SECRETS[spec["name"]])} for spec in TOKENS]
    with make_client(tmp_path_factory.mktemp("scope") / "data", tokens=tokens,
                     allowed_roots=[root]) as client:
        w = World(client, root, ids={"missing": MISSING})
        for project in (ALPHA, BETA):
            build(w, project)
        assert all(w.secrets.values()) and not w.secrets[ALPHA] & w.secrets[BETA]
        yield w


# -- what a refusal may say ---------------------------------------------------------------

def no_leak(world: World, response, asked: str, project: str = BETA) -> None:
    """Neither the body nor the headers hold a name or id of ``project`` that the request
    (``asked``: its URL and body as text) did not name itself."""
    said = "\n".join([*said_in(response), *response.headers.values()])
    leaked = sorted(s for s in world.secrets[project] if s not in asked and s in said)
    assert not leaked, f"{response.request.method} {response.request.url} leaks " \
                       f"{leaked}: {said}"


def said_in(response) -> list[str]:
    """The text of a response: a JSON body's string values (its keys are field names:
    an MRC header's ``cellb`` has ``alpha`` and ``beta``), any other body whole."""
    if not response.content:  # HEAD, 204
        return []
    if not response.headers.get("content-type", "").startswith("application/json"):
        return [response.text]
    values: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str):
            values.append(node)
    walk(response.json())
    return values


def not_found(world: World, response, asked: str = "", missing=None,
              swap: tuple[str, str] = ("", "")) -> None:
    """404 as for a resource that does not exist, naming nothing of beta's: the same
    answer as ``missing`` (the request for one that does not exist), but for the name
    asked (``swap``: beta's, the missing one's)."""
    asked = f"{response.request.url}\n{asked}"
    assert response.status_code == 404, response.text
    no_leak(world, response, asked)
    if missing is None:
        assert response.json()["error"] == "not_found", response.text
        return
    assert missing.status_code == 404, missing.text
    assert response.text.replace(*swap) == missing.text, (response.text, missing.text)
    assert headers_of(response) == headers_of(missing)


def headers_of(response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k not in ("date", "content-length")}


def created_nothing(world: World, before: dict[str, Any]) -> None:
    assert world.rows() == before


def ok(response, *codes: int):
    assert response.status_code in (codes or (200,)), response.text
    return response


# -- the cases, one per route -------------------------------------------------------------

Case = Callable[[World, str, str], None]
CASES: dict[tuple[str, str], Case] = {}


def case(*routes: tuple[str, str]):
    def register(fn: Case) -> Case:
        for route in routes:
            assert route not in CASES, route
            CASES[route] = fn
        return fn
    return register


def url_of(world: World, template: str, project: str) -> str:
    return template.format(**world.ids[project])


@case(("GET", "/openapi.json"), ("HEAD", "/openapi.json"), ("GET", "/docs"),
      ("HEAD", "/docs"), ("GET", "/docs/oauth2-redirect"),
      ("HEAD", "/docs/oauth2-redirect"), ("GET", "/redoc"), ("HEAD", "/redoc"),
      ("GET", "/"), ("GET", "/web/{name}"), ("GET", "/healthz"))
def open_route(world: World, method: str, template: str) -> None:
    """Documents, the dashboard page and its files, the probe: nothing of any project."""
    response = ok(world.call(ALPHA, method, url_of(world, template, BETA)))
    no_leak(world, response, "")


@case(("OPTIONS", "/v1/tus/"), ("OPTIONS", "/v1/tus/{upload_id}"))
def tus_discovery(world: World, method: str, template: str) -> None:
    """The same answer for beta's upload as for none: no hint that it exists."""
    beta = ok(world.call(ALPHA, method, url_of(world, template, BETA)), 204)
    none = ok(world.call(ALPHA, method, template.format(upload_id="0" * 32)), 204)
    assert beta.headers == none.headers
    no_leak(world, beta, "")


@case(("DELETE", "/v1/datasets/{dataset_id}"), ("GET", "/v1/jobs"),
      ("DELETE", "/v1/particle-sets/{set_id}"), ("PATCH", "/v1/sessions/{session_id}"),
      ("DELETE", "/v1/sessions/{session_id}"))
def admin_only(world: World, method: str, template: str) -> None:
    """Admin sees every project; a project-limited token is refused for its role before
    anything is looked up, and nothing changes."""
    before = world.rows()
    response = world.call(ALPHA, method, url_of(world, template, BETA),
                          json={"name": "renamed"} if method == "PATCH" else None)
    assert response.status_code == 403, response.text
    assert response.json()["error"] == "forbidden"
    no_leak(world, response, str(response.request.url))
    created_nothing(world, before)


@case(("GET", "/v1/datasets/{dataset_id}"), ("GET", "/v1/datasets/{dataset_id}/frames/stats"),
      ("GET", "/v1/datasets/{dataset_id}/frames/{k}.png"),
      ("GET", "/v1/datasets/{dataset_id}/sum.png"),
      ("GET", "/v1/datasets/{dataset_id}/download"),
      ("GET", "/v1/jobs/{job_id}"), ("GET", "/v1/jobs/{job_id}/result"),
      ("GET", "/v1/particle-sets/{set_id}"), ("GET", "/v1/particle-sets/{set_id}/particles"),
      ("GET", "/v1/particle-sets/{set_id}/particles/{n}.png"),
      ("GET", "/v1/particle-sets/{set_id}/export"),
      ("GET", "/v1/sessions/{session_id}"),
      ("GET", "/v1/sessions/{session_id}/movies.star"),
      ("GET", "/v1/sessions/{session_id}/movies.csv"))
def read_one(world: World, method: str, template: str) -> None:
    param = next(p for p in MISSING if "{%s}" % p in template)
    swap = (world.ids[BETA][param], MISSING[param])
    params = READ_PARAMS.get(template)
    for who in (ALPHA, "alpha_read"):
        not_found(world, world.call(who, method, url_of(world, template, BETA), params=params),
                  missing=world.call(who, method, url_of(world, template, "missing"),
                                     params=params),
                  swap=swap)
        mine = ok(world.call(who, method, url_of(world, template, ALPHA), params=params))
        no_leak(world, mine, "")
        if template.endswith("movies.csv"):
            assert "alpha_movie.mrc" in mine.text
    if template.endswith("/download"):  # a conversion too, not only the file as received
        not_found(world, world.call(ALPHA, method, url_of(world, template, BETA),
                                    params={"format": "mrc", "mode": 1}),
                  missing=world.call(ALPHA, method, url_of(world, template, "missing"),
                                     params={"format": "mrc", "mode": 1}), swap=swap)
        ok(world.call(ALPHA, method, url_of(world, template, ALPHA),
                      params={"format": "mrc", "mode": 1}))
    # a token of both projects, one without projects, admin: beta's too
    for who in ("both", "all", "admin"):
        ok(world.call(who, method, url_of(world, template, BETA), params=params))


#: what a read needs besides its id
READ_PARAMS = {"/v1/sessions/{session_id}/movies.star": {
    "cs_mm": 2.7, "amplitude_contrast": 0.1, "skip_incomplete": True}}


@case(("GET", "/v1/datasets"))
def list_datasets(world: World, method: str, template: str) -> None:
    beta_session = world.ids[BETA]["session_id"]
    for who in (ALPHA, "alpha_read"):
        beta_movie = world.dataset(world.ids[BETA]["dataset_id"])
        for params in ({"session": beta_session}, {"sha256": beta_movie["sha256"]},
                       {"name": beta_movie["name"]}, {"name": "_movie.mrc"}):
            other = ok(world.call(who, method, template, params=params))
            assert [d["name"] for d in other.json()["items"]] in ([], ["alpha_movie.mrc"])
            no_leak(world, other, str(params))
        mine = ok(world.call(who, method, template, params={"limit": 1000})).json()["items"]
        assert {d["project"] for d in mine} == {ALPHA}
        assert world.ids[ALPHA]["dataset_id"] in {d["id"] for d in mine}
        no_leak(world, ok(world.call(who, method, template)), "")
        own_session = ok(world.call(who, method, template, params={
            "session": world.ids[ALPHA]["session_id"]})).json()["items"]
        assert world.ids[ALPHA]["dataset_id"] in {d["id"] for d in own_session}
    for who in ("both", "all", "admin"):
        ids = {d["id"] for d in ok(world.call(who, method, template, params={
            "limit": 1000})).json()["items"]}
        assert {world.ids[p]["dataset_id"] for p in (ALPHA, BETA)} <= ids, who


@case(("GET", "/v1/sessions"))
def list_sessions(world: World, method: str, template: str) -> None:
    for who in (ALPHA, "alpha_read"):
        other = ok(world.call(who, method, template, params={"project": BETA}))
        assert other.json()["items"] == []
        no_leak(world, other, BETA)
        for sort in ("last_movie_at", "name"):
            mine = ok(world.call(who, method, template, params={"sort": sort}))
            assert {s["project"] for s in mine.json()["items"]} == {ALPHA}
            assert world.ids[ALPHA]["session_id"] in {s["id"] for s in mine.json()["items"]}
            no_leak(world, mine, "")
    for who in ("both", "all", "admin"):
        ids = {s["id"] for s in ok(world.call(who, method, template)).json()["items"]}
        assert {world.ids[p]["session_id"] for p in (ALPHA, BETA)} <= ids, who


@case(("GET", "/v1/projects"))
def list_projects(world: World, method: str, template: str) -> None:
    for who in (ALPHA, "alpha_read"):
        mine = ok(world.call(who, method, template))
        assert mine.json() == {"items": [ALPHA], "limited": True}
        no_leak(world, mine, "")
    assert ok(world.call("both", method, template)).json() == {"items": [ALPHA, BETA],
                                                               "limited": True}
    for who in ("all", "admin"):
        body = ok(world.call(who, method, template)).json()
        assert {ALPHA, BETA} <= set(body["items"]) and body["limited"] is False


@case(("GET", "/metrics"))
def metrics(world: World, method: str, template: str) -> None:
    """Facility-wide figures: none for a project-limited token."""
    for who in (ALPHA, "alpha_read", "both"):
        not_found(world, world.call(who, method, template))
    for who in ("all", "admin"):
        ok(world.call(who, method, template))


def write_case(send: Callable[[World, str, dict[str, str]], Any], created: int = 201):
    """A write that places what it makes: ``project=beta`` from alpha is 404 and makes
    nothing; ``project=alpha`` lands in alpha."""
    def check(world: World, method: str, template: str) -> None:
        before = world.rows()
        for placement in ({"project": BETA}, {"project": BETA, "session": "beta-session"}):
            response = send(world, ALPHA, placement)
            missing = send(world, ALPHA, {k: v.replace(BETA, GAMMA)
                                          for k, v in placement.items()})
            not_found(world, response, json.dumps(placement), missing, (BETA, GAMMA))
            created_nothing(world, before)
        mine = send(world, ALPHA, {"project": ALPHA})
        assert mine.status_code == created, mine.text
        no_leak(world, mine, "")
        assert project_of_write(world, mine) == ALPHA
    return check


def project_of_write(world: World, response) -> str:
    """The project what a write made landed in (as the admin token sees it)."""
    if "location" in response.headers and response.headers["location"].startswith("/v1/tus/"):
        upload_id = response.headers["location"].rsplit("/", 1)[1]
        row = world.client.app.state.service.catalog.get_tus_upload(upload_id)
        return row["project"]
    body = response.json()
    if "dataset" in body:
        return world.dataset(body["dataset"]["id"])["project"]
    row = world.client.app.state.service.catalog.get_particle_set(body["id"])
    return row["project"]


def send_put(world: World, who: str, placement: dict[str, str]):
    movie = world.movie("scope_put.mrc")
    return world.call(who, "PUT", f"/v1/uploads/{movie.name}", content=movie.read_bytes(),
                      params=placement)


def send_multipart(world: World, who: str, placement: dict[str, str]):
    movie = world.movie("scope_multipart.mrc")
    return world.call(who, "POST", "/v1/uploads", params=placement,
                      files={"file": (movie.name, movie.read_bytes())})


def send_registration(world: World, who: str, placement: dict[str, str]):
    movie = world.movie(f"scope_registered_{world.seed}.mrc")
    return world.call(who, "POST", "/v1/registrations", json={"path": str(movie),
                                                              **placement})


def send_conversion_upload(world: World, who: str, placement: dict[str, str]):
    movie = world.movie("scope_convert.mrc")
    return world.call(who, "POST", "/v1/conversions", params={**placement, "mode": 1},
                      files={"file": (movie.name, movie.read_bytes())})


def send_tus(world: World, who: str, placement: dict[str, str]):
    return world.call(who, "POST", "/v1/tus/", headers={
        **TUS, "Upload-Length": "2048",
        "Upload-Metadata": tus_metadata(filename="scope_tus.mrc", **placement)})


def send_particle_set(world: World, who: str, placement: dict[str, str]):
    params = {"folder": str(world.stacks(ALPHA))}
    if "project" in placement:
        params["project"] = placement["project"]
    return world.call(who, "POST", "/v1/particle-sets", params=params,
                      files={"file": ("scope_J5.cs", particle_cs())})


WRITES = {"put": (send_put, 201), "multipart": (send_multipart, 201),
          "registration": (send_registration, 202),
          "conversion upload": (send_conversion_upload, 202), "tus": (send_tus, 201),
          "particle set": (send_particle_set, 201)}

case(("PUT", "/v1/uploads/{filename}"))(write_case(*WRITES["put"]))
case(("POST", "/v1/uploads"))(write_case(*WRITES["multipart"]))
case(("POST", "/v1/registrations"))(write_case(*WRITES["registration"]))
case(("POST", "/v1/tus/"))(write_case(*WRITES["tus"]))
case(("POST", "/v1/particle-sets"))(write_case(*WRITES["particle set"]))


@case(("POST", "/v1/conversions"))
def conversions(world: World, method: str, template: str) -> None:
    write_case(*WRITES["conversion upload"])(world, method, template)
    before = world.rows()
    body = {"dataset_id": world.ids[BETA]["dataset_id"], "format": "mrc", "mode": 1}
    missing = world.call(ALPHA, method, template, json={**body, "dataset_id":
                                                        MISSING["dataset_id"]})
    not_found(world, world.call(ALPHA, method, template, json=body), json.dumps(body),
              missing, (body["dataset_id"], MISSING["dataset_id"]))
    created_nothing(world, before)
    mine = world.call(ALPHA, method, template, json={**body, "dataset_id":
                                                     world.ids[ALPHA]["dataset_id"]})
    assert mine.status_code == 202, mine.text
    no_leak(world, mine, "")


@case(("POST", "/v1/datasets/{dataset_id}/verify"))
def verify(world: World, method: str, template: str) -> None:
    before = world.rows()
    not_found(world, world.call(ALPHA, method, url_of(world, template, BETA)), "",
              world.call(ALPHA, method, url_of(world, template, "missing")),
              (world.ids[BETA]["dataset_id"], MISSING["dataset_id"]))
    created_nothing(world, before)
    mine = ok(world.call(ALPHA, method, url_of(world, template, ALPHA)), 202)
    assert world.wait_job(mine.json()["id"])["state"] == "done"


@case(("HEAD", "/v1/tus/{upload_id}"))
def tus_head(world: World, method: str, template: str) -> None:
    not_found(world, world.call(ALPHA, method, url_of(world, template, BETA), headers=TUS),
              "", world.call(ALPHA, method, url_of(world, template, "missing"), headers=TUS),
              (world.ids[BETA]["upload_id"], MISSING["upload_id"]))
    mine = ok(world.call(ALPHA, method, url_of(world, template, ALPHA), headers=TUS))
    assert int(mine.headers["upload-offset"]) >= 1024 + FRAME
    no_leak(world, mine, "")


def offset(world: World, project: str) -> int:
    head = world.call("admin", "HEAD", url_of(world, "/v1/tus/{upload_id}", project),
                      headers=TUS)
    assert head.status_code == 200, head.headers
    return int(head.headers["upload-offset"])


@case(("PATCH", "/v1/tus/{upload_id}"))
def tus_patch(world: World, method: str, template: str) -> None:
    where = offset(world, BETA)
    data = world.ids[BETA]["tus_data"][where:where + FRAME]
    headers = {**PATCH_HEADERS, "Upload-Offset": str(where)}
    not_found(world, world.call(ALPHA, method, url_of(world, template, BETA), content=data,
                                headers=headers), "",
              world.call(ALPHA, method, url_of(world, template, "missing"), content=data,
                         headers=headers),
              (world.ids[BETA]["upload_id"], MISSING["upload_id"]))
    assert offset(world, BETA) == where
    mine = offset(world, ALPHA)
    data = world.ids[ALPHA]["tus_data"][mine:mine + FRAME]
    ok(world.call(ALPHA, method, url_of(world, template, ALPHA), content=data,
                  headers={**PATCH_HEADERS, "Upload-Offset": str(mine)}), 204)
    assert offset(world, ALPHA) == mine + FRAME


@case(("DELETE", "/v1/tus/{upload_id}"))
def tus_delete(world: World, method: str, template: str) -> None:
    not_found(world, world.call(ALPHA, method, url_of(world, template, BETA), headers=TUS),
              "", world.call(ALPHA, method, url_of(world, template, "missing"), headers=TUS),
              (world.ids[BETA]["upload_id"], MISSING["upload_id"]))
    assert offset(world, BETA) >= 1024 + FRAME  # still there
    made = ok(send_tus(world, ALPHA, {"project": ALPHA}), 201)
    ok(world.call(ALPHA, method, made.headers["location"], headers=TUS), 204)
    assert world.call("admin", "HEAD", made.headers["location"],
                      headers=TUS).status_code == 404


def test_every_route_has_a_scoping_case(world):
    missing = sorted(served_routes(world.client.app) - CASES.keys())
    assert not missing, "\n".join(f"route {m} {p} has no project-scoping case here"
                                  for m, p in missing)


@pytest.mark.parametrize("method, template", sorted(CASES), ids=lambda x: x)
def test_route_is_scoped(world, method, template):
    if (method, template) not in served_routes(world.client.app):
        pytest.skip("not served (yet)")
    CASES[method, template](world, method, template)


# -- writes without a project ---------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(WRITES))
def test_a_write_without_project_goes_to_the_only_project(world, kind):
    send, created = WRITES[kind]
    response = send(world, ALPHA, {})
    assert response.status_code == created, response.text
    assert project_of_write(world, response) == ALPHA
    response = send(world, BETA, {})
    assert response.status_code == created, response.text
    assert project_of_write(world, response) == BETA


@pytest.mark.parametrize("kind", sorted(WRITES))
def test_a_write_without_project_from_two_projects_is_422(world, kind):
    before = world.rows()
    response = WRITES[kind][0](world, "both", {})
    created_nothing(world, before)
    body = response.json()
    assert body["detail"]["where"] == "project", body
    assert response.status_code == 422, response.text


def test_a_write_without_project_from_two_projects_names_the_parameter(world):
    before = world.rows()
    for kind in sorted(WRITES):
        response = WRITES[kind][0](world, "both", {})
        assert response.status_code in (400, 422), (kind, response.text)
        assert response.json()["detail"]["where"] == "project", (kind, response.text)
        created_nothing(world, before)
    # naming one of its projects, the same token writes there
    assert project_of_write(world, ok(send_put(world, "both", {"project": BETA}), 201)) == BETA


def test_beta_upload_in_progress_is_hidden_with_its_dataset(world):
    """The dataset of beta's unfinished tus upload (receiving) is as unknown to alpha as
    one that does not exist."""
    head = world.call("admin", "HEAD", url_of(world, "/v1/tus/{upload_id}", BETA),
                      headers=TUS)
    receiving = head.headers["mrc-ingest-dataset"]
    assert world.call("admin", "GET", receiving).json()["status"] == "receiving"
    missing = world.call(ALPHA, "GET", f"/v1/datasets/{MISSING['dataset_id']}")
    not_found(world, world.call(ALPHA, "GET", receiving), "", missing,
              (receiving.rsplit("/", 1)[1], MISSING["dataset_id"]))
    listed = world.call(ALPHA, "GET", "/v1/datasets", params={"status": "receiving"}).json()
    assert listed["items"] and {d["project"] for d in listed["items"]} == {ALPHA}


def test_a_file_beta_registered_is_a_dataset_of_its_own_for_alpha(world):
    movie = world.movie("shared_registered.mrc", BETA)
    theirs = ok(world.call(BETA, "POST", "/v1/registrations", json={"path": str(movie)}),
                202).json()["dataset"]
    mine = world.call(ALPHA, "POST", "/v1/registrations", json={"path": str(movie)})
    assert mine.status_code == 202, mine.text
    no_leak(world, mine, str(movie))
    assert mine.json()["dataset"]["id"] != theirs["id"]
    assert world.dataset(mine.json()["dataset"]["id"])["project"] == ALPHA
    again = ok(world.call(ALPHA, "POST", "/v1/registrations", json={"path": str(movie)}),
               200, 202)
    assert again.json()["dataset"]["id"] == mine.json()["dataset"]["id"]


# -- sidecars and identical bytes -----------------------------------------------------------

def test_a_sidecar_never_crosses_projects(world):
    name = "twin_movie.mrc"
    beta_movie = world.movie(name, BETA)
    up = ok(world.call(BETA, "PUT", f"/v1/uploads/{name}", content=beta_movie.read_bytes()),
            201)
    beta_id = up.json()["dataset"]["id"]
    # alpha's sidecar of the same name: waits for alpha's movie, never joins beta's
    mdoc = b"[ZValue = 0]\nExposureTime = 1.5\n"
    sent = ok(world.call(ALPHA, "PUT", f"/v1/uploads/{name}.mdoc", content=mdoc), 201)
    assert sent.json()["sidecar"]["dataset_id"] is None
    assert sent.json()["dataset"] is None and "location" not in sent.headers
    no_leak(world, sent, "")
    assert not world.dataset(beta_id)["sidecars"]
    alpha_movie = world.movie(name, ALPHA)
    mine = ok(world.call(ALPHA, "PUT", f"/v1/uploads/{name}",
                         content=alpha_movie.read_bytes()), 201).json()["dataset"]
    assert world.dataset(mine["id"])["sidecars"], "alpha's waiting sidecar joins its movie"
    assert not world.dataset(beta_id)["sidecars"]
    # beta's sidecar waiting for a name never joins alpha's movie of that name
    other = "second_twin.mrc"
    ok(world.call(BETA, "PUT", f"/v1/uploads/{other}.mdoc", content=mdoc), 201)
    alpha_second = world.movie(other, ALPHA)
    second = ok(world.call(ALPHA, "PUT", f"/v1/uploads/{other}",
                           content=alpha_second.read_bytes()), 201).json()["dataset"]
    assert not world.dataset(second["id"])["sidecars"]


def send_beta_bytes(world: World, path: str, **extra_parts: bytes):
    """Beta's movie, byte for byte, sent by alpha's token (no project: alpha's only)."""
    data = (world.root / BETA / f"{BETA}_movie.mrc").read_bytes()
    if path == "put":
        return world.call(ALPHA, "PUT", "/v1/uploads/copy.mrc", content=data)
    if path in ("multipart", "conversion upload"):
        files = {"file": ("copy.mrc", data),
                 **{k: (f"copy.mrc.{k}", v) for k, v in extra_parts.items()}}
        url = "/v1/uploads" if path == "multipart" else "/v1/conversions"
        return world.call(ALPHA, "POST", url, files=files,
                          params={"mode": 1} if path != "multipart" else None)
    made = ok(world.call(ALPHA, "POST", "/v1/tus/", headers={
        **TUS, "Upload-Length": str(len(data)),
        "Upload-Metadata": tus_metadata(filename="copy.mrc")}), 201)
    done = world.call(ALPHA, "PATCH", made.headers["location"], content=data,
                      headers={**PATCH_HEADERS, "Upload-Offset": "0"})
    head = world.call(ALPHA, "HEAD", made.headers["location"], headers=TUS)
    no_leak(world, head, "")
    return done


@pytest.mark.parametrize("path", ["put", "multipart", "conversion upload", "tus"])
def test_beta_bytes_uploaded_by_alpha_never_answer_with_beta_dataset(world, path):
    """Uploads are deduplicated by content within a project; beta's dataset is never the
    answer to alpha, nor does alpha's upload add anything to it (a conversion job, say).
    The bytes' SHA-256 is no leak: alpha holds the bytes and computed it too."""
    beta = world.dataset(world.ids[BETA]["dataset_id"])
    response = send_beta_bytes(world, path)
    no_leak(world, response, beta["sha256"])
    if response.status_code == 409:  # the same bytes in a project it does not reach
        assert response.json()["error"] == "conflict", response.text
    else:  # or (deduplicated per project) a dataset of alpha's own
        assert response.status_code in (200, 201, 202, 204), response.text
        if path != "tus":
            assert world.dataset(response.json()["dataset"]["id"])["project"] == ALPHA
    assert world.dataset(beta["id"])["jobs"] == beta["jobs"]


def test_a_sidecar_sent_with_beta_bytes_never_joins_beta_movie(world):
    beta_id = world.ids[BETA]["dataset_id"]
    before = world.dataset(beta_id)["sidecars"]  # its own .mdoc
    send_beta_bytes(world, "multipart", mdoc=b"[ZValue = 0]\nExposureTime = 1.5\n")
    assert world.dataset(beta_id)["sidecars"] == before


# -- the token command ---------------------------------------------------------------------

def test_token_command_limits_a_token_to_projects(capsys, monkeypatch):
    assert cli_main(["token", "--name", "pc", "--role", "write", "--project", "a",
                     "--project", "b"]) == 0
    lines = capsys.readouterr().out.splitlines()
    token = lines[0].rsplit(" ", 1)[1]
    entry = json.loads(lines[1].split(": ", 1)[1])
    assert entry == {"name": "pc", "role": "write", "sha256": hash_token(token),
                     "projects": ["a", "b"]}
    monkeypatch.setenv("MRC_INGEST_TOKENS", json.dumps([entry]))
    [spec] = Settings().tokens
    assert spec.projects == ["a", "b"] and spec.scope.projects == frozenset({"a", "b"})
    assert cli_main(["token", "--name", "pc", "--role", "read"]) == 0
    entry = json.loads(capsys.readouterr().out.splitlines()[1].split(": ", 1)[1])
    assert "projects" not in entry


def test_token_command_refuses_projects_for_admin(capsys):
    assert cli_main(["token", "--name", "boss", "--role", "admin", "--project", "a"]) != 0
    captured = capsys.readouterr()
    assert "mrci_" not in captured.out
    assert "admin token sees every project" in captured.err
