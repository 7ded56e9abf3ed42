"""gradad serve's sources and sinks besides HTTP: the watched folder (each finished file scored
once, across restarts; pause and resume) and the webhook (retries with back-off, never holding
up an inspection, posts kept in the log across a restart)."""
import http.server
import json
import os
import sqlite3
import threading
import time

import numpy as np

from gradad.serve.store import DATABASE
from tests.serving import png_bytes, request, service_thread, wait_until
from tests.test_serve import images, model  # noqa: F401 (the fixture)

INTERVAL = 0.5


def log(data, table="inspections"):
    with sqlite3.connect(os.path.join(data, DATABASE)) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute(f"SELECT * FROM {table}")]


def scored(data):
    """source_path -> number of inspections of that watched file."""
    counts = {}
    for row in log(data):
        if row["source"] == "watch":
            counts[row["source_path"]] = counts.get(row["source_path"], 0) + 1
    return counts


def test_the_folder_source_scores_each_finished_file_once_across_restarts(model, tmp_path):  # noqa: F811
    _, path, _ = model
    folder, data = tmp_path / "in", str(tmp_path / "data")
    (folder / "day2").mkdir(parents=True)
    pictures = [png_bytes(rgb) for rgb in images()]
    (folder / "a.png").write_bytes(pictures[0])
    (folder / "day2" / "b.png").write_bytes(pictures[1])
    (folder / ".hidden.png").write_bytes(pictures[2])
    (folder / "c.png.part").write_bytes(pictures[2])
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    with service_thread(checkpoint=path, data=data, watch=str(folder), watch_interval_s=INTERVAL) as (url, service):
        wait_until(lambda: len(scored(data)) == 2, what="a.png and day2/b.png")
        # a file written in pieces, faster than the interval, is scored once, when complete
        slow = pictures[3]
        with open(folder / "d.png", "wb") as handle:
            for start in range(0, len(slow), len(slow) // 10 + 1):
                handle.write(slow[start:start + len(slow) // 10 + 1])
                handle.flush()
                time.sleep(INTERVAL / 10)
        (folder / "c.png.part").rename(folder / "c.png")  # the usual finish: write under another name, rename
        wait_until(lambda: len(scored(data)) == 4, what="d.png and c.png")
        answers = {r["source_path"]: r for r in request(url, "GET", "/v1/inspections").json()["items"]}
        assert answers["d.png"]["source"] == "watch" and answers["d.png"]["image_size"] == list(images()[3].shape[:2])
    watched = {r["path"]: r for r in log(data, "watched_files")}
    assert watched["d.png"]["size"] == len(slow) and len([p for p in watched if p == "d.png"]) == 1
    assert watched["broken.png"]["inspection_id"] is None and "not an image" in watched["broken.png"]["error"]
    assert set(watched) == {"a.png", "day2/b.png", "c.png", "d.png", "broken.png"}
    (folder / "e.png").write_bytes(pictures[4])
    with service_thread(checkpoint=path, data=data, watch=str(folder), watch_interval_s=INTERVAL):
        wait_until(lambda: "e.png" in scored(data), what="e.png after the restart")
        time.sleep(3 * INTERVAL)  # time enough to score anything twice
    assert scored(data) == {"a.png": 1, "day2/b.png": 1, "c.png": 1, "d.png": 1, "e.png": 1}


def test_pause_and_resume_the_folder_source(model, tmp_path):  # noqa: F811
    _, path, _ = model
    folder, data = tmp_path / "in", str(tmp_path / "data")
    folder.mkdir()
    with service_thread(checkpoint=path, data=data) as (url, service):
        assert request(url, "POST", "/v1/pause").status == 409  # no folder source
    with service_thread(checkpoint=path, data=data, watch=str(folder), watch_interval_s=INTERVAL) as (url, service):
        assert request(url, "POST", "/v1/pause").json() == {"paused": True}
        assert request(url, "GET", "/v1/status").json()["watch"]["paused"] is True
        (folder / "f.png").write_bytes(png_bytes(images()[0]))
        time.sleep(4 * INTERVAL)
        assert scored(data) == {}
    with service_thread(checkpoint=path, data=data, watch=str(folder), watch_interval_s=INTERVAL) as (url, service):
        assert request(url, "GET", "/v1/status").json()["watch"]["paused"] is True  # kept across the restart
        time.sleep(3 * INTERVAL)
        assert scored(data) == {}
        assert request(url, "POST", "/v1/resume").json() == {"paused": False}
        wait_until(lambda: scored(data) == {"f.png": 1}, what="f.png after resume")


class Hook:
    """A webhook receiver on loopback: answers 500 to the first ``fail`` posts, and holds each
    post until ``gate`` is set."""

    def __init__(self, fail=0):
        self.posts, self.fail, self.gate = [], fail, threading.Event()
        self.gate.set()
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                hook.gate.wait(60)
                hook.posts.append(body)
                self.send_response(500 if len(hook.posts) <= hook.fail else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self):
        return [p["inspection"]["id"] for p in self.posts[self.fail:]]

    def close(self):
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


def test_the_webhook_retries_with_back_off_and_posts_only_what_it_should(model, tmp_path):  # noqa: F811
    _, path, _ = model
    hook = Hook(fail=2)
    try:
        with service_thread(checkpoint=path, data=str(tmp_path / "d"), webhook=hook.url, webhook_on="anomalous",
                            webhook_backoff_s=0.1) as (url, service):
            answers = [request(url, "POST", "/v1/inspect", png_bytes(rgb), {"Content-Type": "image/png"}).json()
                       for rgb in images()]
            anomalous = [a["id"] for a in answers if a["anomalous"]]
            assert 0 < len(anomalous) < len(answers)
            wait_until(lambda: sorted(hook.delivered()) == sorted(anomalous), what="every anomalous result")
            wait_until(lambda: service.store.pending_posts() == 0, what="the outbox to empty")
            assert [p["inspection"]["id"] for p in hook.posts[:2]] == [anomalous[0]] * 2  # the failures, retried
            assert all(p["event"] == "inspection" and p["inspection"]["anomalous"] for p in hook.posts)
            text = request(url, "GET", "/metrics").body.decode()
            assert 'gradad_webhook_posts_total{result="failed"} 2' in text
            assert f'gradad_webhook_posts_total{{result="delivered"}} {len(anomalous)}' in text
    finally:
        hook.close()


def test_a_stuck_webhook_never_holds_up_inspection_and_posts_survive_a_restart(model, tmp_path):  # noqa: F811
    _, path, _ = model
    data = str(tmp_path / "d")
    hook = Hook()
    hook.gate.clear()  # every post hangs
    try:
        with service_thread(checkpoint=path, data=data, webhook=hook.url, webhook_timeout_s=30) as (url, service):
            first = request(url, "POST", "/v1/inspect", png_bytes(images()[0]), {"Content-Type": "image/png"})
            wait_until(lambda: service.webhook is not None and service.store.pending_posts() == 1)
            time.sleep(0.5)  # the sender has picked the first post up and hangs in it
            answers = [request(url, "POST", "/v1/inspect", png_bytes(rgb), {"Content-Type": "image/png"})
                       for rgb in images()[1:]]
            assert first.status == 200 and all(a.status == 200 for a in answers)
            assert hook.posts == [] and service.store.pending_posts() == len(images())
            hook.fail = 10 ** 6  # from now on the receiver answers 500 until replaced
            hook.gate.set()
        ids = [first.json()["id"]] + [a.json()["id"] for a in answers]
    finally:
        hook.close()
    assert len(log(data, "webhook_outbox")) == len(ids)  # still owed after the shutdown
    hook = Hook()
    try:
        with service_thread(checkpoint=path, data=data, webhook=hook.url, webhook_backoff_s=0.1) as (url, service):
            wait_until(lambda: sorted(set(hook.delivered())) == sorted(ids), what="the owed posts")
            wait_until(lambda: service.store.pending_posts() == 0)
    finally:
        hook.close()


def test_an_unreadable_watched_file_is_recorded_not_retried(model, tmp_path):  # noqa: F811
    _, path, _ = model
    folder, data = tmp_path / "in", str(tmp_path / "data")
    folder.mkdir()
    good = png_bytes(np.zeros((40, 40, 3), np.uint8))
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    with service_thread(checkpoint=path, data=data, watch=str(folder), watch_interval_s=0.2):
        wait_until(lambda: log(data, "watched_files"), what="the file's row")
        time.sleep(1.0)
    (row,) = log(data, "watched_files")
    assert row["path"] == "cut.png" and row["inspection_id"] is None and "truncated" in row["error"]
    assert log(data) == []
