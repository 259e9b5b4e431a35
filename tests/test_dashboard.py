"""The dashboard page in a real browser: headless Chromium (Debian's chromium +
chromium-driver, via Selenium) against ``mrc-ingest serve`` with a read token.

The catalog holds a few movies: 4-bit and 16-bit, 300 kV and 200 kV (from .mdoc
sidecars), three pixel sizes, an 88-frame movie with two blanked frames, a Poisson(1)
movie with one blanked frame, and a truncated file. The page must show them; keep a
dataset's view across a reload; put a filter set in the page into the URL (and take it
back from a fresh load, and from back/forward); plot one marker per frame, a frame far
outside the others at its value past an axis break; say why a dataset has no archive copy;
and show a real ingest's progress changing before it is ready."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest

from service.auth import hash_token
from tests.api_helpers import make_client, start_server, wait_job
from tests.reference import counting_movie, raw_header, synthetic, write_raw_mrc
from tests.test_acquisition import MDOC

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and DRIVER) and not os.environ.get("MRC_TEST_REQUIRE_BROWSER"),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
READ, WRITE = "mrci_dash-read", "mrci_dash-write"
WEB = Path(__file__).resolve().parents[1] / "service" / "web"
#: wait for the page: long enough for a slow CI machine, polled often
WAIT_S, POLL_S = 30, 0.05
#: the table of every dataset (the landing page lists sessions: tests/test_dashboard_sessions.py)
DATASETS = "/?view=datasets"


def chromium(profile: Path, size: str = "1600,1000"):
    """Headless Chromium for a closed network (bench/bench_dashboard.py uses it too)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # No background networking: this machine's network is closed, and Chromium's own
    # connections (updates, sync, Google lookups) would otherwise be refused at every turn.
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={profile}", f"--window-size={size}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


@dataclass
class Site:
    base: str
    ids: dict[str, str]     # movie name -> dataset id


#: the frame of sq09_blank.mrc that is all zeros (the rest: Poisson(1), mean about 1)
BLANKED_FRAME = 7


