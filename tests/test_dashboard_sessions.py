"""The dashboard's sessions pages in a real browser (headless Chromium against
``mrc-ingest serve``, as tests/test_dashboard.py).

The catalog: session ``grid1`` of project ``alpha`` (a good movie with its .mdoc, a movie
with a blanked frame, a truncated one that is rejected) and session ``grid2`` of project
``beta`` (one movie), all sent with ``?session=&project=``. The landing page must list them
with their figures as the API gives them, newest activity first; a session's page must keep
its URL across reload, back and forward, show its rate timeline and its problems (linked to
the datasets), and its datasets only; the project picker must appear for a token that sees
both projects (not for one limited to one) and keep its choice in the URL; and a movie
streaming into a session must show as in flight in the list, then ready, without a reload.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
import pytest

from service.auth import hash_token
from tests.api_helpers import start_server, upload_and_wait
from tests.reference import counting_movie, raw_header
from tests.test_acquisition import MDOC
from tests.test_dashboard import (chromium, needs_browser, query_of, shown_names, waiter,
                                  write_movie)

READ, WRITE, ALPHA = "mrci_sess-read", "mrci_sess-write", "mrci_sess-alpha"


@dataclass
class Site:
    base: str
    sessions: dict[str, str]   # session name -> id
    ids: dict[str, str]        # movie name -> dataset id


def api(site: Site, token: str = READ) -> httpx.Client:
    return httpx.Client(base_url=site.base, headers={"Authorization": f"Bearer {token}"},
                        timeout=60)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    work = tmp_path_factory.mktemp("dashboard-sessions")
    tokens = [{"name": "wall", "role": "read", "sha256": hash_token(READ)},
              {"name": "alpha-wall", "role": "read", "sha256": hash_token(ALPHA),
               "projects": ["alpha"]},
              {"name": "scope", "role": "write", "sha256": hash_token(WRITE)}]
    proc, base = start_server(work / "data", env={"MRC_INGEST_TOKENS": json.dumps(tokens)})
    try:
        blanked = counting_movie((16, 64, 64), seed=9)
        blanked[7] = 0
        cut = write_movie(work / "g1_cut.mrc", counting_movie((4, 64, 64), seed=2), 101, 1.0)
        cut.write_bytes(cut.read_bytes()[:-500])
        movies = [("alpha", "grid1", write_movie(work / "g1_mov01.mrc",
                                                 counting_movie((6, 64, 64)), 101, 0.83)),
                  ("alpha", "grid1", write_movie(work / "g1_blank.mrc", blanked, 101, 0.83)),
                  ("alpha", "grid1", cut),
                  ("beta", "grid2", write_movie(work / "g2_mov01.mrc",
                                                counting_movie((5, 64, 64), seed=5), 101, 1.06))]
        ids = {}
        with api(Site(base, {}, {}), WRITE) as c:
            assert c.put("/v1/uploads/g1_mov01.mrc.mdoc", content=MDOC,
                         params={"session": "grid1", "project": "alpha"}).status_code < 300
            for project, session, path in movies:
                ds = upload_and_wait(c, path, session=session, project=project)
                ids[path.name] = ds["id"]
            # the server coalesces session recomputes (1 s): wait for the last one
            deadline = time.monotonic() + 15
            while True:
                listed = c.get("/v1/sessions").json()["items"]
                counts = [s["counts"] for s in listed]
                if len(listed) == 2 and all(
                        n["in_flight"] == 0 and n["movies"] == n["ready"] + n["rejected"]
                        + n["failed"] for n in counts) and sum(
                        n["movies"] for n in counts) == len(movies):
                    break
                assert time.monotonic() < deadline, listed
                time.sleep(0.1)
        assert {s["name"] for s in listed} == {"grid1", "grid2"}
        yield Site(base, {s["name"]: s["id"] for s in listed}, ids)
    finally:
        proc.terminate()
        proc.wait()


@pytest.fixture
def browser(tmp_path, site):
    """Chromium with the read token (every project) in the page's local storage."""
    driver = chromium(tmp_path / "chromium-profile")
    driver.get(site.base + "/healthz")
    driver.execute_script(f"localStorage.setItem('mrc-ingest-token', '{READ}');")
    yield driver
    try:  # the page's scripts ran without an uncaught error
        assert [e for e in driver.get_log("browser") if e["source"] == "javascript"] == []
    finally:
        driver.quit()


