"""report.html: the writer's content (escaping, n/a, gallery order, decisions, bad input, atomic
write), the pages `gradad test` and `gradad predict` write, and each page opened in headless
Chromium: no console errors, every image rendered, a screenshot.

The browser tests need the Debian packages chromium and chromium-driver and the pip package
selenium (scripts/test.sh installs them). Without them they are skipped, unless
GRADAD_REQUIRE_BROWSER=1 (set by scripts/test.sh), which makes a missing browser a failure.
"""

import base64
import csv
import io
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import gradad.io_utils
from gradad.operating_points import operating_points
from gradad.report.figures import roc_curves_png as roc_png
from gradad.report.html import REPORT_HTML, write_report_html

METRICS = {
    "a": {"image_auroc": 0.9, "pixel_auroc": None},
    "b": {"image_auroc": 0.7, "pixel_auroc": 0.8},
    "mean": {"image_auroc": 0.8, "pixel_auroc": None},
}


class _Page(HTMLParser):
    """The parts of a report page the tests look at: table rows by table id, <img> attributes,
    and per gallery caption its name, score, label and decision."""

    def __init__(self, text):
        super().__init__()
        self.tables, self.images, self.captions, self.tags = {}, [], [], []
        self._table = self._row = self._caption = self._span = None
        self._in_cell = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._row.append("")
            self._in_cell = True
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "figcaption":
            self._caption = {"text": ""}
        elif tag == "span" and self._caption is not None:
            self._span = attrs["class"].split()[0]
            self._caption[self._span] = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = self._row = None
        elif tag in ("td", "th"):
            self._in_cell = False
        elif tag == "span":
            self._span = None
        elif tag == "figcaption":
            self._caption["label"] = re.search(r"label (\w+)", self._caption["text"]).group(1)
            self.captions.append(self._caption)
            self._caption = None

    def handle_data(self, data):
        if self._in_cell:
            self._row[-1] += data
        if self._caption is not None:
            self._caption["text"] += data
            if self._span is not None:
                self._caption[self._span] += data


def _png(path, size=(40, 30), colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _gallery(out, scores, labels=None, prefix="img"):
    labels = labels or [None] * len(scores)
    return [{"name": f"{prefix}{i}.png", "image": _png(out / "heatmaps" / f"{prefix}{i}.png"), "score": s,
             "label": label} for i, (s, label) in enumerate(zip(scores, labels))]


def _read(out):
    return _Page((out / REPORT_HTML).read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------ the writer

def test_metrics_table_rows_in_order_mean_last_and_none_as_na(tmp_path):
    metrics = {"mean": METRICS["mean"], "a": METRICS["a"], "b": METRICS["b"]}  # mean given first
    write_report_html(tmp_path, metrics=metrics)
    rows = _read(tmp_path).tables["metrics"]
    assert rows[0] == ["class", "image_auroc", "pixel_auroc"]
    assert rows[1:] == [["a", "90.0", "n/a"], ["b", "70.0", "80.0"], ["mean", "80.0", "n/a"]]


def test_user_strings_are_escaped(tmp_path):
    evil = '<script>alert("x")</script>&'
    gallery = [{"name": evil, "image": _png(tmp_path / "heatmaps" / "a.png"), "score": 1.0, "label": 1,
                "class": evil, "detail": evil}]
    write_report_html(tmp_path, title=evil, metrics={evil: {"image_auroc": 0.5}},
                      roc={evil: (np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.3, 0.4]))},
                      threshold={evil: 0.5}, threshold_source=evil, gallery=gallery,
                      config=f"data:\n  root: '{evil}</pre>'\n")
    text = (tmp_path / REPORT_HTML).read_text()
    assert "<script" not in text and "</pre>'" not in text
    assert text.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;") >= 7
    page = _Page(text)
    assert "script" not in page.tags
    assert page.tables["metrics"][1][0] == evil  # the parser unescapes back to the original
    assert page.tables["threshold"][1] == [evil, "0.5"]
    assert page.images[1]["alt"] == evil