def catalog_movies() -> dict[str, tuple[np.ndarray, int, float, int | None]]:
    """name -> (data, mode, pixel size Å or 0, kV of its .mdoc or None). The 88-frame one
    has the dose falling off over the movie, and frames 30 and 31 blanked."""
    doses = np.linspace(1.2, 0.8, 88)
    long = np.stack([counting_movie((1, 64, 64), lam=lam, seed=k)[0]
                     for k, lam in enumerate(doses)])
    long[30:32] = 0
    blanked = counting_movie((16, 64, 64), seed=9)
    blanked[BLANKED_FRAME] = 0
    return {
        "grid3_movie.mrc": (counting_movie((6, 96, 128)), 101, 0.0, None),
        "sq07_mov0012.mrc": (long, 101, 0.83, 300),
        "sq07_mov0013.mrc": (synthetic(1, (10, 64, 64)) // 64, 1, 1.06, 300),
        "sq08_mov0001.mrc": (counting_movie((4, 64, 64), seed=3), 101, 1.06, 200),
        "sq08_mov0002.mrc": (counting_movie((4, 64, 64), seed=4), 101, 0.52, 200),
        "sq09_blank.mrc": (blanked, 101, 0.0, None),
    }


def write_movie(path: Path, data: np.ndarray, mode: int, pixel: float) -> Path:
    nz, ny, nx = data.shape
    return write_raw_mrc(path, data, mode, cella=(nx * pixel, ny * pixel, nz * pixel))


def streamed(path: Path):
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            yield chunk


def put(client: httpx.Client, path: Path) -> dict:
    response = client.put(f"/v1/uploads/{path.name}", content=streamed(path),
                          headers={"Content-Length": str(path.stat().st_size)})
    assert response.status_code in (201, 202), response.text   # ingested now, or in a job
    return response.json()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One server with the catalog above, every movie ingested."""
    work = tmp_path_factory.mktemp("dashboard")
    tokens = [{"name": "wall", "role": "read", "sha256": hash_token(READ)},
              {"name": "scope", "role": "write", "sha256": hash_token(WRITE)}]
    # One worker, and the slowest archive level: a 4096 x 4096 movie of a few frames (a
    # quick upload) then takes seconds to ingest, long enough to watch its progress.
    proc, base = start_server(work / "data", env={"MRC_INGEST_TOKENS": json.dumps(tokens),
                                                  "MRC_INGEST_WORKERS": "1",
                                                  "MRC_INGEST_ARCHIVE_CLEVEL": "9"})
    try:
        truncated = write_movie(work / "cut.mrc", counting_movie((4, 64, 64)), 101, 1.0)
        truncated.write_bytes(truncated.read_bytes()[:-500])
        movies = [truncated]
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {WRITE}"},
                          timeout=60) as c:
            for name, (data, mode, pixel, kv) in catalog_movies().items():
                if kv is not None:
                    mdoc = MDOC.replace("Voltage = 300", f"Voltage = {kv}")
                    assert c.put(f"/v1/uploads/{name}.mdoc", content=mdoc).status_code < 300
                movies.append(write_movie(work / name, data, mode, pixel))
            accepted = {path.name: put(c, path) for path in movies}
            for body in accepted.values():
                wait_job(c, body["job"]["id"])
        yield Site(base, {name: body["dataset"]["id"] for name, body in accepted.items()})
    finally:
        proc.terminate()
        proc.wait()


@pytest.fixture
def browser(tmp_path, site):
    """Chromium with the read token in the page's local storage."""
    driver = chromium(tmp_path / "chromium-profile")
    driver.get(site.base + "/healthz")  # same origin, without running the page
    driver.execute_script(f"localStorage.setItem('mrc-ingest-token', '{READ}');")
    yield driver
    try:  # the page's scripts ran without an uncaught error
        assert [e for e in driver.get_log("browser") if e["source"] == "javascript"] == []
    finally:
        driver.quit()


def waiter(driver, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=POLL_S)


def shown_names(driver) -> list[str]:
    """The names in the table, top to bottom (one script call: rows may be repainted)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('tr.ds td.name')].map((td) => td.textContent)")


def job_states(driver) -> list[list[str]]:
    """[kind, state] of each job the detail lists."""
    return driver.execute_script("return [...document.querySelectorAll('#jobs tr')].map("
                                 "(tr) => [tr.cells[0].textContent, "
                                 "tr.querySelector('.label').textContent])")


def query_of(driver) -> dict[str, list[str]]:
    return parse_qs(urlsplit(driver.current_url).query)


@needs_browser
def test_dashboard_shows_a_movie_and_its_frames(site, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(site.base + DATASETS)
    wait = waiter(browser)
    row = wait.until(lambda d: next((tr for tr in d.find_elements(By.CSS_SELECTOR, "tr.ds")
                                     if "grid3_movie.mrc" in tr.text
                                     and "ready" in tr.text), None))
    assert "128×96×6" in row.text and "101 → 0" in row.text
    row.click()
    frame = browser.find_element(By.ID, "frame")
    loaded = "return arguments[0].complete && arguments[0].naturalWidth > 0"
    wait.until(lambda d: d.execute_script(loaded, frame))
    first_src = frame.get_attribute("src")
    slider = browser.find_element(By.ID, "slider")
    assert slider.get_attribute("max") == "5"
    browser.execute_script("arguments[0].value = 3; arguments[0].dispatchEvent("
                           "new Event('input'));", slider)
    wait.until(lambda d: d.find_element(By.ID, "k").text == "3")
    wait.until(lambda d: frame.get_attribute("src") != first_src
               and d.execute_script(loaded, frame))
    assert browser.execute_script("return arguments[0].naturalWidth", frame) == 128
    assert "mode 101" in browser.find_element(By.ID, "d-facts").text
    # Storage accounting: received, stored and their ratio, as the API reports them.
    with httpx.Client(base_url=site.base, headers={"Authorization": f"Bearer {READ}"}) as c:
        ds = c.get(f"/v1/datasets/{site.ids['grid3_movie.mrc']}").json()
    storage = browser.find_element(By.ID, "d-storage").text
    assert f"{ds['compression_ratio']:.2f}×" in storage and "received" in storage
    assert f"{ds['compression_ratio']:.2f}×" in row.text
    assert job_states(browser) == [[job["kind"], job["state"]] for job in ds["jobs"]]
    shot = tmp_path / "dashboard.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 1000
    # Every movie is listed with its acquisition columns; the truncated one is rejected.
    assert sorted(shown_names(browser)) == sorted(site.ids)
    rejected = browser.find_element(By.CSS_SELECTOR, f"tr[data-id='{site.ids['cut.mrc']}']")
    assert "rejected" in rejected.text
    long = browser.find_element(By.CSS_SELECTOR,
                                f"tr[data-id='{site.ids['sq07_mov0012.mrc']}']")
    cells = [td.text for td in long.find_elements(By.TAG_NAME, "td")]
    assert "300" in cells and "0.830" in cells
    # Without the token the page says why instead of showing stale data.
    browser.execute_script("localStorage.removeItem('mrc-ingest-token');")
    browser.get(site.base + "/")   # the sessions list, the landing page
    wait.until(lambda d: "401" in d.find_element(By.ID, "error").text)


@needs_browser
def test_a_dataset_url_survives_reload_and_back(site, browser):
    from selenium.webdriver.common.by import By

    name = "sq07_mov0013.mrc"
    dataset_id = site.ids[name]
    browser.get(site.base + DATASETS)
    wait = waiter(browser)
    wait.until(lambda d: name in shown_names(d))
    browser.find_element(By.CSS_SELECTOR, f"tr[data-id='{dataset_id}']").click()
    wait.until(lambda d: query_of(d) == {"dataset": [dataset_id]})
    wait.until(lambda d: d.find_element(By.ID, "d-name").text == name)
    browser.refresh()
    wait.until(lambda d: d.find_element(By.ID, "d-name").text == name
               and d.find_element(By.ID, "detail").is_displayed()
               and d.find_element(By.ID, "last").text == "9")
    assert "10 frames" in browser.find_element(By.ID, "d-facts").text
    assert "selected" in browser.find_element(
        By.CSS_SELECTOR, f"tr[data-id='{dataset_id}']").get_attribute("class")
    browser.back()   # to the list without a dataset open
    wait.until(lambda d: not d.find_element(By.ID, "detail").is_displayed())
    browser.forward()
    wait.until(lambda d: d.find_element(By.ID, "detail").is_displayed()
               and d.find_element(By.ID, "d-name").text == name)
    # A frame in the URL opens at that frame; an unknown id says so.
    browser.get(f"{site.base}/?dataset={site.ids['grid3_movie.mrc']}&frame=4")
    wait.until(lambda d: d.find_element(By.ID, "k").text == "4"
               and d.find_element(By.ID, "slider").get_attribute("value") == "4")
    browser.get(f"{site.base}/?dataset=no-such-dataset")
    wait.until(lambda d: "404" in d.find_element(By.ID, "d-status").text)


@needs_browser
def test_a_filter_set_in_the_page_lives_in_the_url(site, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.select import Select

    at_300 = ["sq07_mov0012.mrc", "sq07_mov0013.mrc"]            # .mdoc Voltage = 300
    wide_300 = ["sq07_mov0013.mrc"]                              # ... and 1.06 Å/px
    browser.get(site.base + DATASETS)
    wait = waiter(browser)
    wait.until(lambda d: sorted(shown_names(d)) == sorted(site.ids))
    browser.save_screenshot(str(tmp_path / "list.png"))
    kv = browser.find_element(By.ID, "f-voltage_kv")
    kv.send_keys("300", Keys.ENTER)
    wait.until(lambda d: query_of(d) == {"voltage_kv": ["300"]})
    wait.until(lambda d: sorted(shown_names(d)) == at_300)
    browser.find_element(By.ID, "f-min_pixel_size").send_keys("1", Keys.ENTER)
    wait.until(lambda d: query_of(d) == {"voltage_kv": ["300"], "min_pixel_size": ["1"]})
    wait.until(lambda d: shown_names(d) == wide_300)
    # A fresh load of that URL shows the same filter, in the controls and in the rows.
    browser.execute_script("window.before = true")
    browser.get(browser.current_url)
    wait.until(lambda d: shown_names(d) == wide_300)
    assert browser.execute_script("return window.before") is None
    assert browser.find_element(By.ID, "f-voltage_kv").get_attribute("value") == "300"
    assert browser.find_element(By.ID, "f-min_pixel_size").get_attribute("value") == "1"
    # Back walks the filters.
    browser.back()
    wait.until(lambda d: query_of(d) == {"voltage_kv": ["300"]})
    wait.until(lambda d: sorted(shown_names(d)) == at_300)
    assert browser.find_element(By.ID, "f-min_pixel_size").get_attribute("value") == ""
    browser.back()
    wait.until(lambda d: sorted(shown_names(d)) == sorted(site.ids))
    # Status and sort: clicking the name header sorts by name, again reverses it.
    Select(browser.find_element(By.ID, "f-status")).select_by_value("rejected")
    wait.until(lambda d: query_of(d) == {"status": ["rejected"]})
    wait.until(lambda d: shown_names(d) == ["cut.mrc"])
    browser.find_element(By.ID, "clear").click()
    browser.find_element(By.CSS_SELECTOR, "th[data-sort='name']").click()
    wait.until(lambda d: query_of(d) == {"view": ["datasets"], "sort": ["name"]})
    wait.until(lambda d: shown_names(d) == sorted(site.ids))
    browser.find_element(By.CSS_SELECTOR, "th[data-sort='name']").click()
    wait.until(lambda d: query_of(d) == {"view": ["datasets"], "sort": ["name"],
                                         "order": ["desc"]})
    wait.until(lambda d: shown_names(d) == sorted(site.ids, reverse=True))


@needs_browser
def test_the_frame_plot_has_one_marker_per_frame(site, browser, tmp_path):
    from selenium.webdriver.common.by import By

    dataset_id = site.ids["sq07_mov0012.mrc"]
    browser.get(f"{site.base}/?dataset={dataset_id}")
    wait = waiter(browser)
    points = "#plot-svg circle.pt"
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, points)) == 88)
    frames = [int(c.get_attribute("data-frame"))
              for c in browser.find_elements(By.CSS_SELECTOR, points)]
    assert frames == list(range(88))
    # The blanked frames stand out; gradual dose fall-off does not.
    odd = [int(c.get_attribute("data-frame"))
           for c in browser.find_elements(By.CSS_SELECTOR, "#plot-svg circle.odd")]
    assert odd == [30, 31]
    assert "30, 31" in browser.find_element(By.ID, "odd").text
    # Markers follow the means: the blanked frames lowest, the first frames highest.
    heights = browser.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((c) => +c.getAttribute('cy'))",
        points)
    assert heights[30] == heights[31] == max(heights)
    # Past the axis break, the two blanked frames' value is labelled once, after the run.
    assert [(t["frame"], t["text"]) for t in svg_items(browser, "text.point-label")] == [
        ("31", "0")]
    assert np.mean(heights[:10]) < np.mean(heights[-10:])   # y grows downwards
    # Clicking a marker selects that frame in the slider (and in the URL).
    browser.find_element(By.CSS_SELECTOR, "#plot-svg circle[data-frame='40']").click()
    wait.until(lambda d: d.find_element(By.ID, "k").text == "40"
               and query_of(d).get("frame") == ["40"])
    assert "sel" in browser.find_element(
        By.CSS_SELECTOR, "#plot-svg circle[data-frame='40']").get_attribute("class")
    assert browser.find_element(By.ID, "readout").text.startswith("frame 40: mean ")
    browser.save_screenshot(str(tmp_path / "plot.png"))
    # The plot's helpers, as the page's own module exports them.
    helpers = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "import('./web/plot.js').then((m) => done({"
        "  ticks: m.ticks(0, 10, 5), fine: m.ticks(0.8, 1.2, 4),"
        "  huge: m.ticks(1e17, 1e17 + 64, 4),"   # steps below the values' resolution
        "  odd: m.oddFrames([1, 1.02, 0.98, 0, null, 1.01, 0.97, 1.6])}))")
    assert helpers["ticks"] == [0, 2, 4, 6, 8, 10]
    assert helpers["fine"] == [0.8, 0.9, 1, 1.1, 1.2]
    assert 1 <= len(helpers["huge"]) <= 10
    assert helpers["odd"] == [False, False, False, True, True, False, False, True]


def svg_items(driver, selector: str) -> list[dict]:
    """Each SVG element of the plot that matches: its class, frame, text and y."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((e) => ({"
        "  cls: e.getAttribute('class'), frame: e.getAttribute('data-frame'),"
        "  text: e.textContent, y: +(e.getAttribute('cy') ?? e.getAttribute('y') ??"
        "                           e.getAttribute('y1'))}))", "#plot-svg " + selector)


