"""Hostile input on the sessions routes and their shared pieces (cursors, dates, URLs,
JSON bodies, folder names): always a 4xx JSON error that says what and where, never a
500. Found by a review that reproduced each as a 500 first."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone

import pytest

from tests.api_helpers import make_client
from tests.reference import counting_movie, write_raw_mrc


def cursor(*parts) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).decode()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    folder = tmp_path_factory.mktemp("input")
    shared = folder / "shared"
    shared.mkdir()
    with make_client(folder / "data", allowed_roots=[shared], workers=1) as client:
        yield client, shared


@pytest.mark.parametrize("url, status", [
    ("/v1/sessions?project=a%00b", 400), ("/v1/sessions?microscope=%00", 400),
    ("/v1/sessions/%00", 400), ("/v1/sessions/%00/movies.csv", 400),
    ("/v1/datasets?session=%00", 400), ("/v1/datasets/%00", 400),
    ("/v1/sessions?started_after=0001-01-01T00:00:00%2B14:00", 422),
    ("/v1/sessions?started_before=9999-12-31T23:59:59-14:00", 422),
    ("/v1/datasets?created_after=0001-01-01T00:00:00%2B14:00", 422),
    (f"/v1/sessions?sort=movies&cursor={cursor('movies', None, 'x')}", 400),
    (f"/v1/sessions?cursor={cursor('last_movie_at', [1, 2], 'x')}", 400),
    (f"/v1/sessions?cursor={cursor('last_movie_at', {'a': 1}, 'x')}", 400),
    (f"/v1/sessions?sort=movies&cursor={cursor('movies', 10**30, 'x')}", 400),
    (f"/v1/sessions?sort=movies&cursor={cursor('movies', 'text', 'x')}", 400),
    (f"/v1/sessions?sort=movies&cursor={cursor('movies', True, 'x')}", 400),
    (f"/v1/datasets?sort=size_bytes&cursor={cursor('size_bytes', 1e30, 'x')}", 400),
    (f"/v1/datasets?cursor={cursor('created_at', 5, 'x')}", 400),
    (f"/v1/datasets?cursor={cursor('created_at', 'a', 'x' + chr(0))}", 400),
])
def test_a_bad_query_is_a_4xx_that_says_where(app, url, status):
    client, _ = app
    response = client.get(url)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] in ("bad_request", "unprocessable", "invalid_request")


@pytest.mark.parametrize("body", ['{"name": "\\ud800"}', '{"project": "a\\u0000b"}',
                                  '{"name": ""}', '{"name": "' + "x" * 300 + '"}', '{}',
                                  'not json', '[1, 2]'])
def test_a_bad_patch_body_is_a_4xx(app, body):
    client, _ = app
    response = client.request("PATCH", "/v1/sessions/nope", content=body,
                              headers={"content-type": "application/json"})
    assert response.status_code in (400, 404, 422), response.text
    assert response.json()["error"]


def test_a_folder_that_cannot_name_a_session_leaves_the_default(app):
    """A registration's session is the folder under its root, unless that name could
    not be one (over 200 characters, a control character): then the default."""
    client, shared = app
    today = datetime.now(timezone.utc).date().isoformat()
    for folder in ("f" * 250, "line\nbreak"):
        (shared / folder).mkdir()
        movie = write_raw_mrc(shared / folder / "m.mrc",
                              counting_movie((2, 16, 16), seed=len(folder)), 101)
        response = client.post("/v1/registrations", json={"path": str(movie)})
        assert response.status_code == 202, response.text
        session_id = response.json()["dataset"]["session_id"]
        session = client.get(f"/v1/sessions/{session_id}").json()
        assert session["name"] == f"registration-{today}"