def session_rows(driver) -> list[dict[str, str]]:
    """Each row of the sessions table, top to bottom: its id and each cell's text by
    column (one script call: rows may be repainted)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#s-rows tr.ses')].map((tr) => Object.assign("
        "  {id: tr.dataset.id}, Object.fromEntries([...tr.cells].map((td) => ["
        "    [...td.classList].find((c) => c.startsWith('c-')).slice(2), td.textContent]))))")


def size_text(n: int) -> str:
    """A byte count as the page writes it (decimal units, one decimal)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def ten_minute_buckets(timeline: list[dict]) -> int:
    """How many 10-minute buckets lie from the first bucket of a timeline to its last."""
    first, last = (datetime.fromisoformat(timeline[i]["start"]) for i in (0, -1))
    return (last - first) // timedelta(minutes=10) + 1


@needs_browser
def test_the_sessions_list_shows_sessions_made_by_uploads(site, browser):
    """The landing page lists both sessions, newest activity first, each with its
    figures as GET /v1/sessions/{id} gives them; a header click sorts (in the URL)."""
    from selenium.webdriver.common.by import By

    browser.get(site.base + "/")
    wait = waiter(browser)
    wait.until(lambda d: len(session_rows(d)) == 2)
    assert query_of(browser) == {}
    with api(site) as c:
        expected = {name: c.get(f"/v1/sessions/{sid}").json()
                    for name, sid in site.sessions.items()}
    rows = session_rows(browser)
    by_activity = sorted(expected.values(), key=lambda s: s["last_movie_at"], reverse=True)
    assert [r["id"] for r in rows] == [s["id"] for s in by_activity]
    grid1 = next(r for r in rows if r["id"] == site.sessions["grid1"])
    figures = expected["grid1"]["counts"]
    assert figures["movies"] == 3 and figures["ready"] == 2 and figures["rejected"] == 1
    assert (grid1["name"], grid1["project"]) == ("grid1", "alpha")
    assert [grid1[k] for k in ("movies", "ready", "rejected", "failed", "in_flight")] == \
        [str(figures[k]) for k in ("movies", "ready", "rejected", "failed", "in_flight")]
    assert grid1["bytes"] == (f"{size_text(figures['bytes_received'])} → "
                              f"{size_text(figures['bytes_stored'])}")
    assert grid1["problems"] == "1 rejected · 1 odd frames"
    grid2 = next(r for r in rows if r["id"] == site.sessions["grid2"])
    assert (grid2["project"], grid2["movies"], grid2["ready"], grid2["problems"]) == \
        ("beta", "1", "1", "")
    # The page marked its first rows (the benchmarks read it) after one sessions request.
    sent = browser.execute_script(
        "return performance.getEntriesByType('resource').map((e) => e.name)"
        ".filter((n) => n.includes('/v1/'))")
    assert [n for n in sent if "/v1/sessions" in n] == [
        f"{site.base}/v1/sessions?sort=last_movie_at&order=desc&limit=50"]
    assert browser.execute_script("return performance.getEntriesByName('first-rows').length")
    # Sorting by name: in the URL, and the rows follow.
    browser.find_element(By.CSS_SELECTOR, "th[data-session-sort='name']").click()
    wait.until(lambda d: query_of(d) == {"sort": ["name"]})
    wait.until(lambda d: [r["name"] for r in session_rows(d)] == ["grid1", "grid2"])
    browser.find_element(By.CSS_SELECTOR, "th[data-session-sort='name']").click()
    wait.until(lambda d: query_of(d) == {"sort": ["name"], "order": ["desc"]})
    wait.until(lambda d: [r["name"] for r in session_rows(d)] == ["grid2", "grid1"])


@needs_browser
def test_a_session_url_survives_reload_and_back(site, browser):
    """Clicking a session opens ?session=<id>: its page and its datasets only; reload,
    back and forward keep it; the API's dashboard link and a filter on it work too."""
    from selenium.webdriver.common.by import By

    grid1 = site.sessions["grid1"]
    mine = sorted(["g1_mov01.mrc", "g1_blank.mrc", "g1_cut.mrc"])
    browser.get(site.base + "/")
    wait = waiter(browser)
    wait.until(lambda d: len(session_rows(d)) == 2)
    browser.find_element(By.CSS_SELECTOR, f"tr.ses[data-id='{grid1}']").click()
    wait.until(lambda d: query_of(d) == {"session": [grid1]})
    wait.until(lambda d: d.find_element(By.ID, "s-name").text == "grid1"
               and sorted(shown_names(d)) == mine)
    assert not browser.find_element(By.ID, "sessions").is_displayed()
    browser.execute_script("window.before = true")
    browser.refresh()
    wait.until(lambda d: d.find_element(By.ID, "s-name").text == "grid1"
               and sorted(shown_names(d)) == mine)
    assert browser.execute_script("return window.before") is None   # a real reload
    assert "3: 2 ready · 1 rejected · 0 failed · 0 in flight" in \
        browser.find_element(By.ID, "s-facts").text
    browser.back()
    wait.until(lambda d: query_of(d) == {} and d.find_element(By.ID, "sessions").is_displayed()
               and not d.find_element(By.ID, "session").is_displayed())
    browser.forward()
    wait.until(lambda d: d.find_element(By.ID, "session").is_displayed()
               and d.find_element(By.ID, "s-name").text == "grid1")
    # The link the API gives for the session opens the same page; a filter narrows the
    # session's table to its rejected movie.
    with api(site) as c:
        link = c.get(f"/v1/sessions/{site.sessions['grid2']}").json()["links"]["dashboard"]
    browser.get(site.base + link)
    wait.until(lambda d: d.find_element(By.ID, "s-name").text == "grid2"
               and shown_names(d) == ["g2_mov01.mrc"])
    browser.get(f"{site.base}/?session={grid1}&status=rejected")
    wait.until(lambda d: shown_names(d) == ["g1_cut.mrc"])
    assert browser.find_element(By.ID, "f-status").get_attribute("value") == "rejected"
    browser.get(f"{site.base}/?session=no-such-session")
    wait.until(lambda d: "404" in d.find_element(By.ID, "s-facts").text)