def test_gallery_is_sorted_by_score_with_decisions_at_the_threshold(tmp_path):
    scores = [0.2, 0.9, 0.5, 0.9, -1.0]
    write_report_html(tmp_path, threshold=0.5, gallery=_gallery(tmp_path, scores, labels=[0, 1, None, 0, 0]))
    page = _read(tmp_path)
    names = [c["name"] for c in page.captions]
    assert names == ["img1.png", "img3.png", "img2.png", "img0.png", "img4.png"]  # ties keep their order
    assert [img["src"] for img in page.images] == [f"heatmaps/img{i}.png" for i in (1, 3, 2, 0, 4)]
    decisions = [c["decision"] for c in page.captions]
    assert decisions == ["anomalous", "anomalous", "normal", "normal", "normal"]  # 0.5 is not above 0.5
    assert [c["label"] for c in page.captions] == ["anomalous", "normal", "unknown", "normal", "normal"]


def test_per_class_thresholds_and_no_threshold(tmp_path):
    gallery = _gallery(tmp_path, [0.6, 0.6, 0.6])
    for entry, name in zip(gallery, ["a", "b", "c"]):
        entry["class"] = name
    write_report_html(tmp_path, threshold={"a": 0.5, "b": 0.7, "c": None}, gallery=gallery)
    decisions = {c["name"]: c["decision"] for c in _read(tmp_path).captions}
    assert decisions == {"img0.png": "anomalous", "img1.png": "normal", "img2.png": "no threshold"}
    write_report_html(tmp_path, gallery=gallery)
    assert {c["decision"] for c in _read(tmp_path).captions} == {"no threshold"}


def test_roc_is_an_embedded_png_and_the_config_is_shown(tmp_path):
    labels, scores = np.array([0, 0, 1, 1, 0]), np.array([0.1, 0.4, 0.35, 0.8, 0.2])
    write_report_html(tmp_path, roc={"a": (labels, scores)}, config={"model": {"backbone": "lite0"}})
    text = (tmp_path / REPORT_HTML).read_text()
    src = _Page(text).images[0]["src"]
    assert src.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert image.size == (600, 600)
    assert "model:\n  backbone: lite0" in text
    assert os.listdir(tmp_path) == [REPORT_HTML]  # the ROC needs no file of its own


def _points(names=("a", "b"), source="validation quantile 0.99"):
    labels = np.array([0, 0, 1, 1, 0, 1, 0, 0])
    scores = np.array([0.1, 0.6, 0.7, 0.3, 0.2, 0.9, 0.4, 0.5])
    classes = [names[0]] * 4 + [names[1]] * 4
    return operating_points(labels, scores, classes, {names[0]: 0.5, names[1]: 0.45}, source,
                            {names[0]: list(np.linspace(0, 0.5, 30)), names[1]: list(np.linspace(0, 0.4, 120))})


def test_operating_points_section(tmp_path):
    points = _points()
    write_report_html(tmp_path, metrics=METRICS, threshold={"a": 0.5, "b": 0.45}, operating_points=points)
    text = (tmp_path / REPORT_HTML).read_text()
    assert "<h2>Operating points</h2>" in text
    page = _Page(text)
    stored = page.tables["op-stored"]
    assert stored[0] == ["class", "threshold", "TP", "FP", "TN", "FN", "precision", "recall", "FPR"]
    assert [row[0] for row in stored[1:]] == ["a", "b", "all"]
    for row, key in zip(stored[1:], ["a", "b", "all"]):
        record = points[key]["stored"]
        assert [int(c) for c in row[2:6]] == [record[k] for k in ("tp", "fp", "tn", "fn")]
        assert row[7] == f"{100 * record['recall']:.2f}%" and row[8] == f"{100 * record['fpr']:.2f}%"
    assert stored[1][1] == "0.5" and stored[3][1] == "per class"
    table = page.tables["op-points"]
    assert table[0][:6] == ["class", "operating point", "threshold", "chosen from", "test recall", "test FPR"]
    rows_a = [row for row in table[1:] if row[0] == "a"]
    assert [row[1] for row in rows_a] == ["stored threshold", "FPR ≤ 0.1%", "FPR ≤ 1%", "FPR ≤ 5%", "F1-max"]
    assert rows_a[0][3] == "validation quantile 0.99"
    assert "n = 30" in rows_a[3][3] and "only 30 validation normals" in rows_a[1][3]
    assert rows_a[4][3].startswith("tuned on the test split, not for deployment")
    target = points["b"]["targets"][2]
    row_b = [row for row in table[1:] if row[0] == "b" and row[1] == "FPR ≤ 5%"][0]
    assert row_b[2] == f"{target['threshold']:.6g}" and row_b[4] == f"{100 * target['recall']:.2f}%"
    assert row_b[5] == f"{100 * target['fpr']:.2f}%" and [int(c) for c in row_b[6:]] == [target["fn"], target["fp"]]
    pooled = points["all"]["stored"]
    assert (f"about {1000 * pooled['fpr']:.1f} of every 1000 good parts are rejected" in text
            and f"{pooled['fn']} of the {pooled['tp'] + pooled['fn']} defective test images" in text)
    write_report_html(tmp_path, metrics=METRICS)
    assert "Operating points" not in (tmp_path / REPORT_HTML).read_text()  # not given: no section


