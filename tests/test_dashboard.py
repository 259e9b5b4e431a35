"""The dashboard page in a real browser: headless Chromium (Debian's chromium +
chromium-driver, via Selenium) opens GET / with a read token, waits for a movie uploaded
through the API, opens it, moves the frame slider and checks a preview image loaded."""

from __future__ import annotations

import json
import os
import shutil

import httpx
import pytest

from service.auth import hash_token
from tests.api_helpers import start_server, wait_job
from tests.reference import counting_movie, write_raw_mrc

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER) and not os.environ.get("MRC_TEST_REQUIRE_BROWSER"),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
READ, WRITE = "mrci_dash-read", "mrci_dash-write"


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # No background networking: this machine's network is closed, and Chromium's own
    # connections (updates, sync, Google lookups) would otherwise be refused at every turn.
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                 "--window-size=1400,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_dashboard_shows_a_movie_and_its_frames(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    tokens = [{"name": "wall", "role": "read", "sha256": hash_token(READ)},
              {"name": "scope", "role": "write", "sha256": hash_token(WRITE)}]
    proc, base = start_server(tmp_path / "data", env={"MRC_INGEST_TOKENS": json.dumps(tokens)})
    try:
        movie = write_raw_mrc(tmp_path / "grid3_movie.mrc", counting_movie((6, 96, 128)), 101)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {WRITE}"}) as c:
            up = c.put("/v1/uploads/grid3_movie.mrc", content=movie.read_bytes()).json()
            wait_job(c, up["job"]["id"])
        browser.get(base + "/")
        browser.execute_script(f"localStorage.setItem('mrc-ingest-token', '{READ}');")
        browser.get(base + "/")  # the page reads the token at load
        wait = WebDriverWait(browser, 20)
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
        shot = tmp_path / "dashboard.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 1000
        # Without the token the page says why instead of showing stale data.
        browser.execute_script("localStorage.removeItem('mrc-ingest-token');")
        browser.get(base + "/")
        wait.until(lambda d: "401" in d.find_element(By.ID, "error").text)
    finally:
        proc.terminate()
        proc.wait()
