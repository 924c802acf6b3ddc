"""The web page (python -m pipeline app) in a real headless Chromium driven by selenium: a photo uploaded through
the page shows the age and gender predict-images gives for it, with its interval and "at least N years old?"
answers from a calibrated bundle, bad files get one line each and the page keeps working, and every socket of the
app and the browser stays on loopback."""

from __future__ import annotations

import io
import json
import math
import subprocess
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import cli, cli_command, cli_env, free_port, served, wait_for
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.common.selenium_manager import SeleniumManager
from selenium.webdriver.support.ui import WebDriverWait
from test_photos import GOOD, astronaut, photo_dir, real_bundle  # noqa: F401 (fixtures)
from test_ray import SocketWatch, is_loopback

from pipeline.core.calibration import AgeIntervals, Calibration, GenderRescaling
from pipeline.serving.app import Photo, age_text, asked_age, draw, label_text, shown_table

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"  # Debian's chromium-driver: .ci/run installs both
MAX_MB = 1  # the app's upload limit here, so that a small file can exceed it
BAD = {
    "notes.jpg": "not a readable image (corrupt, truncated or not an image)",
    "truncated.jpg": "not a readable image (corrupt, truncated or not an image)",
    "empty.jpg": "empty file (0 bytes)",
    "bomb.png": "image too large: 900 Mpx, the limit is 100 Mpx (not decoded: a decompression bomb or a scan far "
    "larger than a photo)",
    "no_face.png": "no face found",
}


# Chromium's IPv6 reachability heuristic connects a UDP socket to this address and sends nothing on it
# (net/dns/README.md); the net log check below proves nothing was sent.
IPV6_PROBE = "[2001:4860:4860::8888]:443"


def ipv6_probe(ss_line: str) -> bool:
    cols = ss_line.split()
    return cols[0] == "udp" and cols[5] == IPV6_PROBE and '"chromium"' in ss_line


@pytest.fixture(scope="module")
def watch():
    """Every socket of this test's processes (the app, chromedriver, Chromium), polled from before they start."""
    with SocketWatch(exempt=ipv6_probe) as w:
        yield w


def net_log_events(path: Path) -> tuple[list[dict], dict[int, str]]:
    """Chromium's net log as written so far (the file is closed only when Chromium exits): events, type names."""
    text = path.read_text()
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # still open: the events list is not closed yet
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    return log["events"], {v: k for k, v in log["constants"]["logEventTypes"].items()}


def serve(bundle: Path, d: Path):
    """The app serving `bundle` on a free loopback port from folder d (it starts while the caller goes on)."""
    port = free_port()
    log = (d / "app.log").open("w")
    args = cli_command("app", bundle, "--port", port, "--max-file-size", MAX_MB)
    proc = subprocess.Popen(args, cwd=d, env=cli_env({"GRADIO_TEMP_DIR": str(d / "gradio")}), stdout=log, stderr=log)
    yield SimpleNamespace(proc=proc, url=f"http://127.0.0.1:{port}/", port=port, log=d / "app.log")
    proc.terminate()
    proc.wait(timeout=120)  # a loaded machine: the app may take a while to see the signal
    log.close()


def with_calibration(archive: Path, d: Path, calibration: Calibration | None) -> Path:
    """The test bundle's folder with `calibration` in its bundle.json, or none (a bundle of before calibration)."""
    with tarfile.open(archive) as tar:
        tar.extractall(d, filter="data")
    info_file = next(d.glob("*/bundle.json"))
    info = json.loads(info_file.read_text())
    info.pop("calibration", None)
    info_file.write_text(json.dumps({**info, **({"calibration": calibration.to_json()} if calibration else {})}))
    return info_file.parent


@pytest.fixture(scope="module")
def old_bundle(real_bundle, tmp_path_factory) -> Path:  # noqa: F811
    return with_calibration(real_bundle, tmp_path_factory.mktemp("old"), None)


@pytest.fixture(scope="module")
def app(watch, old_bundle, tmp_path_factory):
    """The app serving a bundle of before calibration: no intervals."""
    yield from serve(old_bundle, tmp_path_factory.mktemp("app"))


# the stand-in calibration: every age's interval is [age - 5, age + 5] at 90 %
CALIBRATION = Calibration(AgeIntervals(0.9, [0.0], [-5.0], [5.0]), GenderRescaling("temperature", a=0.5))


@pytest.fixture(scope="module")
def calibrated_bundle(real_bundle, tmp_path_factory) -> Path:  # noqa: F811
    """The test bundle with CALIBRATION in its bundle.json, as an export with calibration writes it."""
    return with_calibration(real_bundle, tmp_path_factory.mktemp("calibrated"), CALIBRATION)