def test_operating_points_are_escaped(tmp_path):
    evil = '<script>alert("x")</script>&'
    write_report_html(tmp_path, operating_points=_points(names=(evil, "b"), source=evil))
    text = (tmp_path / REPORT_HTML).read_text()
    assert "<script" not in text
    page = _Page(text)
    assert page.tables["op-stored"][1][0] == evil and page.tables["op-points"][1][3] == evil


def test_roc_png_changes_with_the_scores():
    labels = np.array([0, 0, 1, 1])
    assert roc_png({"a": (labels, np.array([0.1, 0.2, 0.8, 0.9]))}) != roc_png(
        {"a": (labels, np.array([0.9, 0.2, 0.8, 0.1]))})


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(metrics={"a": {"x": float("nan")}}), ValueError, r"metrics\['a'\]\['x'\] must be finite"),
    (dict(metrics={"a": {"x": 0.5}, "b": {"y": 0.5}}), ValueError, r"metrics\['b'\] must have the metrics"),
    (dict(roc={"a": (np.array([1, 1]), np.array([0.1, 0.2]))}), ValueError, r"roc: class 'a'"),
    (dict(threshold=float("inf")), ValueError, "threshold must be finite"),
    (dict(threshold="high"), TypeError, "threshold must be a real number"),
    (dict(gallery=[{"name": "x", "score": 1.0}]), ValueError, r"gallery\[0\] lacks the key\(s\) \['image'\]"),
    (dict(gallery=[{"name": "x", "image": "missing.png", "score": 1.0}]), FileNotFoundError,
     r"gallery\[0\]\['image'\]"),
    (dict(config=3), TypeError, "config must be"),
    (dict(title=None), TypeError, "title must be a string"),
])
def test_bad_input_names_the_argument_and_writes_nothing(tmp_path, kwargs, error, match):
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        write_report_html(out, **kwargs)
    assert not (out / REPORT_HTML).exists()


def test_bad_gallery_entries(tmp_path):
    inside = _png(tmp_path / "out" / "h.png")
    outside = _png(tmp_path / "elsewhere.png")
    cases = [({"name": "x", "image": outside, "score": 1.0}, ValueError, "inside the output folder"),
             ({"name": "x", "image": inside, "score": float("nan")}, ValueError, r"\['score'\] must be finite"),
             ({"name": "x", "image": inside, "score": 1.0, "label": 2}, ValueError, r"\['label'\] must be 0, 1"),
             ({"name": 7, "image": inside, "score": 1.0}, TypeError, r"\['name'\] must be a string")]
    for entry, error, match in cases:
        with pytest.raises(error, match=match):
            write_report_html(tmp_path / "out", gallery=[entry])
    with pytest.raises(TypeError, match="gallery must be a sequence"):
        write_report_html(tmp_path / "out", gallery={"name": "x"})
    assert sorted(os.listdir(tmp_path / "out")) == ["h.png"]


