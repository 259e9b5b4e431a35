"""Sessions and projects (#20 items 1-2) against real apps: every arrival path places its
movie in a session of a project (named, or by the defaults); a session's figures, kept in
its row as movies land, equal a recount done here from the session's dataset rows
(GET /v1/datasets?session=...) after every landing, deletion and conversion, on SQLite and
on a real PostgreSQL, also with two writers at once; the list filters, sorts and pages
like the datasets'; admins rename, move and delete sessions (the stored objects go, a
registered file never); an old catalog's datasets get their day's sessions."""

from __future__ import annotations

import base64
import io
import json
import random
import shutil
import sqlite3
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.auth import hash_token
from service.client import Pusher, Server, collect
from service.catalog import Catalog, standout_frames
from tests.api_helpers import files_under, make_client, start_server, wait_job
from tests.reference import counting_movie, synthetic, write_raw_mrc
from tests.test_acquisition import de_info_text
from tests.test_migrations import GOLDEN
from tests.test_push import push_cli

TUS = {"Tus-Resumable": "1.0.0"}


# -- helpers -------------------------------------------------------------------------------

def utc_days() -> set[str]:
    """Today's UTC date (and yesterday's, for a test that runs across midnight)."""
    now = time.time()
    return {datetime.fromtimestamp(t, timezone.utc).date().isoformat()
            for t in (now - 120, now)}


def mdoc(kv: float, pixel: float, dose: float, seconds: float) -> str:
    """A one-image SerialEM .mdoc: voltage, pixel size, dose and exposure of a movie."""
    return (f"PixelSpacing = {pixel}\nVoltage = {kv}\nImageFile = movie.mrc\n\n"
            f"[ZValue = 0]\nExposureDose = {dose}\nExposureTime = {seconds}\n"
            f"PixelSpacing = {pixel}\n")


def de_info(camera: str) -> str:
    return de_info_text(**{"Camera Model": f"{'Camera Model':<64}= {camera}"})


def movie(folder: Path, name: str, frames: int = 2, seed: int = 0, size: int = 16) -> Path:
    return write_raw_mrc(folder / name, counting_movie((frames, size, size), seed=seed), 101)


def truncated(folder: Path, name: str) -> Path:
    full = write_raw_mrc(folder / f"full-{name}", synthetic(2, (4, 32, 32)), 2)
    path = folder / name
    path.write_bytes(full.read_bytes()[:-1000])
    full.unlink()
    return path


def landed(client, response) -> dict:
    """The dataset of an accepted upload, once its job is done."""
    assert response.status_code in (200, 201, 202), response.text
    body = response.json()
    if body.get("job") and body["job"]["state"] in ("queued", "running"):
        wait_job(client, body["job"]["id"])
    return client.get(f"/v1/datasets/{body['dataset']['id']}").json()


def put(client, path: Path, **placement) -> dict:
    return landed(client, client.put(f"/v1/uploads/{path.name}", content=path.read_bytes(),
                                     params=placement))


def multipart(client, path: Path, sidecars: dict[str, str] | None = None,
              **placement) -> dict:
    files = [("file", (path.name, path.read_bytes()))]
    files += [(f"side{i}", (name, text.encode()))
              for i, (name, text) in enumerate((sidecars or {}).items())]
    return landed(client, client.post("/v1/uploads", files=files, params=placement))


def tus_create(client, filename: str, length: int, **metadata):
    pairs = {"filename": filename, **metadata}
    header = ",".join(f"{k} {base64.b64encode(v.encode()).decode()}"
                      for k, v in pairs.items())
    return client.post("/v1/tus/", headers={**TUS, "Upload-Length": str(length),
                                            "Upload-Metadata": header})