@needs_browser
def test_the_project_picker_filters_the_list(site, browser):
    """Two projects: a picker, whose choice filters the list and lives in the URL; a token
    limited to one project sees no picker and that project's sessions only."""
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.common.by import By

    browser.get(site.base + "/")
    wait = waiter(browser)
    wait.until(lambda d: d.find_element(By.ID, "project-pick").is_displayed())
    pick = Select(browser.find_element(By.ID, "project"))
    assert [o.get_attribute("value") for o in pick.options] == ["", "alpha", "beta"]
    pick.select_by_value("beta")
    wait.until(lambda d: query_of(d) == {"project": ["beta"]})
    wait.until(lambda d: [r["name"] for r in session_rows(d)] == ["grid2"])
    browser.refresh()
    wait.until(lambda d: [r["name"] for r in session_rows(d)] == ["grid2"]
               and d.find_element(By.ID, "project").get_attribute("value") == "beta")
    browser.back()
    wait.until(lambda d: query_of(d) == {} and len(session_rows(d)) >= 2)
    assert browser.find_element(By.ID, "project").get_attribute("value") == ""
    # A token that sees one project: no picker, only that project's sessions.
    browser.execute_script(f"localStorage.setItem('mrc-ingest-token', '{ALPHA}');")
    browser.get(site.base + "/")
    wait.until(lambda d: [r["name"] for r in session_rows(d)] == ["grid1"])
    wait.until(lambda d: d.execute_script(   # the projects answer came (after the rows)
        "return performance.getEntriesByType('resource').some("
        "  (e) => e.name.endsWith('/v1/projects'))"))
    time.sleep(0.2)
    assert not browser.find_element(By.ID, "project-pick").is_displayed()


@needs_browser
def test_a_session_page_shows_its_rate_and_its_problems(site, browser):
    """The rate timeline has one bar per 10 minutes from the first movie's bucket to the
    last one's, empty ones at zero, and the bars add up to the session's movies; the
    problems list the rejected movie with its first finding (linked to its detail) and
    the movie whose frame stands out; the acquisition summary gives the API's ranges."""
    from selenium.webdriver.common.by import By

    grid1 = site.sessions["grid1"]
    with api(site) as c:
        detail = c.get(f"/v1/sessions/{grid1}").json()
    browser.get(f"{site.base}/?session={grid1}")
    wait = waiter(browser)
    buckets = ten_minute_buckets(detail["rate"]["timeline"])
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rate-svg rect.bar")) == buckets)
    heights = [int(b.get_attribute("data-movies"))
               for b in browser.find_elements(By.CSS_SELECTOR, "#rate-svg rect.bar")]
    assert sum(heights) == detail["counts"]["movies"] == 3
    # problems: the rejected one with its first finding, the one with a frame standing out
    [finding] = [m["finding"] for m in detail["problem_movies"]["rejected"]]
    rejected = browser.find_element(By.CSS_SELECTOR, "#problems li.rejected")
    assert rejected.get_attribute("data-id") == site.ids["g1_cut.mrc"]
    assert "g1_cut.mrc" in rejected.text and finding["message"] in rejected.text
    odd = browser.find_element(By.CSS_SELECTOR, "#problems li.problem:not(.rejected)")
    assert odd.get_attribute("data-id") == site.ids["g1_blank.mrc"]
    assert "1 frame stands out" in odd.text
    # acquisition: the .mdoc's 300 kV for the one movie that has it; frames 4 to 16
    acquisition = browser.find_element(By.ID, "s-acq").text
    frames = detail["acquisition"]["frames"]
    assert f"frames {int(frames['min'])} – {int(frames['max'])}" in acquisition
    assert detail["acquisition"]["voltage_kv"] == {"min": 300, "max": 300}
    assert "voltage 300 kV" in acquisition
    # The rejected movie's link opens its detail beside the session's table.
    rejected.find_element(By.TAG_NAME, "a").click()
    wait.until(lambda d: query_of(d) == {"session": [grid1], "dataset": [site.ids["g1_cut.mrc"]]})
    wait.until(lambda d: d.find_element(By.ID, "d-name").text == "g1_cut.mrc"
               and "rejected" in d.find_element(By.ID, "d-status").text)
    assert browser.find_element(By.ID, "s-name").text == "grid1"
    # Empty buckets are drawn at zero: a gap of two buckets between two bursts.
    drawn = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "import('./web/plot.js').then((m) => {"
        "  const timeline = [{start: '2026-12-06T10:00:00+00:00', movies: 3},"
        "                    {start: '2026-12-06T10:30:00+00:00', movies: 1}];"
        "  const bars = m.rateBars(timeline, 10).svg.querySelectorAll('rect.bar');"
        "  done([...bars].map((b) => [b.getAttribute('data-start'), +b.getAttribute('data-movies'),"
        "                              +b.getAttribute('height')]));})")
    assert [(start, movies) for start, movies, _ in drawn] == [
        ("2026-12-06T10:00:00.000Z", 3), ("2026-12-06T10:10:00.000Z", 0),
        ("2026-12-06T10:20:00.000Z", 0), ("2026-12-06T10:30:00.000Z", 1)]
    assert drawn[1][2] == drawn[2][2] == 0 and drawn[0][2] == pytest.approx(3 * drawn[3][2])