@needs_browser
def test_a_blanked_frame_is_drawn_at_its_value_past_an_axis_break(site, browser, tmp_path):
    """One frame all zeros in a Poisson(1) movie. The axis keeps the range of the usual
    frames (so their spread stays visible); the blanked frame is drawn past a visible
    axis break (a dashed line across the plot, a double slash on the axis), at its value
    on the strip's own tick (0), and labelled with that value: not pinned to the axis
    edge as if it were just below the others."""
    from selenium.webdriver.common.by import By

    browser.get(f"{site.base}/?dataset={site.ids['sq09_blank.mrc']}")
    wait = waiter(browser)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#plot-svg circle.pt")) == 16)
    browser.save_screenshot(str(tmp_path / "blanked.png"))
    points = svg_items(browser, "circle.pt")
    blank = points[BLANKED_FRAME]
    assert "odd" in blank["cls"] and "outside" in blank["cls"]
    assert [p["frame"] for p in points if "outside" in p["cls"]] == [str(BLANKED_FRAME)]
    assert str(BLANKED_FRAME) in browser.find_element(By.ID, "odd").text
    # The break: one dashed line across, a double slash on the axis, between the usual
    # frames (above it) and the blanked one (below it).
    [cut] = svg_items(browser, "line.break")
    assert len(svg_items(browser, "line.break-mark")) == 2
    usual = [p["y"] for p in points if "outside" not in p["cls"]]
    assert max(usual) < cut["y"] < blank["y"]
    # Its value, on its own tick beside it and as a label next to the marker.
    [tick] = svg_items(browser, "text.tick.outside")
    assert tick["text"] == "0" and tick["y"] == pytest.approx(blank["y"])
    [label] = svg_items(browser, "text.point-label")
    assert label["frame"] == str(BLANKED_FRAME) and label["text"] == "0"
    # Above the break, the usual frames' axis: around their mean of about 1, and the
    # frames spread over it instead of being squashed into a line. Between the break and
    # the end of the mean panel (then the std panel), only the blanked frame's own tick.
    ticks = [t for t in svg_items(browser, "text.tick.y") if "outside" not in t["cls"]]
    above = [float(t["text"]) for t in ticks if t["y"] < cut["y"]]
    assert len(above) >= 2 and all(0.9 < v < 1.1 for v in above)
    assert not [t for t in ticks if cut["y"] <= t["y"] <= blank["y"] + 8]
    assert max(usual) - min(usual) > 30