def test_a_failed_write_keeps_the_old_page_and_leaves_no_partial_file(tmp_path, monkeypatch):
    write_report_html(tmp_path, title="first", gallery=_gallery(tmp_path, [0.5]))
    before = (tmp_path / REPORT_HTML).read_bytes()

    def failing_fsync(fd):  # the new page's bytes are in the temporary file, not yet in place
        raise OSError("disk full")

    monkeypatch.setattr(gradad.io_utils.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_report_html(tmp_path, title="second", gallery=_gallery(tmp_path, [0.5, 0.7]))
    assert (tmp_path / REPORT_HTML).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["heatmaps", REPORT_HTML]


# ------------------------------------------------------------------------------ the commands

TINY = ["--set", "model.backbone=efficientnet_lite0", "--set", "model.backbone_weights=random",
        "--set", "model.input_size=32", "--set", "model.fusion=crad-s", "--set", "model.num_blocks=1",
        "--set", "train.epochs=1", "--set", "train.batch_size=4", "--set", "train.num_workers=0",
        "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def cli_reports(tmp_path_factory):
    """report.html of `gradad test`, of `gradad predict` of the checkpoint and of its ONNX export
    (the torch-free predict) on a tiny synthetic MVTec-layout run."""
    from gradad.cli import main
    from tests.synthetic import make_mvtec

    base = tmp_path_factory.mktemp("cli")
    root = make_mvtec(base / "mvtec", classes=("a", "b"), n_train=6, n_test_good=3, n_test_bad=3, size=40)
    run, tested, predicted = base / "run", base / "test", base / "predict"
    assert main(["train", "--dataset", "mvtec", "--root", str(root), "--out", str(run), *TINY,
                 "--val-fraction", "0.34"]) == 0
    assert main(["test", "--checkpoint", str(run), "--out", str(tested), "--set", "eval.heatmaps=4",
                 "--no-progress"]) == 0
    assert main(["predict", str(root / "a" / "test" / "broken"), "--checkpoint", str(run), "--out", str(predicted),
                 "--no-progress"]) == 0
    # the torch-free predict of the same model, exported
    exported = base / "exported"
    assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(exported)]) == 0
    light = base / "light"
    assert main(["predict", str(root / "a" / "test" / "broken"), "--checkpoint", str(exported / "model.onnx"),
                 "--out", str(light), "--no-progress"]) == 0
    return tested, predicted, light


def test_gradad_test_writes_the_report(cli_reports):
    tested = cli_reports[0]
    metrics = json.loads((tested / "metrics.json").read_text())["results"]
    page = _read(tested)
    table = page.tables["metrics"]
    assert [row[0] for row in table[1:]] == ["a", "b", "mean"]
    assert table[1][1] == f"{100 * metrics['a']['image_auroc']:.1f}"
    assert page.images[0]["src"].startswith("data:image/png;base64,")
    heatmaps = [img["src"] for img in page.images[1:]]
    assert len(heatmaps) == 4 and all((tested / src).is_file() for src in heatmaps)
    scores = [float(c["score"]) for c in page.captions]
    assert scores == sorted(scores, reverse=True)
    assert "model:" in (tested / REPORT_HTML).read_text()