#: Records the texts of one session's row cells each time the page changes them.
RECORDER = """
const id = arguments[0];
window.seen = {in_flight: [], movies: [], ready: []};
const note = () => {
  const tr = document.querySelector(`tr.ses[data-id="${id}"]`);
  for (const key of Object.keys(window.seen)) {
    const text = tr && tr.querySelector(`td.c-${key}`).textContent;
    const list = window.seen[key];
    if (text && list[list.length - 1] !== text) list.push(text);
  }
};
note();
new MutationObserver(note).observe(document.getElementById("s-rows"),
                                   {subtree: true, childList: true, characterData: true});
"""


@needs_browser
def test_a_movie_streaming_in_shows_in_the_list_live(site, browser, tmp_path):
    """A movie sent slowly into a new session: the list, loaded while it streams, shows
    the session with one movie in flight, then (no reload) that movie ready."""
    from selenium.webdriver.common.by import By

    counts = counting_movie((1, 1024, 1024))[0]
    movie = tmp_path / "live_movie.mrc"
    with open(movie, "wb") as f:   # 16 frames of 1024 x 1024 counts, 4-bit: 8 MB
        f.write(raw_header(nx=1024, ny=1024, nz=16, mode=101))
        f.write((counts[:, 0::2] | (counts[:, 1::2] << 4)).tobytes() * 16)

    def paced():
        with open(movie, "rb") as f:
            while chunk := f.read(256 << 10):
                yield chunk
                time.sleep(0.25)   # about 8 s for the whole movie

    wait = waiter(browser)
    with api(site, WRITE) as sender, api(site) as reader, ThreadPoolExecutor(1) as pool:
        upload = pool.submit(sender.put, f"/v1/uploads/{movie.name}", content=paced(),
                             params={"session": "live", "project": "alpha"},
                             headers={"Content-Length": str(movie.stat().st_size)})
        found = wait.until(lambda _: [s for s in reader.get("/v1/sessions").json()["items"]
                                      if s["name"] == "live"])
        session_id = found[0]["id"]
        assert found[0]["counts"]["in_flight"] == 1
        browser.get(site.base + "/")
        wait.until(lambda d: session_id in [r["id"] for r in session_rows(d)])
        browser.execute_script(RECORDER, session_id)
        browser.execute_script("window.before = true")
        wait.until(lambda d: d.find_element(By.ID, "live").get_attribute("class") == "live")
        assert upload.result().status_code == 201
        wait.until(lambda d: d.execute_script("return window.seen.ready.at(-1)") == "1")
    seen = browser.execute_script("return window.seen")
    assert seen["in_flight"][0] == "1" and seen["in_flight"][-1] == "0", seen
    assert seen["movies"] == ["1"] and seen["ready"] == ["0", "1"], seen
    assert browser.execute_script("return window.before")   # no reload
    [row] = [r for r in session_rows(browser) if r["id"] == session_id]
    assert (row["name"], row["project"], row["problems"]) == ("live", "alpha", "")
    # Nothing in flight any more: back to the slow check for new arrivals.
    wait.until(lambda d: d.find_element(By.ID, "live").get_attribute("class") == "idle")