@needs_browser
def test_a_dataset_kept_as_received_says_why(site, browser):
    """The truncated file is rejected and kept as received: no archive copy, and the
    storage table says so with the archiver's reason (not "mode undefined")."""
    from selenium.webdriver.common.by import By

    browser.get(f"{site.base}/?dataset={site.ids['cut.mrc']}")
    wait = waiter(browser)
    wait.until(lambda d: "rejected" in d.find_element(By.ID, "d-status").text
               and "stored" in d.find_element(By.ID, "d-storage").text)
    storage = browser.find_element(By.ID, "d-storage").text
    assert "archive: none — kept as received: the file did not pass validation" in storage
    assert "undefined" not in storage and "archive copy" not in storage
    browser.get(f"{site.base}/?dataset={site.ids['grid3_movie.mrc']}")
    wait.until(lambda d: "archive copy: mode" in d.find_element(By.ID, "d-storage").text)
    assert "undefined" not in browser.find_element(By.ID, "d-storage").text


#: Records the status text of one dataset's row, of the detail and of its jobs each time
#: the page changes them, so that no update is missed between two WebDriver polls.
RECORDER = """
const id = arguments[0];
window.seen = {row: [], detail: [], jobs: []};
const note = (list, text) => { if (text && list[list.length - 1] !== text) list.push(text); };
const text = (node) => node && node.textContent.trim();
new MutationObserver(() => {
  note(window.seen.row, text(document.querySelector(`tr.ds[data-id="${id}"] td.status`)));
  note(window.seen.detail, text(document.getElementById("d-status")));
  note(window.seen.jobs, text(document.getElementById("jobs")));
}).observe(document.body, {subtree: true, childList: true, characterData: true});
"""


