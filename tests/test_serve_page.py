"""The page of gradad serve (GET /) in headless Chromium against a running service on the tiny
exported model of tests/test_runtime_onnx.py: images chosen through the page's file input come
back as cards with their overlay, score and decision; the history table and its filter, the
live counts and the pause button of the folder source agree with the service's log (read over
the API by the test, not from the page); a token-protected service asks for the token and
works once it is given; no console errors; a screenshot (also written to the file
$GRADAD_SERVE_SCREENSHOT names, which is how docs/serve-page.png is made).

Needs chromium, chromium-driver and selenium like tests/test_report_html.py's browser tests
(skipped without them unless GRADAD_REQUIRE_BROWSER=1).
"""
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.serving import request, service_thread, wait_until
from tests.test_report_html import _screenshot, browser  # noqa: F401  (browser: the fixture, reused)
from tests.test_runtime_onnx import export_tiny, torch_reference

TOKEN = "page-test-token"
TIMEOUT = 30.0  # seconds any one thing the page does may take
# (file name, seed, radius of the defect drawn on the part; 0: none)
UPLOADS = [("part-01.png", 1, 0), ("part-02.png", 2, 14), ("part-03.png", 3, 0)]
WATCHED = ("part-04.png", 4, 10)


def part_image(seed, defect):
    """A textured grey part, with a blue disc of radius ``defect`` on it (the tiny model scores
    those discs high)."""
    rng = np.random.default_rng(seed)
    h, w = 96, 144
    y, x = np.mgrid[0:h, 0:w]
    base = 150 + 40 * np.sin(x / 9.0) * np.cos(y / 13.0) + rng.normal(0, 6, (h, w))
    rgb = np.stack([base * 0.9, base, base * 1.05], axis=-1)
    if defect:
        cy, cx = rng.integers(25, h - 25), rng.integers(30, w - 30)
        rgb[(y - cy) ** 2 + (x - cx) ** 2 < defect ** 2] = (40, 20, 200)
    return np.clip(rgb, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(model.onnx, threshold): the threshold (given to the service) is halfway between the 2nd
    and 3rd highest of the four images' scores in torch, so the images get both decisions, none of them a close call."""
    torch.manual_seed(0)  # the conv's bias comes from the global generator: the same model in every run
    module, path = export_tiny(str(tmp_path_factory.mktemp("model")))
    scores = np.sort(torch_reference(module, [part_image(s, d) for _, s, d in UPLOADS + [WATCHED]])[1])
    assert scores[2] - scores[1] > 0.1 * abs(scores[2]), scores
    return path, float((scores[1] + scores[2]) / 2)


def write_png(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def log(url, headers=None, anomalous=None):
    """The service's inspections, newest first, from its API (filtered here, not by the service)."""
    response = request(url, "GET", "/v1/inspections?limit=500", headers=headers)
    assert response.status == 200, response.body
    items = response.json()["items"]
    return [r for r in items if anomalous is None or r["anomalous"] == anomalous]


def status(url, headers=None):
    response = request(url, "GET", "/v1/status", headers=headers)
    assert response.status == 200, response.body
    return response.json()


def js(driver, script):
    return driver.execute_script(script)


def cards(driver):
    """The result cards: inspection id, name, whether the overlay rendered, shown score, badge."""
    return js(driver, """return Array.from(document.querySelectorAll('#results .card')).map(card => {
        const img = card.querySelector('img'), badge = card.querySelector('.badge');
        return {id: card.dataset.id || null, text: card.textContent,
                rendered: !!img && img.complete && img.naturalWidth > 0,
                badge: badge ? badge.textContent : null};
    });""")


def history(driver):
    """The history table's rows: inspection id, whether its thumbnail rendered, score, decision."""
    return js(driver, """return Array.from(document.querySelectorAll('#history tbody tr')).map(tr => {
        const img = tr.querySelector('img');
        return {id: tr.dataset.id, rendered: !!img && img.complete && img.naturalWidth > 0,
                score: tr.cells[2].textContent, decision: tr.cells[3].textContent,
                source: tr.cells[5].textContent};
    });""")


def text_of(driver, element_id):
    return js(driver, f"return document.getElementById('{element_id}').textContent")


def shown_score(text):
    return float(re.search(r"score (-?\d+\.\d{4}) ", text).group(1))


def decision(anomalous):
    return "ANOMALOUS" if anomalous else "normal"


def console_errors(driver, ignore=lambda message: False):
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and not ignore(e["message"])]


def history_matches(driver, expected):
    """The table shows exactly the inspections ``expected`` (log records, newest first), each
    with its rendered thumbnail, score and decision."""
    rows = history(driver)
    return [r["id"] for r in rows] == [e["id"] for e in expected] and all(
        row["rendered"] and row["score"] == f"{e['score']:.4f}" and row["decision"] == decision(e["anomalous"])
        and row["source"].split(":")[0] == e["source"] for row, e in zip(rows, expected))


def choose_files(driver, paths):
    # the input is hidden; chromedriver sets a file input's files without it being interactable
    driver.find_element("id", "files").send_keys("\n".join(str(p.resolve()) for p in paths))


def test_page_inspects_lists_counts_and_pauses(browser, model, tmp_path):  # noqa: F811
    path, threshold = model
    watch = tmp_path / "watch"
    watch.mkdir()
    uploads = [write_png(tmp_path / "upload" / name, part_image(seed, d)) for name, seed, d in UPLOADS]
    browser.set_window_size(1280, 800)
    with service_thread(checkpoint=path, data=str(tmp_path / "data"), threshold=threshold,
                        watch=str(watch)) as (url, service):
        # one inspection from the folder source first, so the history has both sources
        write_png(watch / WATCHED[0], part_image(*WATCHED[1:]))
        wait_until(lambda: len(log(url)) == 1, timeout=TIMEOUT, what="the watched file to be scored")

        browser.get_log("browser")  # drop the entries of earlier pages
        browser.get(url + "/")
        wait_until(lambda: text_of(browser, "state") == "ready", timeout=TIMEOUT, what="the page to be ready")
        assert text_of(browser, "model") == "model.onnx"
        assert float(text_of(browser, "threshold")) == pytest.approx(threshold, rel=1e-4)
        wait_until(lambda: history_matches(browser, log(url)), timeout=TIMEOUT, what="the watched file's row")

        # 2: choose three images; each gets a card with its overlay, score and decision
        choose_files(browser, uploads)
        wait_until(lambda: len(log(url)) == 4 and all(c["rendered"] and c["badge"] for c in cards(browser))
                   and len(cards(browser)) == 3, timeout=TIMEOUT, what="three cards with overlay and decision")
        records = {r["id"]: r for r in log(url)}
        shown = cards(browser)
        # the cards are newest first: the last file chosen is on top
        assert [c["text"].split(":")[0] for c in shown] == [name for name, _, _ in reversed(UPLOADS)]
        for card in shown:
            record = records[card["id"]]
            assert record["source"] == "http"
            assert shown_score(card["text"]) == pytest.approx(record["score"], abs=5.1e-5)
            assert card["badge"] == decision(record["anomalous"])
            assert record["anomalous"] == (record["score"] > threshold)
        assert {records[c["id"]]["anomalous"] for c in shown} == {True, False}

        # 3: the history lists every inspection with its thumbnail; the filter shows one decision
        wait_until(lambda: history_matches(browser, log(url)), timeout=TIMEOUT, what="the history to list all")
        assert sorted(r["source"].split(":")[0] for r in history(browser)) == ["http", "http", "http", "watch"]
        select = browser.find_element("id", "filter")
        for label, anomalous in (("anomalous", True), ("normal", False), ("all", None)):
            select.find_element("xpath", f"option[normalize-space()='{label}']").click()
            expected = log(url, anomalous=anomalous)
            assert expected  # both decisions are in the log
            wait_until(lambda: history_matches(browser, expected), timeout=TIMEOUT, what=f"the {label} rows")

        # 4: the live counts are the log's
        everything = log(url)
        counts = {"normal": sum(not r["anomalous"] for r in everything),
                  "anomalous": sum(r["anomalous"] for r in everything)}
        assert counts == {"normal": 2, "anomalous": 2}
        wait_until(lambda: (text_of(browser, "count-normal"), text_of(browser, "count-anomalous")) ==
                   (str(counts["normal"]), str(counts["anomalous"])), timeout=TIMEOUT, what="the counts")
        assert status(url)["counts"] == counts

        # 8: the screenshot, with both decisions showing
        shot = tmp_path / "serve-page.png"
        _screenshot(browser, shot)
        assert Image.open(shot).size[0] == 1280
        if os.environ.get("GRADAD_SERVE_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["GRADAD_SERVE_SCREENSHOT"])

        # 5: pause and resume the folder source
        assert js(browser, "return !document.getElementById('watch').hidden")
        button = browser.find_element("id", "pause")
        assert button.text == "Pause" and status(url)["watch"]["paused"] is False
        button.click()
        wait_until(lambda: status(url)["watch"]["paused"] is True, timeout=TIMEOUT, what="the service to pause")
        wait_until(lambda: button.text == "Resume" and text_of(browser, "watch-state") == "paused",
                   timeout=TIMEOUT, what="the button to read Resume")
        assert service.folder.paused
        button.click()
        wait_until(lambda: status(url)["watch"]["paused"] is False, timeout=TIMEOUT, what="the service to resume")
        wait_until(lambda: button.text == "Pause" and text_of(browser, "watch-state") == "running",
                   timeout=TIMEOUT, what="the button to read Pause")

        # 7: nothing went wrong in the page
        assert console_errors(browser) == []
        assert js(browser, "return getComputedStyle(document.getElementById('token-box')).display") == "none"


def test_page_asks_for_the_token(browser, model, tmp_path):  # noqa: F811
    path, threshold = model
    image = write_png(tmp_path / "upload" / UPLOADS[1][0], part_image(*UPLOADS[1][1:]))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with service_thread(checkpoint=path, data=str(tmp_path / "data"), threshold=threshold,
                        token=TOKEN) as (url, service):
        browser.get_log("browser")
        browser.get(url + "/")
        box = browser.find_element("id", "token-box")
        wait_until(lambda: box.is_displayed() and text_of(browser, "state") == "token needed", timeout=TIMEOUT,
                   what="the page to ask for the token")
        assert text_of(browser, "model") == "…"  # nothing was loaded without it

        # Chromium logs each refused request as a SEVERE "Failed to load resource ... 401" entry:
        # those of the page's API calls before the token is typed are expected and the only ones
        # left out; after it, every error counts
        def refused_api_call(message):
            return re.match(rf"{re.escape(url)}/v1/\S+ - Failed to load resource: .*status of 401", message)

        assert console_errors(browser, ignore=refused_api_call) == []
        browser.find_element("id", "token").send_keys(TOKEN)
        browser.find_element("id", "token-save").click()
        wait_until(lambda: text_of(browser, "state") == "ready", timeout=TIMEOUT, what="the status with the token")
        assert not box.is_displayed()
        assert text_of(browser, "model") == "model.onnx"
        assert float(text_of(browser, "threshold")) == pytest.approx(threshold, rel=1e-4)

        # the token goes with the upload and the overlay's request too
        choose_files(browser, [image])
        wait_until(lambda: [c["rendered"] and c["badge"] for c in cards(browser)] == [decision(True)],
                   timeout=TIMEOUT, what="the card of the upload")
        (record,) = log(url, headers=auth)
        assert cards(browser)[0]["id"] == record["id"] and record["anomalous"]
        wait_until(lambda: history_matches(browser, [record]) and text_of(browser, "count-anomalous") == "1",
                   timeout=TIMEOUT, what="the history and counts with the token")
        assert console_errors(browser) == []