@pytest.fixture(scope="module")
def calibrated_app(watch, calibrated_bundle, tmp_path_factory):
    yield from serve(calibrated_bundle, tmp_path_factory.mktemp("calibrated-app"))


def predict_images(bundle: Path, photo: Path, d: Path, *args) -> pd.DataFrame:
    """predict-images' table (as text) for one photo."""
    r = cli("predict-images", bundle, photo, "--out", d / "preds.csv", *args, cwd=d)
    assert r.returncode == 0, r.stderr
    return pd.read_csv(d / "preds.csv", dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def expected(old_bundle, photo_dir, tmp_path_factory) -> pd.Series:  # noqa: F811
    """predict-images' row for the astronaut photo."""
    rows = predict_images(old_bundle, photo_dir / "astronaut.jpg", tmp_path_factory.mktemp("cli"))
    assert len(rows) == 1, rows
    return rows.iloc[0]


@pytest.fixture(scope="module")
def page(app, expected, tmp_path_factory):
    """Headless Chromium on the app's page, downloads going to page.downloads."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: apt-get install chromium chromium-driver (.ci/run does)")
    wait_for(lambda: served(app.proc, app.url, app.log), timeout=180, every=0.5)
    downloads = tmp_path_factory.mktemp("downloads")
    net_log = tmp_path_factory.mktemp("net-log") / "net-log.json"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--disable-domain-reliability",
        "--disable-client-side-phishing-detection",
        "--no-pings",
        "--no-default-browser-check",
        "--dns-prefetch-disable",
        "--disable-features=OptimizationHints,OptimizationGuideModelDownloading,AutofillServerCommunication,"
        "MediaRouter,Translate,SafeBrowsing,InterestFeedContentSuggestions",
        # Chromium's own services (update, accounts, autofill) still look names up; nothing may be resolved
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--proxy-server=http://127.0.0.1:9",  # and what is not loopback goes to a closed loopback port
        "--disable-dev-shm-usage",
        "--window-size=1400,1200",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
        f"--log-net-log={net_log}",
    ):
        options.add_argument(flag)
    with pytest.MonkeyPatch.context() as mp:  # the given driver is used; selenium must not fetch one
        mp.setattr(SeleniumManager, "binary_paths", lambda *a: pytest.fail("selenium-manager was called"))
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        driver.get(app.url)
        driver.downloads = downloads
        driver.app_url = app.url
        driver.net_log = net_log
        yield driver
    finally:
        driver.quit()


def status(driver) -> str:
    return driver.find_element(By.CSS_SELECTOR, "#status textarea").get_attribute("value")


def upload(driver, *paths: Path) -> list[str]:
    """Clear the page's photos, drop these instead; the status lines once they are in (one per file)."""
    # the file list's own Clear, not the one of the status tracker of a refused upload
    clear = driver.find_elements(By.CSS_SELECTOR, "#photos button[aria-label=Clear]:not(.clear-status button)")
    if clear:
        driver.execute_script("arguments[0].click()", clear[0])  # a toast may lie over it
        WebDriverWait(driver, 30).until(lambda d: status(d) == "")
    field = WebDriverWait(driver, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "#photos input[type=file]"))
    field.send_keys("\n".join(str(p) for p in paths))
    WebDriverWait(driver, 120).until(lambda d: status(d).count("\n") == len(paths) - 1 and status(d))
    return status(driver).splitlines()


def table(driver) -> list[list[str]]:
    """The table's cells, read again when it is redrawn while being read."""
    for _ in range(20):
        rows = driver.find_elements(By.CSS_SELECTOR, "#table [role=row].virtual-row")
        try:
            return [[c.text for c in r.find_elements(By.CSS_SELECTOR, "[role=gridcell]")] for r in rows]
        except StaleElementReferenceException:
            time.sleep(0.1)
    raise AssertionError("the table kept changing")


def intro(driver) -> str:
    """The page's opening lines, once the page has drawn them."""
    return WebDriverWait(driver, 60).until(
        lambda d: d.find_elements(By.ID, "intro") and d.find_element(By.ID, "intro").text
    )


def set_min_age(driver, value: float) -> None:
    field = driver.find_element(By.CSS_SELECTOR, "#min-age input")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(f"{value:g}")


def download(driver, folder: Path) -> pd.DataFrame:
    """The page's CSV, downloaded into folder (empty before), as text."""
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})
    driver.find_element(By.ID, "download").click()
    csv = wait_for(lambda: (folder / "faces.csv").is_file() and (folder / "faces.csv"), timeout=30)
    return pd.read_csv(io.StringIO(csv.read_text()), dtype=str, keep_default_na=False)