def percentages(texts: list[str]) -> list[tuple[str, int]]:
    """(status, percent) of each recorded text that shows a percentage."""
    found = [re.match(r"([a-z]+)(\d+) %", text) for text in texts]
    return [(m[1], int(m[2])) for m in found if m]


@needs_browser
def test_live_progress_of_a_real_ingest(site, browser, tmp_path):
    """A movie sent at the pace of a microscope PC's link (about 20 MB/s), then ingested:
    the page, open before it arrived, shows its progress change before it is ready, in its
    row and in its detail, without a reload; then it stops refreshing every second."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(site.base + DATASETS)
    wait = waiter(browser, 60)
    wait.until(lambda d: len(shown_names(d)) == len(site.ids))
    # 10 frames of 4096 x 4096 counts (84 MB, 4-bit; the same frame, packed here at numpy
    # speed): about half a second per frame of archive writing at level 9.
    counts = counting_movie((1, 4096, 4096))[0]
    movie = tmp_path / "live_movie.mrc"
    with open(movie, "wb") as f:
        f.write(raw_header(nx=4096, ny=4096, nz=10, mode=101))
        f.write((counts[:, 0::2] | (counts[:, 1::2] << 4)).tobytes() * 10)

    def paced():
        for chunk in streamed(movie):
            yield chunk
            time.sleep(0.2)   # the link's pace, not a wait for the page

    auth = {"Authorization": f"Bearer {WRITE}"}
    with httpx.Client(base_url=site.base, headers=auth, timeout=60) as sender, \
            httpx.Client(base_url=site.base, headers=auth) as reader, \
            ThreadPoolExecutor(1) as pool:
        upload = pool.submit(sender.put, f"/v1/uploads/{movie.name}", content=paced(),
                             headers={"Content-Length": str(movie.stat().st_size)})
        # In the catalog while it streams (or, at the latest, while its job runs).
        found = wait.until(lambda _: reader.get("/v1/datasets",
                                                params={"name": "live_movie"}).json()["items"])
        dataset_id = found[0]["id"]
        browser.execute_script(RECORDER, dataset_id)
        # The page was open before the movie arrived: filter for it (no reload), open it.
        browser.find_element(By.ID, "f-name").send_keys("live_movie", Keys.ENTER)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR,
                                            f"tr[data-id='{dataset_id}']")).click()
        wait.until(lambda d: d.find_element(By.ID, "d-name").text == movie.name)
        browser.save_screenshot(str(tmp_path / "live.png"))
        wait.until(lambda d: "ready" in d.execute_script("return window.seen.row"))
        assert upload.result().status_code in (201, 202)
        jobs = reader.get(f"/v1/datasets/{dataset_id}").json()["jobs"]
    seen = browser.execute_script("return window.seen")
    steps = percentages(seen["row"])
    assert len(steps) >= 2, seen["row"]   # the percentage changed at least once
    for phase in {p for p, _ in steps}:   # and only ever grew within a phase
        assert sorted(v for p, v in steps if p == phase) == [v for p, v in steps if p == phase]
    assert seen["row"][-1] == "ready"
    assert percentages(seen["detail"]), seen["detail"]
    # The detail lists the dataset's jobs as the API does, once they are done.
    assert jobs and all(job["state"] == "done" for job in jobs)
    wait.until(lambda d: job_states(d) == [[job["kind"], job["state"]] for job in jobs])
    # Nothing in flight any more: back to the slow check for new arrivals.
    wait.until(lambda d: d.find_element(By.ID, "live").get_attribute("class") == "idle")


def test_dashboard_files_are_local_and_served_by_name_only(tmp_path):
    """The page's files come from this server (a microscope network is often offline:
    no CDN); /web/ serves them by plain name, with a type and an ETag, and nothing else."""
    for path in WEB.iterdir():
        if path.suffix in (".html", ".js", ".css"):
            text = path.read_text().replace("http://www.w3.org/2000/svg", "")
            assert "http://" not in text and "https://" not in text and "//cdn" not in text
    with make_client(tmp_path / "data") as c:
        js = c.get("/web/dashboard.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert js.content == (WEB / "dashboard.js").read_bytes()
        again = c.get("/web/dashboard.js", headers={"If-None-Match": js.headers["etag"]})
        assert again.status_code == 304
        assert c.get("/web/dashboard.css").headers["content-type"].startswith("text/css")
        for name in ("__init__.py", "index.html", "missing.js", "Plot.js", "..%2F__init__.py",
                     ".hidden.js"):
            response = c.get(f"/web/{name}")
            assert response.status_code == 404 and response.json()["error"] == "not_found"
        page = c.get("/")
        assert "web/dashboard.js" in page.text and page.headers["cache-control"] == "no-cache"