def tus(client, path: Path, **metadata) -> dict:
    data = path.read_bytes()
    made = tus_create(client, path.name, len(data), **metadata)
    assert made.status_code == 201, made.text
    done = client.patch(made.headers["location"], content=data, headers={
        **TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"})
    assert done.status_code == 204, done.text
    detail = client.get(done.headers["mrc-ingest-dataset"]).json()
    for job in detail["jobs"]:
        wait_job(client, job["id"])
    return client.get(done.headers["mrc-ingest-dataset"]).json()


def register(client, path: Path, **placement) -> dict:
    return landed(client, client.post("/v1/registrations",
                                      json={"path": str(path), **placement}))


def pages(client, url: str, **params) -> list[dict]:
    items, cursor = [], None
    while True:
        response = client.get(url, params={**params, **({"cursor": cursor} if cursor
                                                          else {})})
        assert response.status_code == 200, response.text
        body = response.json()
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items


def session(client, session_id: str) -> dict:
    response = client.get(f"/v1/sessions/{session_id}")
    assert response.status_code == 200, response.text
    return response.json()


def assert_placed(client, dataset: dict, name: str, project: str, source: str) -> dict:
    assert dataset["project"] == project, dataset
    found = session(client, dataset["session_id"])
    assert (found["name"], found["project"], found["source"]) == (name, project, source)
    return found


def first_finding(findings: list[dict]) -> dict | None:
    errors = [f for f in findings if f["severity"] == "error"]
    return (errors or findings or [None])[0]


def recount(client, session_id: str) -> dict:
    """A session's figures worked out here from its datasets' rows and details (the
    obvious way: Python over the rows the API lists), in the shape the API answers."""
    rows = pages(client, "/v1/datasets", session=session_id, limit=7)
    rows.sort(key=lambda r: (r["created_at"], r["id"]))
    statuses = Counter(r["status"] for r in rows)

    def span(values):
        values = [v for v in values if v is not None]
        return {"min": min(values), "max": max(values)} if values else None

    times = [r["created_at"] for r in rows]
    first, last = (times[0], times[-1]) if rows else (None, None)
    per = None
    if rows:
        minutes = (datetime.fromisoformat(last) - datetime.fromisoformat(first)
                   ).total_seconds() / 60
        per = len(rows) * 10 / max(minutes, 10)
    cameras = Counter(r["camera"] for r in rows if r["camera"] is not None)
    details = {r["id"]: client.get(f"/v1/datasets/{r['id']}").json()
               for r in rows if r["status"] == "rejected"}
    return {
        "counts": {"movies": len(rows), "ready": statuses["ready"],
                   "rejected": statuses["rejected"], "failed": statuses["failed"],
                   "in_flight": sum(statuses[s] for s in ("receiving", "queued",
                                                          "processing")),
                   "bytes_received": sum(r["size_bytes"] or 0 for r in rows),
                   "bytes_stored": sum(r["stored_bytes"] or 0 for r in rows)},
        "acquisition": {
            "voltage_kv": span(r["voltage_kv"] for r in rows),
            "pixel_size_angstrom": span(r["pixel_size_angstrom"] for r in rows),
            "dose_per_frame": span(r["total_dose"] / r["frames"] for r in rows
                                   if r["total_dose"] is not None and r["frames"]),
            "total_dose": span(r["total_dose"] for r in rows),
            "exposure_s": span(r["exposure_s"] for r in rows),
            "frames": span(r["frames"] for r in rows)},
        "first_movie_at": first, "last_movie_at": last,
        "microscope": (sorted(cameras.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
                       if cameras else None),
        "cameras": [{"camera": c, "movies": n}
                    for c, n in sorted(cameras.items(), key=lambda kv: (-kv[1], kv[0]))],
        "per_bucket": per,
        "timeline": [{"start": f"{prefix}0:00+00:00", "movies": n}
                     for prefix, n in sorted(Counter(t[:15] for t in times).items())],
        "rejected": [{"dataset_id": r["id"], "name": r["name"],
                      "finding": first_finding(details[r["id"]]["findings"])}
                     for r in rows if r["status"] == "rejected"],
        "failed": [{"dataset_id": r["id"], "name": r["name"]}
                   for r in rows if r["status"] == "failed"],
        "standing_out": [{"dataset_id": r["id"], "name": r["name"],
                          "frames": r["standout_frames"]}
                         for r in rows if (r["standout_frames"] or 0) > 0],
    }


def assert_figures(client, session_id: str) -> dict:
    """Every figure of GET /v1/sessions/{id} (and its row in the list) equals the recount."""
    got, want = session(client, session_id), recount(client, session_id)
    assert got["counts"] == want["counts"]
    assert set(got["acquisition"]) == set(want["acquisition"])
    for name, expected in want["acquisition"].items():
        if expected is None:
            assert got["acquisition"][name] is None, name
        else:
            assert got["acquisition"][name] == pytest.approx(expected, rel=1e-9), name
    assert (got["first_movie_at"], got["last_movie_at"]) == (want["first_movie_at"],
                                                             want["last_movie_at"])
    assert (got["microscope"], got["cameras"]) == (want["microscope"], want["cameras"])
    if want["per_bucket"] is None:
        assert got["rate_per_10_minutes"] is None
    else:
        assert got["rate_per_10_minutes"] == pytest.approx(want["per_bucket"], abs=1e-3)
    assert got["rate"]["bucket_minutes"] == 10
    assert got["rate"]["per_bucket"] == got["rate_per_10_minutes"]
    assert got["rate"]["timeline"] == want["timeline"]
    assert got["problem_movies"] == {k: want[k] for k in ("rejected", "standing_out",
                                                          "failed")}
    assert got["problems"] == {"rejected": want["counts"]["rejected"],
                               "failed": want["counts"]["failed"],
                               "standing_out": len(want["standing_out"])}
    listed = [s for s in pages(client, "/v1/sessions", sort="name", limit=1000)
              if s["id"] == session_id]
    if want["counts"]["movies"]:
        assert len(listed) == 1
        summary = {k: v for k, v in got.items()
                   if k not in ("cameras", "rate", "problem_movies")}
        assert listed[0] == summary
    return got


@pytest.fixture(autouse=True)
def _figures_compared_at_once(figures_at_once):
    """Every figure is compared right after the change that moved it."""


@pytest.fixture
def client(tmp_path, shared):
    with make_client(tmp_path / "data", allowed_roots=[shared], workers=1) as c:
        yield c


def catalog_rows(data_dir: Path, sql: str) -> list[tuple]:
    """The embedded catalog read with plain sqlite3, not through the service."""
    with sqlite3.connect(f"file:{data_dir / 'catalog.sqlite3'}?mode=ro", uri=True) as db:
        return db.execute(sql).fetchall()


# -- placement -----------------------------------------------------------------------------

def test_every_arrival_path_places_its_movie(client, tmp_path, shared):
    days = utc_days()
    # PUT, named and by default
    named = put(client, movie(tmp_path, "put.mrc", seed=1), session="grid-1",
                project="lab-a")
    assert_placed(client, named, "grid-1", "lab-a", "upload")
    plain = put(client, movie(tmp_path, "plain.mrc", seed=2))
    found = session(client, plain["session_id"])
    assert found["project"] == "default" and found["source"] == "upload"
    assert found["name"] in {f"upload-{d}" for d in days}
    # multipart, into the same session: found by (project, name), not made twice
    again = multipart(client, movie(tmp_path, "multi.mrc", seed=3), session="grid-1",
                      project="lab-a")
    assert again["session_id"] == named["session_id"]
    # the same session name in another project is another session
    other = multipart(client, movie(tmp_path, "multi2.mrc", seed=4), session="grid-1",
                      project="lab-b")
    assert other["session_id"] != named["session_id"]
    assert_placed(client, other, "grid-1", "lab-b", "upload")
    # a conversion's upload
    path = movie(tmp_path, "conv.mrc", seed=5)
    response = client.post("/v1/conversions", params={"mode": 1, "session": "conv-day",
                                                      "project": "lab-a"},
                           files={"file": (path.name, path.read_bytes())})
    assert response.status_code == 202, response.text
    assert wait_job(client, response.json()["job"]["id"])["state"] == "done"
    converted = client.get(f"/v1/datasets/{response.json()['dataset']['id']}").json()
    assert_placed(client, converted, "conv-day", "lab-a", "upload")
    # tus: Upload-Metadata session / project; without them the defaults
    by_tus = tus(client, movie(tmp_path, "tus.mrc", seed=6), session="tus-grid",
                 project="lab-c")
    assert_placed(client, by_tus, "tus-grid", "lab-c", "upload")
    tus_plain = tus(client, movie(tmp_path, "tus2.mrc", seed=7))
    assert tus_plain["session_id"] == plain["session_id"]  # upload-<day>, default
    # registrations: named; else the folder under the allowed root; at the root itself
    # registration-<UTC date>
    epu = shared / "EPU_session_7" / "Images-Disc1" / "GridSquare_1" / "Data"
    epu.mkdir(parents=True)
    by_folder = register(client, movie(epu, "FoilHole_1_fractions.mrc", seed=8))
    assert_placed(client, by_folder, "EPU_session_7", "default", "registration")
    explicit = register(client, movie(epu, "FoilHole_2_fractions.mrc", seed=9),
                        session="krios-2026-12", project="lab-a")
    assert_placed(client, explicit, "krios-2026-12", "lab-a", "registration")
    at_root = register(client, movie(shared, "loose.mrc", seed=10))
    found = session(client, at_root["session_id"])
    assert found["name"] in {f"registration-{d}" for d in days}
    assert (found["project"], found["source"]) == ("default", "registration")
    # every dataset listed with its session, and each session lists exactly its own
    everything = pages(client, "/v1/datasets", limit=1000)
    assert len(everything) == 10 and all(d["session_id"] for d in everything)
    by_session = Counter(d["session_id"] for d in everything)
    for session_id, count in by_session.items():
        listed = pages(client, "/v1/datasets", session=session_id, limit=3)
        assert len(listed) == count
        assert {d["session_id"] for d in listed} == {session_id}
        assert session(client, session_id)["counts"]["movies"] == count
    assert client.get("/v1/datasets", params={"session": "nope"}).json()["items"] == []


def test_sidecars_follow_their_movie(client, tmp_path):
    # before its movie (the sidecar names its movie's project; a session name on a
    # sidecar makes no session)
    early = client.put("/v1/uploads/early.mrc.mdoc", content=mdoc(300, 0.83, 40, 2).encode(),
                       params={"project": "lab-a", "session": "ignored-for-sidecars"})
    assert early.status_code == 201 and early.json()["sidecar"]["dataset_id"] is None
    first = put(client, movie(tmp_path, "early.mrc", frames=4), session="s", project="lab-a")
    assert first["voltage_kv"] == 300 and first["sidecars"]["mdoc"]["name"] == \
        "early.mrc.mdoc"
    # after its movie
    second = put(client, movie(tmp_path, "late.mrc", frames=5, seed=1), session="s",
                 project="lab-a")
    late = client.put("/v1/uploads/late.mrc.mdoc", content=mdoc(200, 1.1, 50, 3).encode(),
                      params={"project": "lab-a"})
    assert late.json()["sidecar"]["dataset_id"] == second["id"]
    for ds in (first, second):
        now = client.get(f"/v1/datasets/{ds['id']}").json()
        assert (now["session_id"], now["project"]) == (first["session_id"], "lab-a")
    figures = assert_figures(client, first["session_id"])
    assert figures["acquisition"]["voltage_kv"] == {"min": 200, "max": 300}
    assert [s["name"] for s in pages(client, "/v1/sessions", sort="name")] == ["s"]
    assert catalog_rows(Path(client.app.state.service.settings.data_dir),
                        "SELECT name FROM sessions") == [("s",)]


BAD = {"empty": "", "blank": "   ", "201 characters": "x" * 201,
       "control character": "grid\x07one", "newline": "grid\none"}


@pytest.mark.parametrize("what", ["session", "project"])
def test_bad_names_are_refused_and_nothing_is_stored(client, tmp_path, shared, what):
    path = movie(tmp_path, "m.mrc")
    data = path.read_bytes()
    registered = movie(shared, "r.mrc")
    bad = dict(BAD)
    if what == "project":
        bad["101 characters"] = "p" * 101
        del bad["201 characters"]
    for why, value in bad.items():
        answers = {
            "PUT": client.put("/v1/uploads/m.mrc", content=data, params={what: value}),
            "multipart": client.post("/v1/uploads", params={what: value},
                                     files={"file": ("m.mrc", data)}),
            "conversion": client.post("/v1/conversions", params={what: value, "mode": 1},
                                      files={"file": ("m.mrc", data)}),
            "tus": tus_create(client, "m.mrc", len(data), **{what: value}),
            "registration": client.post("/v1/registrations",
                                        json={"path": str(registered), what: value}),
        }
        for path_name, response in answers.items():
            assert response.status_code in (400, 422), (why, path_name, response.text)
            body = response.json()
            assert body["error"] in ("bad_request", "invalid_request",
                                     "unprocessable"), body
            detail = body["detail"]
            if isinstance(detail, list):  # request validation: one problem per field
                assert any(p["where"].split(".")[-1] == what for p in detail), body
            else:
                assert detail["where"] == what, (why, path_name, body)
    data_dir = Path(client.app.state.service.settings.data_dir)
    for table in ("datasets", "sessions", "tus_uploads", "jobs"):
        assert catalog_rows(data_dir, f"SELECT count(*) FROM {table}") == [(0,)], table
    assert files_under(data_dir / "datasets") == []


def test_push_places_movies_by_folder_or_as_told(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    days = tmp_path / "Krios_day_3"
    days.mkdir()
    movie(days, "a.mrc", seed=1)
    (days / "a.mrc.mdoc").write_text(mdoc(300, 0.83, 40, 2))
    told = tmp_path / "elsewhere"
    told.mkdir()
    movie(told, "b.mrc", seed=2)
    (told / "b.mrc.mdoc").write_text(mdoc(200, 1.1, 50, 3))
    proc, base = start_server(tmp_path / "data")
    try:
        plain = push_cli(base, days)
        assert plain.returncode == 0, plain.stderr
        named = push_cli(base, told, "--session", "grid-9", "--project", "lab-x")
        assert named.returncode == 0, named.stderr
        with httpx.Client(base_url=base) as c:
            by_name = {d["name"]: d for d in pages(c, "/v1/datasets")}
            assert set(by_name) == {"a.mrc", "b.mrc"}
            a = assert_placed(c, by_name["a.mrc"], "Krios_day_3", "default", "upload")
            b = assert_placed(c, by_name["b.mrc"], "grid-9", "lab-x", "upload")
            # each movie's .mdoc went with it, into its project
            assert by_name["a.mrc"]["voltage_kv"] == 300
            assert by_name["b.mrc"]["voltage_kv"] == 200
            # a server process coalesces session recomputes (1 s): the .mdoc that
            # followed its movie shows within that
            for found, kv in ((a, 300), (b, 200)):
                deadline = time.monotonic() + 10
                while found["acquisition"]["voltage_kv"] != {"min": kv, "max": kv}:
                    assert time.monotonic() < deadline, found
                    time.sleep(0.1)
                    found = session(c, found["id"])
            # EPU nests its movies a few folders down in the session's folder: the
            # session is the folder pushed, not "Data"
            epu = tmp_path / "EPU_grid_4"
            nested = epu / "Images-Disc1" / "GridSquare_1" / "Data"
            nested.mkdir(parents=True)
            movie(nested, "FoilHole_1_fractions.mrc", seed=3)
            pusher = Pusher(Server(base), out=io.StringIO(), folders=[epu])
            [outcome] = pusher.push_all(collect([epu]))
            assert outcome.state == "ready", outcome.line()
            assert_placed(c, c.get(f"/v1/datasets/{outcome.dataset_id}").json(),
                          "EPU_grid_4", "default", "upload")
    finally:
        proc.terminate()
        proc.wait()


# -- figures ---------------------------------------------------------------------------------

def blanked_movie(folder: Path) -> Path:
    """Counting noise, one frame (4) all zero: a blanked frame."""
    data = counting_movie((8, 32, 32), lam=3.0, seed=11)
    data[4] = 0
    return write_raw_mrc(folder / "blanked.mrc", data, 101)


def falling_movie(folder: Path) -> Path:
    """Counting noise whose dose falls gently (2 % a frame): no frame stands out."""
    rng = np.random.default_rng(12)
    frames = [np.minimum(rng.poisson(3.0 * (1 - 0.02 * k), (32, 32)), 15)
              for k in range(10)]
    return write_raw_mrc(folder / "falling.mrc", np.stack(frames).astype(np.int8), 101)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request):
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("pg_url")


def test_figures_equal_a_recount_after_every_change(tmp_path, shared, database_url):
    place = {"session": "figures", "project": "lab-f"}
    # a registration queued by a replica that runs no jobs: in flight
    with make_client(tmp_path / "data", allowed_roots=[shared], workers=0,
                     database_url=database_url) as c:
        gone = movie(shared, "gone.mrc", frames=3, seed=7)
        response = c.post("/v1/registrations", json={"path": str(gone), **place})
        assert response.status_code == 202, response.text
        queued = response.json()
        sid = queued["dataset"]["session_id"]
        figures = assert_figures(c, sid)
        assert figures["counts"]["in_flight"] == 1 and figures["counts"]["movies"] == 1
    gone.unlink()  # its file goes before a worker gets to it: the dataset fails
    with make_client(tmp_path / "data", allowed_roots=[shared], workers=1,
                     database_url=database_url) as c:
        assert wait_job(c, queued["job"]["id"])["state"] == "failed"
        figures = assert_figures(c, sid)
        assert figures["counts"]["failed"] == 1 and figures["counts"]["in_flight"] == 0
        assert figures["problem_movies"]["failed"] == [
            {"dataset_id": queued["dataset"]["id"], "name": "gone.mrc"}]
        a = multipart(c, movie(tmp_path, "a.mrc", frames=6, seed=1),
                      {"a.mrc.mdoc": mdoc(300, 0.83, 40, 2.5), "a_info.txt": de_info("Apollo")},
                      **place)
        assert a["session_id"] == sid
        figures = assert_figures(c, sid)
        assert figures["counts"]["movies"] == 2 and figures["microscope"] == "Apollo"
        b = multipart(c, blanked_movie(tmp_path), {"blanked.mrc.mdoc": mdoc(200, 1.06, 64, 4)},
                      **place)
        assert_figures(c, sid)
        falling = put(c, falling_movie(tmp_path), **place)
        assert_figures(c, sid)
        bad = put(c, truncated(tmp_path, "cut.mrc"), **place)
        assert bad["status"] == "rejected"
        figures = assert_figures(c, sid)
        # what the recount compared, spelled out
        assert figures["counts"]["movies"] == 5 and figures["counts"]["rejected"] == 1
        assert figures["acquisition"]["voltage_kv"] == {"min": 200, "max": 300}
        assert figures["acquisition"]["frames"] == {"min": 4, "max": 10}  # failed: unknown
        assert figures["acquisition"]["dose_per_frame"] == pytest.approx(
            {"min": 40 / 6, "max": 64 / 8})
        [rejected] = figures["problem_movies"]["rejected"]
        assert rejected["dataset_id"] == bad["id"]
        assert rejected["finding"]["severity"] == "error" and \
            "truncated" in rejected["finding"]["message"]
        assert figures["problem_movies"]["standing_out"] == [
            {"dataset_id": b["id"], "name": "blanked.mrc", "frames": 1}]
        means = c.get(f"/v1/datasets/{b['id']}/frames/stats").json()["mean"]
        assert [k for k, m in enumerate(means) if m == 0] == [4]
        assert c.get(f"/v1/datasets/{falling['id']}").json()["standout_frames"] == 0
        # a mdoc arriving later moves the ranges
        c.put("/v1/uploads/falling.mrc.mdoc", content=mdoc(120, 2.0, 10, 1).encode(),
              params={"project": "lab-f"})
        assert assert_figures(c, sid)["acquisition"]["voltage_kv"] == {"min": 120, "max": 300}
        # a conversion stored: its bytes count as stored
        before = session(c, sid)["counts"]["bytes_stored"]
        job = c.post("/v1/conversions", json={"dataset_id": a["id"], "mode": 1}).json()["job"]
        assert wait_job(c, job["id"])["state"] == "done"
        after = assert_figures(c, sid)["counts"]["bytes_stored"]
        assert after > before
        # a deletion
        assert c.delete(f"/v1/datasets/{b['id']}").status_code == 200
        figures = assert_figures(c, sid)
        assert figures["problem_movies"]["standing_out"] == []
        assert figures["acquisition"]["voltage_kv"] == {"min": 120, "max": 300}
        for ds in (a, falling, bad, queued["dataset"]):
            assert c.delete(f"/v1/datasets/{ds['id']}").status_code == 200
        figures = assert_figures(c, sid)
        assert figures["counts"]["movies"] == 0 and figures["first_movie_at"] is None
        assert all(v is None for v in figures["acquisition"].values())


def slow_standout(means: list[float]) -> list[int]:
    """The rule written out the obvious way: more than 6 x 1.4826 x MAD and more than
    5 % of the median away from the median frame mean."""
    if len(means) < 3:
        return []
    ordered = sorted(means)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    deviations = sorted(abs(m - median) for m in means)
    mad = deviations[n // 2] if n % 2 else (deviations[n // 2 - 1] + deviations[n // 2]) / 2
    out = []
    for k, m in enumerate(means):
        off = abs(m - median)
        if off > 6 * (1.4826 * mad) and off > 0.05 * abs(median) and off > 0:
            out.append(k)
    return out


def test_standout_frames_against_the_obvious_rule():
    rng = random.Random(20)
    for trial in range(3000):
        n = rng.choice([0, 1, 2, 3, 4, 5, 8, 40, 41])
        level = rng.choice([0.0, 1.0, 3.0, -2.0, 1000.0])
        noise = rng.choice([0.0, 0.01, 0.2])
        means = [level + rng.gauss(0, noise) for _ in range(n)]
        if rng.random() < 0.5 and n:
            fall = rng.choice([0.001, 0.02])
            means = [m * (1 - fall * k) for k, m in enumerate(means)]
        for _ in range(rng.choice([0, 0, 1, 2])):
            if n:
                means[rng.randrange(n)] = rng.choice([0.0, level * 2, level + 5, -level])
        if rng.random() < 0.1 and n:
            means = [round(m) for m in means]  # ties
        assert standout_frames(means) == slow_standout(means), (trial, means)
    assert standout_frames([3.0] * 7 + [0.0] + [3.0] * 7) == [7]
    assert standout_frames([3.0 * (1 - 0.02 * k) for k in range(40)]) == []
    assert standout_frames(None) == [] and standout_frames([1.0, 0.0]) == []


# -- concurrency -----------------------------------------------------------------------------

def land_at_once(clients: list, folder: Path, per_client: int, place: dict) -> list[str]:
    errors, ids = [], []

    def send(k: int, client) -> None:
        try:
            for i in range(per_client):
                path = movie(folder, f"c{k}_{i}.mrc", frames=2 + i % 3, seed=100 * k + i)
                ids.append(put(client, path, **place)["id"])
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)
    threads = [threading.Thread(target=send, args=(k, c)) for k, c in enumerate(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    return ids


def test_two_writers_at_once_on_sqlite(tmp_path, shared):
    place = {"session": "busy", "project": "lab-c"}
    with make_client(tmp_path / "data", allowed_roots=[shared], workers=2) as c:
        ids = land_at_once([c, c], tmp_path, 8, place)
        sid = c.get(f"/v1/datasets/{ids[0]}").json()["session_id"]
        counts = assert_figures(c, sid)["counts"]
        assert counts["movies"] == 16
        # The figures are the row's, never added up per request: a change made behind
        # the service's back (plain SQL) shows in the dataset, not in its session...
        db = sqlite3.connect(tmp_path / "data" / "catalog.sqlite3")
        with db:
            db.execute("UPDATE datasets SET size_bytes = size_bytes + 1000 WHERE id = ?",
                       (ids[0],))
        db.close()
        assert session(c, sid)["counts"] == counts
        # ... until the session's next change recomputes them whole
        put(c, movie(tmp_path, "one-more.mrc", seed=999), **place)
        assert assert_figures(c, sid)["counts"]["bytes_received"] == \
            counts["bytes_received"] + 1000 + (tmp_path / "one-more.mrc").stat().st_size


def test_two_replicas_at_once_on_postgresql(tmp_path, shared, pg_url):
    place = {"session": "busy", "project": "lab-c"}
    with make_client(tmp_path / "one", allowed_roots=[shared], workers=1,
                     database_url=pg_url) as one, \
            make_client(tmp_path / "two", allowed_roots=[shared], workers=1,
                        database_url=pg_url) as two:
        ids = land_at_once([one, two], tmp_path, 8, place)
        sid = one.get(f"/v1/datasets/{ids[0]}").json()["session_id"]
        assert {two.get(f"/v1/datasets/{i}").json()["session_id"] for i in ids} == {sid}
        for c in (one, two):
            assert assert_figures(c, sid)["counts"]["movies"] == 16


# -- the list ----------------------------------------------------------------------------------

def test_list_filters_sorts_and_pages(client, tmp_path):
    made = {}  # name -> session
    plan = [("alpha", "lab-a", 1, "Apollo"), ("bravo", "lab-a", 3, None),
            ("charlie", "lab-b", 2, "Falcon"), ("delta", "lab-b", 1, "Apollo"),
            ("echo", "lab-a", 2, None)]
    seed = 0
    for name, project, count, camera in plan:
        for i in range(count):
            seed += 1
            path = movie(tmp_path, f"{name}{i}.mrc", seed=seed)
            sidecars = {f"{name}{i}_info.txt": de_info(camera)} if camera else None
            ds = multipart(client, path, sidecars, session=name, project=project)
        made[name] = session(client, ds["session_id"])
    registered = register(client, movie(Path(client.app.state.service.settings
                                             .allowed_roots[0]), "reg.mrc", seed=99),
                          session="foxtrot", project="lab-b")
    made["foxtrot"] = session(client, registered["session_id"])

    def names(**params) -> list[str]:
        return [s["name"] for s in pages(client, "/v1/sessions", limit=2, **params)]
    everything = list(made.values())
    assert sorted(names()) == sorted(made)
    assert sorted(names(project="lab-a")) == ["alpha", "bravo", "echo"]
    assert names(project="nobody") == []
    assert sorted(names(microscope="Apollo")) == ["alpha", "delta"]
    assert names(microscope="Falcon") == ["charlie"]
    assert names(source="registration") == ["foxtrot"]
    assert sorted(names(source="upload")) == ["alpha", "bravo", "charlie", "delta", "echo"]
    cut = made["charlie"]["first_movie_at"]
    assert sorted(names(started_after=cut)) == sorted(
        s["name"] for s in everything if s["first_movie_at"] > cut)
    assert sorted(names(started_before=cut)) == sorted(
        s["name"] for s in everything if s["first_movie_at"] < cut)
    assert sorted(names(project="lab-b", started_after=cut)) == ["delta", "foxtrot"]
    for sort in ("last_movie_at", "first_movie_at", "name", "movies"):
        for order in ("asc", "desc"):
            key = (lambda s: (s["counts"]["movies"], s["id"])) if sort == "movies" else \
                (lambda s, sort=sort: (s[sort], s["id"]))
            want = [s["name"] for s in sorted(everything, key=key, reverse=order == "desc")]
            assert names(sort=sort, order=order) == want, (sort, order)
    # pages cover every session exactly once while new sessions are added
    for sort in ("last_movie_at", "name", "movies"):
        seen, cursor, added = [], None, 0
        while True:
            params = {"sort": sort, "limit": 2, **({"cursor": cursor} if cursor else {})}
            body = client.get("/v1/sessions", params=params).json()
            seen += [s["id"] for s in body["items"]]
            cursor = body["next_cursor"]
            if cursor is None:
                break
            added += 1
            put(client, movie(tmp_path, f"new-{sort}-{added}.mrc", seed=1000 + 10 * len(seen)
                              + added), session=f"new-{sort}-{added}", project="lab-z")
        assert len(seen) == len(set(seen)) and {s["id"] for s in everything} <= set(seen)
        everything = pages(client, "/v1/sessions", limit=1000)
    for cursor in ("garbage!", base64.urlsafe_b64encode(b'["name","x","y"]').decode()):
        response = client.get("/v1/sessions", params={"cursor": cursor})
        assert response.status_code == 400 and response.json()["error"] == "bad_request"
    response = client.get("/v1/sessions", params={"sort": "size"})
    assert response.status_code == 422 and response.json()["error"] == "invalid_request"
    # GET /v1/datasets?session=: exactly that session's datasets
    for s in pages(client, "/v1/sessions", limit=1000):
        listed = pages(client, "/v1/datasets", session=s["id"], limit=1)
        assert len(listed) == s["counts"]["movies"]
        assert {d["session_id"] for d in listed} == {s["id"]}


# -- admin -------------------------------------------------------------------------------------

TOKENS = {"boss": ("admin", None), "old-reader": ("read", ["lab-old"]),
          "new-reader": ("read", ["lab-new"]), "writer": ("write", ["lab-old"])}


def bearer(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer mrci_{who}-secret"}


@pytest.fixture
def admin_client(tmp_path, shared):
    tokens = [{"name": who, "role": role, "sha256": hash_token(f"mrci_{who}-secret"),
               **({"projects": projects} if projects else {})}
              for who, (role, projects) in TOKENS.items()]
    with make_client(tmp_path / "data", allowed_roots=[shared], workers=1,
                     tokens=tokens) as c:
        c.headers.update(bearer("boss"))
        yield c


def test_rename_and_move_a_session(admin_client, tmp_path):
    c = admin_client
    first = put(c, movie(tmp_path, "m1.mrc", seed=1), session="grid", project="lab-old")
    put(c, movie(tmp_path, "m2.mrc", seed=2), session="grid", project="lab-old")
    clash = put(c, movie(tmp_path, "m3.mrc", seed=3), session="taken", project="lab-new")
    sid = first["session_id"]
    renamed = c.patch(f"/v1/sessions/{sid}", json={"name": "grid-1"})
    assert renamed.status_code == 200 and renamed.json()["name"] == "grid-1"
    assert session(c, sid)["name"] == "grid-1"
    # a later upload naming the new name lands in it
    third = put(c, movie(tmp_path, "m4.mrc", seed=4), session="grid-1", project="lab-old")
    assert third["session_id"] == sid
    old, new = bearer("old-reader"), bearer("new-reader")
    assert c.get(f"/v1/sessions/{sid}", headers=old).status_code == 200
    assert c.get(f"/v1/sessions/{sid}", headers=new).status_code == 404
    # a name taken in the target project: 409, nothing changed
    refused = c.patch(f"/v1/sessions/{sid}", json={"name": "taken", "project": "lab-new"})
    assert refused.status_code == 409 and refused.json()["error"] == "conflict"
    assert (session(c, sid)["name"], session(c, sid)["project"]) == ("grid-1", "lab-old")
    assert {d["project"] for d in pages(c, "/v1/datasets", session=sid)} == {"lab-old"}
    moved = c.patch(f"/v1/sessions/{sid}", json={"project": "lab-new"})
    assert moved.status_code == 200 and moved.json()["project"] == "lab-new"
    rows = pages(c, "/v1/datasets", session=sid)
    assert len(rows) == 3 and {d["project"] for d in rows} == {"lab-new"}
    assert c.get(f"/v1/sessions/{sid}", headers=old).status_code == 404
    assert c.get(f"/v1/sessions/{sid}", headers=new).status_code == 200
    old_sees = [d["id"] for d in c.get("/v1/datasets", headers=old).json()["items"]]
    assert old_sees == []
    new_sees = {d["id"] for d in c.get("/v1/datasets", headers=new).json()["items"]}
    assert new_sees == {d["id"] for d in rows} | {clash["id"]}
    for ds in rows:
        assert c.get(f"/v1/datasets/{ds['id']}", headers=old).status_code == 404
    assert [s["name"] for s in c.get("/v1/sessions", headers=old).json()["items"]] == []
    # a writer of the old project places nothing into the moved session any more: its
    # "grid-1" in lab-old is a new session
    fourth = put(c, movie(tmp_path, "m5.mrc", seed=5), session="grid-1", project="lab-old")
    assert fourth["session_id"] != sid
    assert_figures(c, sid)
    # refusals
    assert c.patch("/v1/sessions/nope", json={"name": "x"}).status_code == 404
    for body in ({}, {"name": None}, {"name": ""}, {"project": "a\x00b"}, {"name": 5}):
        response = c.patch(f"/v1/sessions/{sid}", json=body)
        assert response.status_code in (400, 422), (body, response.text)
        assert response.json()["error"] in ("bad_request", "invalid_request",
                                            "unprocessable")
    assert c.patch(f"/v1/sessions/{sid}", json={"name": "x"},
                   headers=bearer("writer")).status_code == 403
    assert session(c, sid)["name"] == "grid-1"


def test_delete_a_session_with_its_datasets(admin_client, tmp_path, shared):
    c = admin_client
    data_dir = tmp_path / "data"
    keep = put(c, movie(tmp_path, "keep.mrc", seed=1), session="other", project="lab-old")
    doomed = [put(c, movie(tmp_path, f"d{i}.mrc", seed=10 + i), session="doomed",
                  project="lab-old") for i in range(2)]
    (shared / "scope").mkdir()
    source = movie(shared / "scope", "shared.mrc", seed=20)
    before = (source.read_bytes(), source.stat().st_mtime_ns)
    doomed.append(register(c, source, session="doomed", project="lab-old"))
    sid = doomed[0]["session_id"]
    assert {d["session_id"] for d in doomed} == {sid}
    c.get(f"/v1/datasets/{doomed[0]['id']}/download", params={"mode": 1})  # a conversion
    ids = [d["id"] for d in doomed]
    stored = [p for p in files_under(data_dir) if any(i in p.parts for i in ids)]
    assert stored  # their objects are there now
    assert c.delete(f"/v1/sessions/{sid}", headers=bearer("writer")).status_code == 403
    response = c.delete(f"/v1/sessions/{sid}")
    assert response.status_code == 200 and response.json() == {"deleted": sid, "datasets": 3}
    # gone from every list at once
    assert c.get(f"/v1/sessions/{sid}").status_code == 404
    assert sid not in {s["id"] for s in pages(c, "/v1/sessions", sort="name")}
    assert c.get("/v1/datasets", params={"session": sid}).json()["items"] == []
    assert {d["id"] for d in pages(c, "/v1/datasets")} == {keep["id"]}
    for i in ids:
        assert c.get(f"/v1/datasets/{i}").status_code == 404
    assert c.delete(f"/v1/sessions/{sid}").status_code == 404
    # their stored objects go shortly after (the data folder listed here, not asked)
    rows = "SELECT count(*) FROM datasets WHERE id IN (" + ",".join(f"'{i}'" for i in ids) + ")"
    deadline = time.monotonic() + 20
    while [p for p in files_under(data_dir) if any(i in p.parts for i in ids)] or \
            catalog_rows(data_dir, rows) != [(0,)]:
        assert time.monotonic() < deadline, "objects left after the session's deletion"
        time.sleep(0.05)
    # the registered file on shared storage is never touched; the other session stays
    assert (source.read_bytes(), source.stat().st_mtime_ns) == before
    assert c.get(f"/v1/datasets/{keep['id']}").json()["status"] == "ready"
    assert_figures(c, keep["session_id"])


# -- migration ----------------------------------------------------------------------------------

def test_an_old_catalog_gets_its_days_sessions(tmp_path):
    path = tmp_path / "catalog.sqlite3"
    shutil.copy(GOLDEN, path)
    with sqlite3.connect(path) as db:
        old = db.execute("SELECT id, source, created_at FROM datasets").fetchall()
    catalog = Catalog(f"sqlite:///{path}")
    catalog.close()
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("SELECT * FROM datasets")]
        made = {r["id"]: dict(r) for r in db.execute("SELECT * FROM sessions")}
    assert len(rows) == len(old)
    for source, day in {(s, t[:10]) for _, s, t in old}:
        [found] = [s for s in made.values() if (s["name"], s["project"], s["source"]) ==
                   (f"{source}-{day}", "default", source)]
        mine = [r for r in rows if r["source"] == source and r["created_at"][:10] == day]
        assert {r["session_id"] for r in mine} == {found["id"]}
        assert {r["project"] for r in mine} == {"default"}
        live = [r for r in mine if r["status"] != "deleting"]
        statuses = Counter(r["status"] for r in live)
        assert (found["movies"], found["ready"], found["rejected"], found["failed"]) == (
            len(live), statuses["ready"], statuses["rejected"], statuses["failed"])
        assert found["bytes_received"] == sum(r["size_bytes"] or 0 for r in live)
        assert found["bytes_stored"] == sum(r["stored_bytes"] or 0 for r in live)
        assert found["first_movie_at"] == min(r["created_at"] for r in live)
        assert found["last_movie_at"] == max(r["created_at"] for r in live)
        summary = json.loads(found["summary"])
        volts = [r["voltage_kv"] for r in live if r["voltage_kv"] is not None]
        assert summary["acquisition"]["voltage_kv"] == (
            {"min": min(volts), "max": max(volts)} if volts else None)
        rejected = [r for r in sorted(live, key=lambda r: (r["created_at"], r["id"]))
                    if r["status"] == "rejected"]
        assert [p["dataset_id"] for p in summary["problems"]["rejected"]] == \
            [r["id"] for r in rejected]
        for problem, row in zip(summary["problems"]["rejected"], rejected):
            info = json.loads(row["info"])
            assert problem["finding"] == first_finding(
                info.get("findings", info.get("header_findings")) or [])
    days = {(s, t[:10]) for _, s, t in old}
    # a resumable upload whose movie has not landed waits in upload-<its day>; one done,
    # in its dataset's session
    with sqlite3.connect(path) as db:
        uploads = db.execute("SELECT id, created_at, dataset_id, session_id "
                             "FROM tus_uploads").fetchall()
    dataset_session = {r["id"]: r["session_id"] for r in rows}
    for upload_id, created, dataset_id, session_id in uploads:
        if dataset_id in dataset_session:
            assert session_id == dataset_session[dataset_id], upload_id
        else:
            assert (made[session_id]["name"], made[session_id]["project"]) == \
                (f"upload-{created[:10]}", "default")
            days.add(("upload", created[:10]))
    assert len(made) == len(days)
    # and the service answers with them
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(path, data_dir / "catalog.sqlite3")
    with make_client(data_dir, workers=0) as c:
        listed = pages(c, "/v1/sessions", sort="name", order="asc")
        assert [s["name"] for s in listed] == sorted(s["name"] for s in made.values())
        for s in listed:
            assert_figures(c, s["id"])


def test_an_open_upload_of_a_deleted_session_lands_nowhere(admin_client, tmp_path):
    """A tus upload created in a session that is deleted before its movie's header
    arrives (no dataset yet): its movie never lands as a dataset of no session."""
    c = admin_client
    first = put(c, movie(tmp_path, "first.mrc", seed=1), session="short", project="lab-old")
    path = movie(tmp_path, "late.mrc", seed=2)
    data = path.read_bytes()
    made = tus_create(c, "late.mrc", len(data), session="short", project="lab-old")
    assert made.status_code == 201
    assert c.delete(f"/v1/sessions/{first['session_id']}").json()["datasets"] == 1
    late = c.patch(made.headers["location"], content=data, headers={
        **TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"})
    assert late.status_code == 410, late.text
    orphans = [d for d in pages(c, "/v1/datasets")
               if c.get(f"/v1/sessions/{d['session_id']}").status_code != 200]
    assert orphans == []


def test_a_move_onto_a_copy_of_its_bytes_is_refused(admin_client, tmp_path):
    """Moving a session into a project that holds a live upload of the same bytes as one
    of its movies would leave that project with two: 409 saying so, nothing changed; a
    move carries the movies' sidecars into the new project."""
    c = admin_client
    path = movie(tmp_path, "same.mrc", seed=3)
    mine = multipart(c, path, {"same.mrc.mdoc": mdoc(300, 0.83, 40, 2)}, session="s",
                     project="lab-old")
    other = c.put("/v1/uploads/same.mrc", content=path.read_bytes(),
                  params={"session": "t", "project": "lab-new"})
    assert other.status_code in (200, 201), other.text
    if other.json()["dataset"]["id"] == mine["id"]:
        pytest.skip("uploads are deduplicated across projects here")
    sid = mine["session_id"]
    refused = c.patch(f"/v1/sessions/{sid}", json={"project": "lab-new"})
    assert refused.status_code == 409, refused.text
    assert "same bytes" in refused.json()["detail"]["message"]
    assert session(c, sid)["project"] == "lab-old"
    assert c.get(f"/v1/datasets/{mine['id']}").json()["project"] == "lab-old"
    moved = c.patch(f"/v1/sessions/{sid}", json={"project": "lab-third"})
    assert moved.status_code == 200 and moved.json()["project"] == "lab-third"
    assert catalog_rows(tmp_path / "data", "SELECT project FROM sidecars WHERE dataset_id = "
                        f"'{mine['id']}'") == [("lab-third",)]


def test_a_row_made_after_its_session_was_deleted_goes_with_it(tmp_path):
    """place() made the session, DELETE /v1/sessions removed it, then the movie's header
    arrived: no row is made (the pass stops: nothing stored), never a dataset of no
    session; a row takes its project from its session, whatever the caller said."""
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    try:
        made = catalog.session_for("lab", "brief", "upload")
        catalog.add_dataset(id="d1", name="a.mrc", source="upload", status="ready",
                            size_bytes=1, path="", session_id=made["id"], project="lab")
        assert catalog.delete_session(made["id"]) == ["d1"]
        assert catalog.add_dataset(id="d2", name="b.mrc", source="upload",
                                   status="receiving", size_bytes=1, path="",
                                   session_id=made["id"], project="lab") is None
        assert catalog.get_dataset("d2") is None
        assert sorted(catalog.tombstones()) == ["d1"]
        # a row placed in a live session, or in none, stays as it is
        other = catalog.session_for("lab", "other", "upload")
        catalog.add_dataset(id="d3", name="c.mrc", source="upload", status="receiving",
                            size_bytes=1, path="", session_id=other["id"], project="stale")
        assert catalog.get_dataset("d3")["project"] == "lab"
        catalog.add_dataset(id="d4", name="d.mrc", source="upload", status="receiving",
                            size_bytes=1, path="")
        assert [catalog.get_dataset(i)["status"] for i in ("d3", "d4")] == ["receiving"] * 2
        assert catalog.get_session(other["id"])["in_flight"] == 1
    finally:
        catalog.close()


def test_rate_over_hours_of_movies(tmp_path, database_url):
    """Movies spread over an hour (times as the catalog records them): the timeline has
    a bucket per 10 minutes that saw movies, the rate is movies per 10 minutes from the
    first to the last."""
    catalog = Catalog(database_url or f"sqlite:///{tmp_path / 'c.sqlite3'}")
    try:
        made = catalog.session_for("lab", "long", "upload")
        times = ["2026-12-06T10:01:00.000000+00:00", "2026-12-06T10:05:59.999000+00:00",
                 "2026-12-06T10:17:00.000000+00:00", "2026-12-06T10:45:00.000000+00:00",
                 "2026-12-06T11:02:00.000000+00:00", "2026-12-06T11:09:30.000000+00:00"]
        for i, stamp in enumerate(times):
            catalog.add_dataset(id=f"d{i}", name=f"m{i}.mrc", source="upload",
                                status="ready", size_bytes=10 + i, stored_bytes=5,
                                path="", session_id=made["id"], project="lab",
                                created_at=stamp, nz=4 + i, total_dose=40.0 + i)
        row = catalog.get_session(made["id"])
        rate = row["summary"]["rate"]
        minutes = (datetime.fromisoformat(times[-1]) -
                   datetime.fromisoformat(times[0])).total_seconds() / 60
        assert rate["per_bucket"] == pytest.approx(6 * 10 / minutes, abs=1e-3)
        assert rate["timeline"] == [
            {"start": "2026-12-06T10:00:00+00:00", "movies": 2},
            {"start": "2026-12-06T10:10:00+00:00", "movies": 1},
            {"start": "2026-12-06T10:40:00+00:00", "movies": 1},
            {"start": "2026-12-06T11:00:00+00:00", "movies": 2}]
        assert (row["first_movie_at"], row["last_movie_at"]) == (times[0], times[-1])
        assert (row["movies"], row["bytes_received"], row["bytes_stored"]) == (6, 75, 30)
        assert row["summary"]["acquisition"]["dose_per_frame"] == pytest.approx(
            {"min": min((40 + i) / (4 + i) for i in range(6)),
             "max": max((40 + i) / (4 + i) for i in range(6))})
    finally:
        catalog.close()


def test_a_put_whose_session_is_deleted_before_its_header_leaves_no_job_running(tmp_path):
    """A real serve: the PUT's session exists when the request starts and is deleted
    before the movie's header arrives. The upload's job goes in before its dataset row
    (so no crash can leave a row no job cleans up); here the row is never made, so the
    job ends at once, cancelled, and no dataset is left."""
    raw = movie(tmp_path, "late.mrc", seed=5).read_bytes()
    proc, base = start_server(tmp_path / "data")
    try:
        deleted = threading.Event()

        def body():
            # the request (and its session) exist by now: the server read the URL first
            deadline = time.monotonic() + 30
            while not (made := catalog_rows(tmp_path / "data", "SELECT id FROM sessions "
                                            "WHERE project = 'lab' AND name = 'gone'")):
                assert time.monotonic() < deadline, "the PUT's session never appeared"
                time.sleep(0.05)
            assert httpx.delete(f"{base}/v1/sessions/{made[0][0]}").status_code == 200
            deleted.set()
            yield raw

        answer = httpx.put(f"{base}/v1/uploads/late.mrc", content=body(), timeout=60,
                           params={"session": "gone", "project": "lab"},
                           headers={"Content-Length": str(len(raw))})
        assert deleted.is_set()
        assert answer.status_code == 409, answer.text
        assert "deleted" in answer.json()["detail"]
        jobs = catalog_rows(tmp_path / "data", "SELECT kind, state FROM jobs")
        assert jobs == [("upload", "cancelled")], jobs
        assert httpx.get(f"{base}/v1/datasets").json()["items"] == []
    finally:
        proc.terminate()
        proc.wait(30)
