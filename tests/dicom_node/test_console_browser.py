"""The console in a real headless Chromium (Debian's chromium and chromium-driver, driven by selenium) against
`dicom-node serve` with the built-in demo model, embedded queue and its own workers: real studies in over C-STORE,
results out to a receiving SCP that is down for a while. A webhook receiver on loopback hears about each job.

A screenshot of each page is kept under the test's temporary folder (``screenshots/``), as the test's artefact.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
import yaml
from PIL import Image

from dicom_node.config import load_settings
from dicom_node.devtools.receiver import Receiver, free_port
from dicom_node.jobs.schema import JobRecord, JobState
from dicom_node.jobs.store import JobStore
from tests.conftest import make_study
from tests.corpus import corpus_file
from tests.dicom_node.test_console_http import PASSWORD, HookReceiver

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
requires_chromium = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None, reason="Debian's chromium and chromium-driver are not installed"
)


class Site:
    """`dicom-node serve` (console on), a receiving PACS, and a webhook receiver."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.port = free_port()
        self.http_port = free_port()
        self.pacs = Receiver(ae_title="PACS")
        self.hook = HookReceiver().start()
        self.config = tmp_path / "node.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "node": {"port": self.port, "bind": "127.0.0.1", "data_dir": str(tmp_path / "var"),
                             "http_port": self.http_port, "fsync": False},
                    "study": {"stable_seconds": 1},
                    "queue": {"reconcile_seconds": 2, "worker_heartbeat_seconds": 1,
                              "retry": {"base_seconds": 0.5, "cap_seconds": 1, "max_retries": 1}},
                    "model": {"family": "demo"},
                    "destinations": [self.pacs.destination()],
                    "rules": [{"name": "mr-only", "match": {"modality": ["MR"]}},
                              {"name": "radiographs", "match": {"modality": ["CR", "DX"]}, "outputs": ["sr", "gsps"]}],
                    "notifications": {
                        "webhooks": [{"name": "ops", "url": self.hook.url,
                                      "events": ["job_failed", "results_delivered", "urgent_finding"]}],
                        "urgent_labels": ["Opacity"],  # what the demo model finds on a chest radiograph
                        "retry": {"base_seconds": 0.5, "cap_seconds": 2, "max_retries": 30},
                    },
                }
            )
        )
        self.settings = load_settings(self.config)
        self.node: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def cli(self, *args: str, stdin: str = "") -> str:
        run = subprocess.run(
            [sys.executable, "-m", "dicom_node.cli", *args, "--config", str(self.config)],
            input=stdin, capture_output=True, text=True, timeout=60,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        return run.stdout

    def start(self) -> None:
        self.pacs.start()
        self.cli("users", "add", "admin", "--role", "admin", "--password-stdin", stdin=PASSWORD + "\n")
        log = (self.tmp_path / "serve.log").open("ab")
        self.node = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return  # SCP, store, broker and an inference worker: ready
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError("node not ready:\n" + (self.tmp_path / "serve.log").read_text()[-3000:])

    def stop(self) -> None:
        if self.node is not None and self.node.poll() is None:
            os.killpg(self.node.pid, signal.SIGTERM)
            self.node.wait(timeout=30)
        self.pacs.stop()
        self.hook.stop()

    def send(self, files: list[Path]) -> None:
        run = subprocess.run(
            ["storescu", "-aec", "AINODE", "127.0.0.1", str(self.port), *map(str, files)],
            capture_output=True, text=True, timeout=60,
        )
        assert run.returncode == 0, run.stdout + run.stderr

    def wait_job(self, study_uid: str, done: Callable[[JobRecord], bool], timeout: float = 120) -> JobRecord:
        store = JobStore(self.settings.store_url)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                jobs = [j for j in store.list_jobs() if j.study_uid == study_uid]
                if jobs and done(jobs[0]):
                    return jobs[0]
                time.sleep(0.3)
            logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in (self.tmp_path / "var" / "logs").glob("*"))
            raise AssertionError(f"job of {study_uid}: {[(j.state, j.error) for j in store.list_jobs()]}\n{logs}")
        finally:
            store.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def wait_until(predicate: Callable[[], Any], timeout: float = 60) -> Any:
    """Poll ``predicate`` until it is true. Pages of work in progress reload themselves, so an element found a
    moment ago can be gone: that counts as not yet."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (NoSuchElementException, StaleElementReferenceException):
            value = None
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"condition not met within {timeout} s")


def box_pixels(png: bytes) -> int:
    """Pixels of the first box colour the preview draws (#ffcc00): none on a grey radiograph without boxes."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return int(np.all(pixels == (0xFF, 0xCC, 0x00), axis=-1).sum())


@requires_chromium
def test_an_administrator_follows_a_study_finds_a_failure_and_retries_it(
    site: Site, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    shots = tmp_path / "screenshots"
    shots.mkdir()

    def shot(name: str) -> None:
        """The whole page: the window grows to the page's height, and its images are loaded first."""
        height = int(browser.execute_script("return document.documentElement.scrollHeight"))
        browser.set_window_size(1400, min(max(1100, height + 140), 8000))
        wait_until(lambda: browser.execute_script(
            "return Array.from(document.images).every(i => i.complete)"
        ), timeout=30)
        browser.save_screenshot(str(shots / f"{name}.png"))
        browser.set_window_size(1400, 1100)

    def text(css: str) -> str:
        return str(browser.find_element(By.CSS_SELECTOR, css).text)

    # A chest radiograph arrives over C-STORE and is delivered to the PACS.
    chest = corpus_file("RG1_UNCI.dcm")
    site.send([chest])
    study = str(pydicom.dcmread(chest, stop_before_pixels=True).StudyInstanceUID)
    delivered = site.wait_job(study, lambda j: j.state.finished)
    assert delivered.state is JobState.DELIVERED, delivered.error

    # Log in; the overview shows the delivered study.
    browser.get(site.url + "/")
    assert "/login" in browser.current_url
    shot("login")
    browser.find_element(By.ID, "username").send_keys("admin")
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.find_element(By.ID, "login").click()
    wait_until(lambda: browser.find_elements(By.ID, "last24"))
    assert text("#whoami") == "admin (admin)"
    assert wait_until(lambda: text("#last24 .count-delivered") == "1")
    assert wait_until(lambda: "delivered" in text(f'tr[data-job="{delivered.id}"]') and "CR" in text(
        f'tr[data-job="{delivered.id}"]'
    ))
    assert wait_until(lambda: "inference" in text("#workers"))
    shot("overview")

    # The job's detail: the image read with its boxes drawn, and the SR as text.
    browser.get(f"{site.url}/jobs/{delivered.id}")
    wait_until(lambda: browser.find_elements(By.ID, "job-state"))
    assert text("#job-state") == "delivered"
    preview = browser.find_element(By.CSS_SELECTOR, "img.preview")
    wait_until(lambda: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", preview))
    assert int(preview.get_attribute("data-findings")) > 0, "the demo model finds regions on a chest radiograph"
    cookies = {c["name"]: c["value"] for c in browser.get_cookies()}
    png = httpx.get(preview.get_attribute("src"), cookies=cookies, timeout=30)
    assert png.status_code == 200 and box_pixels(png.content) > 50, "boxes drawn on the preview"
    sr = text("#sr-text")
    assert "Finding" in sr or "finding" in sr, sr[:300]
    assert "radiographs" in text("#rule") and "mr-only: Modality ['CR'] not in ['MR']" in text("#rules")
    assert "demo" in text("#model")
    objects = len(browser.find_elements(By.CSS_SELECTOR, "#results tr")) - 1
    assert objects >= 2 and f"{objects} of {objects} object(s)" in text("#delivery")  # SR and GSPS, all delivered
    shot("job-delivered")

    # The PACS goes down; the next study's export fails, and the detail says why.
    site.pacs.stop()
    other = make_study(tmp_path / "second", 1, template="RG1_UNCI.dcm")
    site.send(other)
    second_study = str(pydicom.dcmread(other[0], stop_before_pixels=True).StudyInstanceUID)
    failed = site.wait_job(second_study, lambda j: j.state.finished)
    assert failed.state is JobState.FAILED
    browser.get(f"{site.url}/jobs/{failed.id}")
    reason = text("#failure-reason")
    assert "export gave up" in reason and "pacs" in reason, reason
    shot("job-failed")

    # The PACS is back; retry from the console, and the page follows the job to delivered.
    site.pacs.start()
    browser.find_element(By.ID, "retry").click()
    wait_until(lambda: "queued again" in text("#message"), timeout=20)
    wait_until(lambda: text("#job-state") == "delivered", timeout=120)
    assert not browser.find_elements(By.ID, "failure-reason")
    assert "retried by console user admin" in text("#events")
    shot("job-retried-delivered")

    # The other pages, each with what it is for.
    browser.get(site.url + "/jobs?state=delivered")
    assert len(browser.find_elements(By.CSS_SELECTOR, "table.jobs tbody tr[data-job]")) == 2
    shot("jobs")
    browser.get(site.url + "/destinations")
    browser.find_element(By.CSS_SELECTOR, "#destinations button").click()
    wait_until(lambda: browser.find_elements(By.ID, "echo-result"))
    assert "C-ECHO ok" in text("#echo-result")
    assert "delivered" in text("#destinations")
    shot("destinations")
    browser.get(site.url + "/rules")
    browser.find_element(By.ID, "test-rules").click()
    wait_until(lambda: browser.find_elements(By.ID, "rule-verdict"))
    assert "Rule radiographs matches" in text("#rule-verdict")
    shot("rules")
    browser.get(site.url + "/config")
    config = text("#config")
    assert "**********" in config and site.hook.url not in config  # the webhook URL is a secret
    shot("config")
    browser.get(site.url + "/audit")
    assert "view_job" in text("#audit") and "admin" in text("#audit") and "retry" in text("#audit")
    shot("audit")
    browser.get(site.url + "/notifications")
    shot("notifications")
    browser.get(site.url + "/docs")
    assert wait_until(lambda: "/api/jobs/{job_id}/retry" in text(".swagger-ui"), timeout=30)  # no CDN needed
    shot("api-docs")
    assert sorted(p.name for p in shots.iterdir()) == sorted(
        f"{n}.png" for n in ("login", "overview", "job-delivered", "job-failed", "job-retried-delivered", "jobs",
                             "destinations", "rules", "config", "audit", "notifications", "api-docs")
    )
    print(f"console screenshots in {shots}")

    # One notification per delivered job and per failed job (the retried job's delivery is its own), and an urgent
    # one with each delivery whose findings include a label listed as urgent.
    wait_until(lambda: len(site.hook.bodies) >= 5, timeout=20)
    time.sleep(1.5)
    assert sorted((b["event"], b["job"]["id"]) for b in site.hook.bodies) == sorted([
        ("results_delivered", delivered.id), ("job_failed", failed.id), ("results_delivered", failed.id),
        ("urgent_finding", delivered.id), ("urgent_finding", failed.id),
    ])
    urgent = next(b for b in site.hook.bodies if b["event"] == "urgent_finding")
    assert urgent["findings"] and all(f["label"] == "opacity" for f in urgent["findings"])