def warnings(driver) -> list[str]:
    """The messages of the toasts on the page (textContent: a stack of them shows only some)."""
    return [
        t.get_attribute("textContent").strip()
        for t in driver.find_elements(By.CSS_SELECTOR, "[data-testid=toast-text]")
    ]


def test_page_shows_what_predict_images_gives(page, app, expected, photo_dir, tmp_path_factory):  # noqa: F811
    assert upload(page, photo_dir / "astronaut.jpg") == ["astronaut.jpg: 1 face"]
    assert page.title == "Age and gender from faces"
    (row,) = table(page)
    file, face, box, score, age, prob, gender = row
    assert (file, face, gender) == ("astronaut.jpg", "0", expected.gender_label)
    assert int(age) == math.floor(float(expected.age))  # shown in whole years of age, 4 decimals in the CSV
    # a bundle without intervals: no interval in the CSV, no "at least" question, and a line saying why
    assert "age_low" not in expected and not page.find_elements(By.CSS_SELECTOR, "#min-age input")
    assert "has no calibration" in intro(page) and "ages without intervals" in intro(page)
    assert abs(float(prob) - float(expected.gender_prob)) <= 0.0005 + 1e-4
    box_cli = [float(expected[k]) for k in "xywh"]
    assert all(abs(a - b) <= 0.5 + 1e-4 for a, b in zip(map(float, box.split(", ")), box_cli, strict=True))
    assert abs(float(score) - float(expected.score)) <= 0.005 + 1e-4
    (caption,) = page.find_elements(By.CSS_SELECTOR, "#gallery .caption-label")
    assert caption.text == "astronaut.jpg: 1 face"
    assert page.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("naturalWidth") == "512"
    shot = tmp_path_factory.getbasetemp() / "app-page.png"
    page.save_screenshot(str(shot))
    # the CSV the page offers is predict-images' own table for the same file
    got = download(page, page.downloads).iloc[0]
    assert got.drop("file").to_dict() == expected.drop("file").to_dict() and got.file == "astronaut.jpg"
    # the browser's own connection to the app is among the sockets the watch sees
    ss = subprocess.run(["ss", "-tnpH", "state", "established"], capture_output=True, text=True).stdout
    assert any(f"127.0.0.1:{app.port} " in line and '"chromium"' in line for line in ss.splitlines()), ss


def test_bad_files_one_line_each_then_a_good_upload_works(page, app, photo_dir, tmp_path):  # noqa: F811
    lines = upload(page, *(photo_dir / name for name in BAD))
    assert lines == [f"{name}: {why}" for name, why in BAD.items()]
    wait_for(lambda: set(lines) <= set(warnings(page)), timeout=10)
    assert table(page) == []
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + bytes(MAX_MB * 1024 * 1024))
    page.find_element(By.CSS_SELECTOR, "#photos input[type=file]").send_keys(str(big))
    wait_for(lambda: any("exceed the maximum allowed size" in w and "big.png" in w for w in warnings(page)), 30)
    # gray, RGBA, 16-bit, CMYK, animated, EXIF-rotated photos and a group of thirty
    lines = upload(page, photo_dir / "group" / "thirty.png", *(photo_dir / name for name in GOOD))
    assert lines == ["thirty.png: 30 faces"] + [f"{name}: 1 face" for name in GOOD]
    grid = page.find_element(By.CSS_SELECTOR, "#table [role=grid]")  # the rows in view only are in the page
    assert grid.get_attribute("aria-rowcount") == str(1 + 30 + len(GOOD)) and table(page)[0][:2] == ["thirty.png", "0"]
    assert app.proc.poll() is None and "Traceback" not in app.log.read_text()