def test_gradad_test_reports_the_operating_points(cli_reports):
    """metrics.json / metrics.csv / report.html of `gradad test` hold the operating points, and
    the counts at the stored threshold agree with scores.csv counted here."""
    tested = cli_reports[0]
    payload = json.loads((tested / "metrics.json").read_text())
    points = payload["operating_points"]
    assert list(points) == ["a", "b", "all"]
    with open(tested / "scores.csv", newline="") as handle:
        scores = list(csv.DictReader(handle))
    threshold = points["all"]["stored"]["threshold"]
    assert isinstance(threshold, float)  # one model for both classes: one stored threshold
    for name in ("a", "b"):
        rows = [r for r in scores if r["class"] == name]
        flagged = [float(r["score"]) > threshold for r in rows]
        anomalous = [r["label"] == "1" for r in rows]
        stored = points[name]["stored"]
        assert stored["tp"] == sum(f and a for f, a in zip(flagged, anomalous))
        assert stored["fp"] == sum(f and not a for f, a in zip(flagged, anomalous))
        assert stored["threshold"] == threshold and stored["source"].startswith("validation")
        assert [t["n_validation"] for t in points[name]["targets"]] == [points["all"]["targets"][0]["n_validation"]] * 3
        assert points[name]["f1_max"]["tuned_on"] == "test split"
    with open(tested / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[-1]["class"] == "mean" and int(rows[-1]["stored_fp"]) == points["all"]["stored"]["fp"]
    page = _read(tested)
    assert [row[0] for row in page.tables["op-stored"][1:]] == ["a", "b", "all"]
    assert len(page.tables["op-points"]) == 1 + 3 * 5


@pytest.mark.parametrize("side", ["checkpoint", "exported"])
def test_gradad_predict_writes_the_report(cli_reports, side):
    predicted = cli_reports[1] if side == "checkpoint" else cli_reports[2]
    results = json.loads((predicted / "results.json").read_text())
    page = _read(predicted)
    assert "metrics" not in page.tables  # no labels, no metrics
    decisions = {c["name"]: c["decision"] for c in page.captions}
    assert decisions == {os.path.basename(r["path"]): "anomalous" if r["anomalous"] else "normal"
                         for r in results["images"]}
    assert all((predicted / img["src"]).is_file() for img in page.images)
    text = (predicted / REPORT_HTML).read_text()
    assert f"{results['threshold']:.6g}" in text
    if side == "exported":  # the model's metadata in place of the config
        assert "<h2>Model</h2>" in text and "any_input_size" in text


# ------------------------------------------------------------------------------ in a browser

@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by selenium through the system's chromedriver (Selenium
    Manager is never asked to download one)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    if webdriver is None or chromium is None or chromedriver is None:
        message = ("the browser tests need chromium, chromium-driver (apt-get install -y chromium "
                   "chromium-driver) and selenium (pip install selenium)")
        if os.environ.get("GRADAD_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # --no-sandbox: Chromium refuses to start as root (CI) with its sandbox on
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,2000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield driver
    driver.quit()


def page_problems(driver, path):
    """Open ``path`` and list what is wrong with it: SEVERE console entries and <img> elements
    that did not render (naturalWidth 0). Empty for a good page."""
    driver.get_log("browser")  # drop the entries of earlier pages
    driver.get(Path(path).resolve().as_uri())
    driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const pending = Array.from(document.images).filter(img => !img.complete)
            .map(img => new Promise(resolve => { img.onload = img.onerror = resolve; }));
        Promise.all(pending).then(() => done());""")
    problems = [f"console: {e['message']}" for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    broken = driver.execute_script(
        "return Array.from(document.images).filter(img => img.naturalWidth === 0)"
        ".map(img => img.getAttribute('alt') || img.getAttribute('src'))")
    problems += [f"image not rendered: {name}" for name in broken]
    if driver.execute_script("return document.images.length") == 0:
        problems.append("no images on the page")
    return problems


def _screenshot(driver, path):
    driver.save_screenshot(str(path))
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 0
    colours = Image.open(path).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 10  # not a blank page


def _full_report(out):
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.3, 0.5, 0.4, 0.8, 0.9])
    return write_report_html(out, title="browser check", metrics=METRICS, roc={"a": (labels, scores)},
                             threshold=0.45, threshold_source="given",
                             gallery=_gallery(out, list(scores), labels=list(labels)), config="a: 1\n",
                             operating_points=operating_points(labels, scores, ["a"] * 6, 0.45, "given",
                                                               {None: [0.1, 0.2, 0.3, 0.35]}))


def test_report_renders_in_chromium(browser, tmp_path):
    report = _full_report(tmp_path / "run")
    assert page_problems(browser, report) == []
    assert len(browser.find_elements("css selector", "img")) == 7  # ROC + 6 heatmaps
    _screenshot(browser, tmp_path / "report.png")


def test_the_browser_check_sees_broken_images_and_console_errors(browser, tmp_path):
    report = _full_report(tmp_path / "run")
    (tmp_path / "run" / "heatmaps" / "img2.png").write_bytes(b"not a png")
    os.remove(tmp_path / "run" / "heatmaps" / "img4.png")
    problems = page_problems(browser, report)
    assert "image not rendered: img2.png" in problems and "image not rendered: img4.png" in problems
    assert any(p.startswith("console:") and "img4.png" in p for p in problems)  # the missing file
    scripted = tmp_path / "script.html"
    scripted.write_text('<img src="run/heatmaps/img0.png" alt="x"><script>console.error("boom")</script>')
    assert [p for p in page_problems(browser, scripted) if "boom" in p]


def test_command_reports_render_in_chromium(browser, cli_reports, tmp_path):
    for name, folder in zip(("test", "predict", "predict-exported"), cli_reports):
        assert page_problems(browser, folder / REPORT_HTML) == [], name
        _screenshot(browser, tmp_path / f"{name}.png")
