"""Exports of a session for processing: movies.star read back with starfile (teamtomo, the
independent reader) and movies.csv with the csv module, both compared with the catalog
as the API lists it (GET /v1/datasets?session=...), never with the writer's own tables.

The session is made through the API: tiny real 4-bit movies uploaded in one multipart
request with a SerialEM .mdoc each (PixelSpacing and Voltage: two optics groups, and a
third by frame size alone), a truncated one (rejected), and movies registered from
shared storage under hostile names (commas, quotes, a line break; spaces). Each dataset
reaches the catalog the way a real one does; nothing is written to the catalog directly.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re

import pytest
import sqlalchemy as sa
import starfile

from service.auth import hash_token
from service.catalog.schema import datasets
from tests.api_helpers import make_client, wait_job
from tests.reference import counting_movie, synthetic, write_raw_mrc

ALPHA, BETA = "alpha", "beta"
SECRETS = {"admin": "mrci_export-admin", "beta_read": "mrci_export-beta-read",
           "alpha_read": "mrci_export-alpha-read"}
TOKENS = [{"name": "admin", "role": "admin", "sha256": hash_token(SECRETS["admin"])},
          {"name": "beta_read", "role": "read", "projects": [BETA],
           "sha256": hash_token(SECRETS["beta_read"])},
          {"name": "alpha_read", "role": "read", "projects": [ALPHA],
           "sha256": hash_token(SECRETS["alpha_read"])}]
OPTICS = {"cs_mm": 2.7, "amplitude_contrast": 0.1}
#: names that must survive the CSV (a comma, both quotes, a line break) and STAR (spaces)
HOSTILE = 'grid 2, "best" it\'s\nsquare.mrc'
SPACED = "grid 2 square 7.mrc"


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[who]}"}


def mdoc(pixel: float | None, kv: float | None) -> bytes:
    lines = ([f"PixelSpacing = {pixel}"] if pixel is not None else []) + \
            ([f"Voltage = {kv}"] if kv is not None else [])
    return ("\n".join(lines) + "\n").encode()


def upload(client, folder, name: str, shape, seed: int, session: str, pixel, kv,
           project: str = ALPHA) -> dict:
    movie = write_raw_mrc(folder / name, counting_movie(shape, seed=seed), 101)
    response = client.post("/v1/uploads", params={"session": session, "project": project},
                           files=[("file", (name, movie.read_bytes())),
                                  ("mdoc", (f"{name}.mdoc", mdoc(pixel, kv)))])
    assert response.status_code == 201, response.text
    wait_job(client, response.json()["job"]["id"])
    return client.get(response.headers["location"]).json()


def register(client, shared, name: str, seed: int, session: str, pixel, kv) -> dict:
    write_raw_mrc(shared / name, counting_movie((2, 16, 16), seed=seed), 101)
    (shared / f"{name}.mdoc").write_bytes(mdoc(pixel, kv))
    response = client.post("/v1/registrations", json={
        "path": str(shared / name), "session": session, "project": ALPHA})
    assert response.status_code == 202, response.text
    wait_job(client, response.json()["job"]["id"])
    return client.get(f"/v1/datasets/{response.json()['dataset']['id']}").json()


def rejected(client, folder, session: str, seed: int) -> dict:
    """A truncated movie: ingested, found truncated, rejected."""
    full = write_raw_mrc(folder / "whole.mrc", synthetic(2, (4, 32, 32), seed=seed), 2)
    cut = full.read_bytes()[:-1000]
    response = client.put(f"/v1/uploads/{session}-cut.mrc", content=cut,
                          params={"session": session, "project": ALPHA})
    wait_job(client, response.json()["job"]["id"])
    ds = client.get(f"/v1/datasets/{response.json()['dataset']['id']}").json()
    assert ds["status"] == "rejected"
    return ds


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One service with four sessions of project alpha:

    * grid1: movies in optics groups 0.83 Å/300 kV (16x16), 1.06 Å/200 kV (16x16),
      0.83 Å/300 kV (24x16: a group of its own by frame size), in the order
      g1, g2, g1, g3, g2, plus one rejected movie;
    * hostile: registered movies named HOSTILE and SPACED (0.83 Å, 300 kV);
    * nopix: one movie with a voltage and no pixel size, one complete;
    * empty: one rejected movie only."""
    folder = tmp_path_factory.mktemp("export")
    shared = folder / "shared"
    shared.mkdir()
    with make_client(folder / "data", tokens=TOKENS, allowed_roots=[shared]) as client:
        client.headers.update(auth("admin"))
        grid1 = [upload(client, folder, f"sq1_mov{i}.mrc", shape, i, "grid1", pixel, kv)
                 for i, (shape, pixel, kv) in enumerate([
                     ((2, 16, 16), 0.83, 300), ((2, 16, 16), 1.06, 200),
                     ((3, 16, 16), 0.83, 300), ((2, 16, 24), 0.83, 300),
                     ((2, 16, 16), 1.06, 200)])]
        bad = rejected(client, folder, "grid1", 1)
        hostile = [register(client, shared, name, 40 + i, "hostile", 0.83, 300)
                   for i, name in enumerate([HOSTILE, SPACED])]
        nopix = [upload(client, folder, "np_mov0.mrc", (2, 16, 16), 50, "nopix", None, 300),
                 upload(client, folder, "np_mov1.mrc", (2, 16, 16), 51, "nopix", 0.83, 300)]
        empty = rejected(client, folder, "empty", 2)
        sessions = {s["name"]: s for s in client.get("/v1/sessions").json()["items"]}
        yield {"client": client, "sessions": sessions, "grid1": grid1, "bad": bad,
               "hostile": hostile, "nopix": nopix, "empty": empty, "shared": shared,
               "folder": folder}