def test_intervals_and_at_least_answers(page, calibrated_app, calibrated_bundle, photo_dir, tmp_path):  # noqa: F811
    """A calibrated bundle's page: ages with their interval, and "at least N years old?" answered per face."""
    photo = photo_dir / "astronaut.jpg"
    cli_row = predict_images(calibrated_bundle, photo, tmp_path).iloc[0]
    low, high = float(cli_row.age_low), float(cli_row.age_high)
    wait_for(lambda: served(calibrated_app.proc, calibrated_app.url, calibrated_app.log), timeout=180, every=0.5)
    try:
        page.get(calibrated_app.url)
        assert "Ages with their 90% interval" in intro(page)
        assert upload(page, photo) == ["astronaut.jpg: 1 face"]
        (row,) = table(page)
        assert row[4] == f"{math.floor(float(cli_row.age))} ({math.floor(low)}-{math.floor(high)})", (row, cli_row)
        unboxed = page.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("src")
        # an age the whole interval is above, one inside it, one above it: the table's last column answers
        for age, answer in ((math.floor(low), "yes"), (math.floor(low) + 1, "unsure"), (math.floor(high) + 1, "no")):
            set_min_age(page, age)
            wait_for(lambda a=answer: [r[7:] for r in table(page)] == [[a]], timeout=30)
        headers = [h.text for h in page.find_elements(By.CSS_SELECTOR, "#table [role=columnheader]")]
        assert f"at least {math.floor(high) + 1}" in headers, headers
        assert page.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("src") != unboxed  # relabelled
        # the CSV is predict-images --min-age's table
        got = download(page, tmp_path / "downloads")
        want = predict_images(calibrated_bundle, photo, tmp_path, "--min-age", math.floor(high) + 1)
        assert list(got.columns) == list(want.columns) and f"at_least_{math.floor(high) + 1}" in got.columns
        assert got.drop(columns="file").to_dict("records") == want.drop(columns="file").to_dict("records")
        set_min_age(page, 0)  # off again: no answer column
        wait_for(lambda: [len(r) for r in table(page)] == [7], timeout=30)
        assert calibrated_app.proc.poll() is None and "Traceback" not in calibrated_app.log.read_text()
    finally:
        page.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(page.downloads)})
        page.get(page.app_url)


def face_row(**values) -> dict:
    return {"file": "a.jpg", "face": 0, "x": 10.0, "y": 40.0, "w": 30.0, "h": 30.0, "score": 0.9, **values}


def test_labels_and_table_read_the_interval_and_the_answer():
    row = face_row(age=34.4, age_low=28.7, age_high=41.2, gender_prob=0.8, gender=1, gender_label="female")
    old = face_row(age=34.6, gender_prob=0.8, gender=1, gender_label="female")
    assert age_text(row) == "34 (28-41)" and age_text(old) == "34"
    assert label_text(row) == "34 (28-41), female" and label_text(old, 18) == "34, female"
    assert label_text(row, 30) == "34 (28-41), female, 30+: unsure"
    assert [label_text(row, a).rsplit(" ", 1)[1] for a in (28, 41, 41.5)] == ["yes", "unsure", "no"]
    table = shown_table([row, face_row(face=-1)], 18)
    assert list(table.columns[-2:]) == ["gender", "at least 18"] and table.iloc[0, -1] == "yes" and len(table) == 1
    assert list(shown_table([old]).columns) == list(shown_table([row]).columns)  # no column when not asked
    photo = Photo(np.zeros((100, 80, 3), np.uint8), 1.0, [row], "a.jpg: 1 face")
    assert (draw(photo, 18) != draw(photo)).any() and not photo.image.any()  # a longer label; the photo kept
    # the page's "at least" age: off at 0 or empty, and always off for a bundle without intervals
    calibrated, old_bundle = SimpleNamespace(calibration=CALIBRATION), SimpleNamespace(calibration=None)
    assert [asked_age(calibrated, a) for a in (0, None, 18)] == [None, None, 18]
    assert asked_age(old_bundle, 18) is None


def test_bad_bundle_or_flag_is_one_line_and_exit_2(tmp_path):
    r = cli("app", tmp_path / "missing.tar.gz", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path / 'missing.tar.gz'}: no such bundle folder or archive\n"
    r = cli("app", tmp_path / "missing.tar.gz", "--max-file-size", "0", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr == "error: --max-file-size must be above 0\n"


def test_every_socket_stayed_on_loopback(watch, app, page):
    """Checked last: the app, chromedriver and Chromium never bound to or talked to a non-loopback address."""
    time.sleep(1)  # one more poll with the page still open
    watch.check_once()
    assert watch.seen > 0 and not watch.bad, watch.bad
    # Chromium's own record: no name was looked up, and no byte went to an address off loopback
    events, names = net_log_events(page.net_log)
    connects = {
        e["source"]["id"]: e["params"]["address"]
        for e in events
        if names[e["type"]] in ("TCP_CONNECT_ATTEMPT", "UDP_CONNECT") and "address" in e.get("params", {})
    }
    assert any(a == f"127.0.0.1:{app.port}" for a in connects.values()), connects  # the log saw the page load
    off = {i: a for i, a in connects.items() if not is_loopback(a)}
    assert set(off.values()) <= {IPV6_PROBE}, off
    sent = [names[e["type"]] for e in events if e["source"]["id"] in off and "BYTES_SENT" in names[e["type"]]]
    assert not sent and not [e for e in events if names[e["type"]] == "DNS_TRANSACTION"], sent