def star_of(client, session_id: str, tmp_path, **params) -> tuple[dict, str]:
    response = client.get(f"/v1/sessions/{session_id}/movies.star",
                          params={**OPTICS, **params})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    path = tmp_path / "movies.star"
    path.write_bytes(response.content)
    return starfile.read(path, always_dict=True), response.text


def listed(client, session_id: str) -> list[dict]:
    """The session's datasets as the API lists them, oldest first."""
    body = client.get("/v1/datasets", params={"session": session_id, "order": "asc",
                                              "limit": 1000}).json()
    assert body["next_cursor"] is None
    return body["items"]


def test_movies_star_against_the_catalog(world, tmp_path):
    client, session = world["client"], world["sessions"]["grid1"]
    blocks, text = star_of(client, session["id"], tmp_path)
    assert list(blocks) == ["optics", "movies"]
    optics, movies = blocks["optics"], blocks["movies"]
    assert list(optics.columns) == ["rlnOpticsGroupName", "rlnOpticsGroup",
                                    "rlnMicrographOriginalPixelSize", "rlnVoltage",
                                    "rlnSphericalAberration", "rlnAmplitudeContrast"]
    assert list(movies.columns) == ["rlnMicrographMovieName", "rlnOpticsGroup"]

    # the expected groups, worked out here from the API's list: one per distinct
    # (pixel size, voltage, frame size, mode) among ready movies, numbered by first
    # appearance, oldest first
    ready = [d for d in listed(client, session["id"]) if d["status"] == "ready"]
    assert [d["id"] for d in ready] == [d["id"] for d in world["grid1"]]
    keys: dict[tuple, int] = {}
    for d in ready:
        keys.setdefault((d["pixel_size_angstrom"], d["voltage_kv"], d["nx"], d["ny"],
                         d["mode"]), len(keys) + 1)
    assert len(keys) == 3
    assert optics.to_dict("records") == [
        {"rlnOpticsGroupName": f"opticsGroup{n}", "rlnOpticsGroup": n,
         "rlnMicrographOriginalPixelSize": key[0], "rlnVoltage": key[1],
         "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1}
        for key, n in keys.items()]

    base = "http://testserver/v1/datasets/"
    assert movies.to_dict("records") == [
        {"rlnMicrographMovieName": f"{base}{d['id']}/download",
         "rlnOpticsGroup": keys[d["pixel_size_angstrom"], d["voltage_kv"], d["nx"],
                                d["ny"], d["mode"]]}
        for d in ready]
    # every optics value of every movie, through its group, equals the catalog's exactly
    by_number = {row["rlnOpticsGroup"]: row for row in optics.to_dict("records")}
    for d, row in zip(ready, movies.to_dict("records")):
        group = by_number[row["rlnOpticsGroup"]]
        assert group["rlnMicrographOriginalPixelSize"] == d["pixel_size_angstrom"]
        assert group["rlnVoltage"] == d["voltage_kv"]

    # RELION 3.1's block headers, and what was left out said in a comment
    assert text.count("# version 30001\n\ndata_") == 2
    assert text.index("# version 30001\n\ndata_optics") < text.index("data_movies")
    assert "# 5 movie(s): only ready movies are listed; left out: 1 rejected\n" in text
    assert "# opticsGroup3: 0.83 Å/pixel, 300.0 kV, 24 x 16 pixels, MRC mode 101, " \
           "1 movie(s)" in text
    assert world["bad"]["id"] not in text


def test_a_star_url_downloads_the_movie_as_received(world, tmp_path):
    client, session = world["client"], world["sessions"]["grid1"]
    blocks, _ = star_of(client, session["id"], tmp_path)
    url = blocks["movies"]["rlnMicrographMovieName"][1]
    response = client.get(url)
    assert response.status_code == 200
    digest = hashlib.sha256(response.content).hexdigest()
    assert digest == world["grid1"][1]["sha256"]
    sent = (world["folder"] / "sq1_mov1.mrc").read_bytes()
    assert digest == hashlib.sha256(sent).hexdigest()


def test_star_values_from_query_then_settings_never_guessed(world, tmp_path):
    client, session = world["client"], world["sessions"]["grid1"]
    url = f"/v1/sessions/{session['id']}/movies.star"
    neither = client.get(url)
    assert neither.status_code == 422
    body = neither.json()
    assert body["error"] == "unprocessable"
    assert [m["query"] for m in body["detail"]["missing"]] == ["cs_mm", "amplitude_contrast"]
    assert "MRC_INGEST_CS_MM" in body["detail"]["message"]
    no_ac = client.get(url, params={"cs_mm": 2.7}).json()
    assert [m["setting"] for m in no_ac["detail"]["missing"]] == [
        "MRC_INGEST_AMPLITUDE_CONTRAST"]
    assert "amplitude contrast" in no_ac["detail"]["message"]
    no_cs = client.get(url, params={"amplitude_contrast": 0.1}).json()
    assert [m["query"] for m in no_cs["detail"]["missing"]] == ["cs_mm"]
    for bad in ({"cs_mm": -1, "amplitude_contrast": 0.1},
                {"cs_mm": 2.7, "amplitude_contrast": 1.5},
                {"cs_mm": "nan", "amplitude_contrast": 0.1}):
        response = client.get(url, params=bad)
        assert response.status_code == 422 and response.json()["error"] == "invalid_request"

    # from the settings, and a query parameter wins over a setting
    folder = tmp_path / "settings"
    folder.mkdir()
    with make_client(folder / "data", cs_mm=0.01, amplitude_contrast=0.07) as other:
        d = upload(other, folder, "one.mrc", (2, 16, 16), 7, "s", 1.06, 300)
        sid = d["session_id"]
        path = tmp_path / "s.star"
        path.write_bytes(other.get(f"/v1/sessions/{sid}/movies.star").content)
        optics = starfile.read(path, always_dict=True)["optics"].to_dict("records")[0]
        assert (optics["rlnSphericalAberration"], optics["rlnAmplitudeContrast"]) == \
            (0.01, 0.07)
        path.write_bytes(other.get(f"/v1/sessions/{sid}/movies.star",
                                   params={"amplitude_contrast": 0.1}).content)
        optics = starfile.read(path, always_dict=True)["optics"].to_dict("records")[0]
        assert (optics["rlnSphericalAberration"], optics["rlnAmplitudeContrast"]) == \
            (0.01, 0.1)


def test_a_movie_without_a_pixel_size_is_refused_unless_skipped(world, tmp_path):
    client, session = world["client"], world["sessions"]["nopix"]
    incomplete, complete = world["nopix"]
    assert incomplete["pixel_size_angstrom"] is None and incomplete["voltage_kv"] == 300
    response = client.get(f"/v1/sessions/{session['id']}/movies.star", params=OPTICS)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail["count"] == 1
    assert detail["movies"] == [{"dataset_id": incomplete["id"], "name": "np_mov0.mrc",
                                 "missing": ["pixel_size"]}]
    assert "skip_incomplete=true" in detail["message"]

    blocks, text = star_of(client, session["id"], tmp_path, skip_incomplete="true")
    assert [r["rlnMicrographMovieName"].split("/")[-2] for r in
            blocks["movies"].to_dict("records")] == [complete["id"]]
    assert "left out: 1 ready without a pixel size, a voltage or a name STAR can hold " \
           "(skip_incomplete)" in text


def stored_file(data_dir, name: str, prefix: str):
    assert name.startswith(prefix + "datasets/"), name
    return data_dir / name[len(prefix):]


def test_prefix_names_files_relion_reads(world, tmp_path):
    """Under ?prefix= (the store mounted there) a movie is named by a file RELION reads,
    and the file there is the movie as received: these tiny movies are kept as
    received (their archive would be no smaller). A movie kept only as its MRCZ archive
    has no such file: refused, naming each and why, unless the original is kept."""
    client, session = world["client"], world["sessions"]["grid1"]
    blocks, _ = star_of(client, session["id"], tmp_path, prefix="/mnt/store/")
    by_id = {d["id"]: d for d in world["grid1"]}
    for name, d in zip(blocks["movies"]["rlnMicrographMovieName"], world["grid1"]):
        assert name.endswith(f"/{d['name']}")
        stored = stored_file(world["folder"] / "data", name, "/mnt/store/")
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == by_id[d["id"]]["sha256"]

    for keep in (False, True):
        folder = tmp_path / f"keep-{keep}"
        folder.mkdir()
        with make_client(folder / "data", keep_original=keep) as app:
            big = upload(app, folder, "sq9_mov0.mrc", (4, 128, 128), 90, "grid9", 0.83, 300)
            detail = app.get(f"/v1/datasets/{big['id']}").json()
            assert detail["storage"]["form"] == "archive"  # the original beside it if kept
            grid9 = app.get("/v1/sessions").json()["items"][0]
            answer = app.get(f"/v1/sessions/{grid9['id']}/movies.star",
                             params={**OPTICS, "prefix": "/mnt/store/"})
            if not keep:
                assert answer.status_code == 422, answer.text
                [refused] = answer.json()["detail"]["movies"]
                assert any("a file RELION reads" in m for m in refused["missing"])
                assert app.get(f"/v1/sessions/{grid9['id']}/movies.star", params={
                    **OPTICS, "prefix": "/mnt/store/", "skip_incomplete": True}
                    ).status_code == 409
                continue
            blocks, _ = star_of(app, grid9["id"], tmp_path, prefix="/mnt/store/")
        [name] = list(blocks["movies"]["rlnMicrographMovieName"])
        stored = stored_file(folder / "data", name, "/mnt/store/")
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == big["sha256"]


def test_prefix_with_hostile_names(world, tmp_path):
    """A registered movie is named by its own path on shared storage. A name with spaces
    is quoted (starfile reads it back whole); one with a line break cannot be a STAR
    value: refused, or left out with skip_incomplete. The download URLs hold no name,
    so the plain export has both."""
    client, session = world["client"], world["sessions"]["hostile"]
    hostile, spaced = world["hostile"]
    assert (hostile["name"], spaced["name"]) == (HOSTILE, SPACED)
    blocks, _ = star_of(client, session["id"], tmp_path)
    assert len(blocks["movies"]) == 2
    refused = client.get(f"/v1/sessions/{session['id']}/movies.star",
                         params={**OPTICS, "prefix": "/mnt/store/"})
    assert refused.status_code == 422
    assert refused.json()["detail"]["movies"] == [
        {"dataset_id": hostile["id"], "name": HOSTILE, "missing": ["a name STAR can hold"]}]
    blocks, text = star_of(client, session["id"], tmp_path, prefix="/mnt/store/",
                          skip_incomplete="true")
    on_shared = str(world["shared"].resolve() / SPACED)
    assert list(blocks["movies"]["rlnMicrographMovieName"]) == [on_shared]
    assert f'"{on_shared}" 1\n' in text
    control = client.get(f"/v1/sessions/{session['id']}/movies.star",
                         params={**OPTICS, "prefix": "/mnt/\nstore/"})
    assert control.status_code == 422


def test_a_session_without_ready_movies(world):
    """Nothing to process: 409 that says what the session holds (an empty STAR file is
    no input RELION, or starfile, takes)."""
    client, session = world["client"], world["sessions"]["empty"]
    response = client.get(f"/v1/sessions/{session['id']}/movies.star", params=OPTICS)
    assert response.status_code == 409, response.text
    assert response.json()["detail"]["left_out"] == {"rejected": 1}


#: the catalog columns the API lists under another name
API_NAMES = {"nz": "frames", "pixel_size": "pixel_size_angstrom"}


def expected_header() -> list[str]:
    """Every datasets column (read from the table itself) but the JSON ones, in table
    order, with the session's name after its id."""
    names = [c.name for c in datasets.c if not isinstance(c.type, sa.JSON)]
    assert {"info", "frame_stats", "progress"}.isdisjoint(names)
    index = names.index("session_id") + 1
    return names[:index] + ["session_name"] + names[index:]


def typed(text: str, like):
    """A CSV cell as the type of the API's value (empty: null)."""
    if text == "":
        return None
    if isinstance(like, bool) or like is None or isinstance(like, str):
        return text
    return int(text) if isinstance(like, int) else float(text)


@pytest.mark.parametrize("name", ["grid1", "hostile", "nopix"])
def test_movies_csv_against_the_catalog(world, name):
    client, session = world["client"], world["sessions"][name]
    response = client.get(f"/v1/sessions/{session['id']}/movies.csv")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"] == \
        f'attachment; filename="{name}_movies.csv"'
    raw = response.content
    assert not raw.startswith(b"\xef\xbb\xbf")
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8"), newline=""))
    assert reader.fieldnames == expected_header()
    rows = list(reader)
    api = listed(client, session["id"])
    assert [r["id"] for r in rows] == [d["id"] for d in api]
    for row, d in zip(rows, api):
        for column in reader.fieldnames:
            if column == "session_name":
                assert row[column] == session["name"]
            elif column == "path":  # not in the API: the registered file, resolved
                expected = str((world["shared"] / d["name"]).resolve()) \
                    if d["source"] == "registration" else ""
                assert row[column] == expected
            else:
                value = d[API_NAMES.get(column, column)]
                assert typed(row[column], value) == value, (column, row[column], value)
    if name == "hostile":
        assert [r["name"] for r in rows] == [HOSTILE, SPACED]
        assert '"grid 2, ""best"" it\'s\nsquare.mrc"' in raw.decode()


def test_star_headers_and_file_name(world):
    client, session = world["client"], world["sessions"]["grid1"]
    response = client.get(f"/v1/sessions/{session['id']}/movies.star", params=OPTICS)
    assert response.headers["content-disposition"] == \
        'attachment; filename="grid1_movies.star"'
    # every float written reads back as the same double: no rounding to 6 places
    assert re.search(r"^opticsGroup2 2 1\.06 200\.0 2\.7 0\.1$", response.text, re.M)


def test_unknown_session_and_other_projects_are_404(world):
    client, session = world["client"], world["sessions"]["grid1"]
    for suffix in ("movies.star", "movies.csv"):
        missing = client.get(f"/v1/sessions/nosuchsession/{suffix}", params=OPTICS)
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
        other = client.get(f"/v1/sessions/{session['id']}/{suffix}", params=OPTICS,
                           headers=auth("beta_read"))
        assert other.status_code == 404
        assert other.json() == {"error": "not_found",
                                "detail": f"no session {session['id']!r}"}
        mine = client.get(f"/v1/sessions/{session['id']}/{suffix}", params=OPTICS,
                          headers=auth("alpha_read"))
        assert mine.status_code == 200
    no_token = client.get(f"/v1/sessions/{session['id']}/movies.csv",
                          headers={"Authorization": ""})
    assert no_token.status_code == 401


# -- the writer alone, over rows in memory --------------------------------------------------

def test_rows_that_change_between_the_two_passes(tmp_path):
    """The optics groups and counts come from the first pass; the second writes the ready
    movies of those groups: one that became ready since in a known group is written, one
    in a group the header lacks waits for the next export, one deleted since is not."""
    from service import export

    def row(i, status, pixel=0.83):
        return {"id": f"d{i}", "name": f"m{i}.mrc", "created_at": f"t{i}", "status": status,
                "pixel_size": pixel, "voltage_kv": 300.0, "nx": 16, "ny": 16, "mode": 101}
    first = [row(0, "ready"), row(1, "queued"), row(2, "processing", None),
             row(3, "ready"), row(4, "failed")]
    second = [row(0, "ready"), row(1, "ready", 1.06), row(2, "ready"), row(4, "failed")]
    passes = iter([first, second])
    names = export.movie_url("http://h/v1/datasets/ID/download", "ID")
    text = "".join(export.movies_star(lambda: next(passes), export.Optics(2.7, 0.1), names,
                                      {"id": "s", "name": "s", "project": "p"}))
    assert "# 2 movie(s): only ready movies are listed; left out: 1 failed, 2 in flight " \
           "(receiving, queued or processing)\n" in text
    path = tmp_path / "m.star"
    path.write_text(text)
    blocks = starfile.read(path, always_dict=True)
    assert len(blocks["optics"]) == 1
    assert list(blocks["movies"]["rlnMicrographMovieName"]) == [
        "http://h/v1/datasets/d0/download", "http://h/v1/datasets/d2/download"]


@pytest.mark.parametrize("text, value", [
    ("/mnt/a/b.mrc", "/mnt/a/b.mrc"), ("/mnt/a b.mrc", '"/mnt/a b.mrc"'),
    ('a "b" c', "'a \"b\" c'"), ("_x", '"_x"'), ("data_1", '"data_1"'),
    ("a#b", '"a#b"'), ("", '""')])
def test_star_values(text, value):
    from service import export

    assert export.star_value(text) == value and export.star_writable(text)


@pytest.mark.parametrize("text", ["a\nb", "a\tb\x00", "it's \"x\" y", "a\u2028b",
                                  "bad\udcffname"])
def test_what_star_cannot_hold(text):
    from service import export

    assert not export.star_writable(text)
