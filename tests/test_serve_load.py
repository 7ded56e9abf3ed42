"""gradad serve under load and under SIGKILL, on the Lite demo model (EfficientNet-Lite1 with
its ImageNet weights at 240 px, trained one epoch on a small synthetic set and exported to
ONNX), each service in a process of its own where torch cannot be imported, on loopback only.

- Load: 8 clients send 50 images each; no request may fail, every returned id must be in the
  log, and the test prints p50/p99 latency and images/s (measured, never asserted: see
  benchmarks/bench_serve.py for the committed figures).
- SIGKILL: clients send while the service is killed; after it restarts, every acknowledged
  inspection is in the log with its files, and there is no half-written row or file.
"""
import concurrent.futures
import io
import os
import signal
import sqlite3
import statistics
import threading
import time

import numpy as np
import pytest
from PIL import Image

from gradad.cli import main
from gradad.serve.store import DATABASE
from tests.serving import ROOT, png_bytes, request, start_process, wait_until
from tests.synthetic import make_mvtec
from tests.torchless import torchless_env

CLIENTS, PER_CLIENT = 8, 50


@pytest.fixture(scope="module")
def lite_model(tmp_path_factory):
    """model.onnx of the Lite demo preset (1 epoch), and distinct 240 x 240 PNG bodies."""
    tmp = tmp_path_factory.mktemp("lite")
    root = make_mvtec(tmp / "data", classes=("a",), n_train=8, n_test_good=1, n_test_bad=1, size=64)
    run = tmp / "run"
    assert main(["train", "--preset", "lite-demo", "--dataset", "mvtec", "--root", str(root), "--out", str(run),
                 "--set", "train.epochs=1", "--val-fraction", "0.25", "--no-progress"]) == 0
    assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(tmp / "onnx")]) == 0
    rng = np.random.default_rng(0)
    bodies = []
    for i in range(16):
        base = rng.integers(90, 160, (240, 240, 3), dtype=np.uint8)
        if i % 4 == 0:  # a bright scratch now and then
            base[100:110, 20:200] = 255
        bodies.append(png_bytes(base))
    return str(tmp / "onnx" / "model.onnx"), bodies


def post(url, body):
    return request(url, "POST", "/v1/inspect", body, {"Content-Type": "image/png"}, timeout=120)


def logged(data):
    with sqlite3.connect(os.path.join(data, DATABASE)) as db:
        return {r[0]: r[1:] for r in db.execute("SELECT id, heatmap, overlay FROM inspections")}


def test_eight_clients_fifty_images_each(lite_model, tmp_path):
    model, bodies = lite_model
    data = str(tmp_path / "data")
    env, marker = torchless_env(tmp_path, [ROOT, os.path.join(ROOT, "python")])
    process, url = start_process(["--checkpoint", model, "--data", data, "--threads", "2"], env=env)
    try:
        wait_until(lambda: request(url, "GET", "/readyz").status == 200, timeout=120, what="the model")

        def client(index):
            results = []
            for i in range(PER_CLIENT):
                began = time.perf_counter()
                answer = post(url, bodies[(index + i) % len(bodies)])
                results.append((answer.status, answer.body, time.perf_counter() - began))
            return results

        began = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            results = [r for rs in pool.map(client, range(CLIENTS)) for r in rs]
        elapsed = time.perf_counter() - began
        metrics = request(url, "GET", "/metrics").body.decode()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, "".join(process.output)
    assert not marker.exists(), "gradad serve imported torch"
    failures = [(s, b[:200]) for s, b, _ in results if s != 200]
    assert failures == [] and len(results) == CLIENTS * PER_CLIENT
    ids = [__import__("json").loads(b)["id"] for _, b, _ in results]
    assert len(set(ids)) == len(ids) and set(ids) == set(logged(data))
    latencies = sorted(t for _, _, t in results)
    runs = float(metrics.split("gradad_batch_size_count ")[1].split()[0])
    print(f"\ngradad serve, Lite demo, {CLIENTS} clients x {PER_CLIENT}: {len(ids) / elapsed:.1f} images/s, latency "
          f"p50 {1000 * statistics.median(latencies):.0f} ms, p99 {1000 * latencies[int(0.99 * len(latencies))]:.0f} "
          f"ms, mean batch {len(ids) / runs:.2f}")


def test_sigkill_under_load_loses_no_acknowledged_inspection(lite_model, tmp_path):
    model, bodies = lite_model
    data = str(tmp_path / "data")
    args = ["--checkpoint", model, "--data", data, "--threads", "2"]
    process, url = start_process(args)
    wait_until(lambda: request(url, "GET", "/readyz").status == 200, timeout=120, what="the model")
    acknowledged, stop = [], threading.Event()

    def client(index):
        i = 0
        while not stop.is_set():
            try:
                answer = post(url, bodies[(index + i) % len(bodies)])
            except OSError:
                return  # the service is gone
            if answer.status == 200:
                acknowledged.append(answer.json()["id"])
            i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(acknowledged) >= 40, timeout=120, what="40 acknowledged inspections")
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    stop.set()
    for thread in threads:
        thread.join(60)
    acked = set(acknowledged)
    with sqlite3.connect(os.path.join(data, DATABASE)) as db:  # as the kill left it, before any recovery
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = logged(data)
    assert acked <= set(rows), f"{len(acked - set(rows))} acknowledged inspections are missing"
    for inspection_id, files in rows.items():
        for relative in files:
            with Image.open(os.path.join(data, relative)) as img:
                img.verify()  # complete PNGs, for every row (acknowledged or not)
    process, url = start_process(args)  # the restart removes what no row names
    try:
        wait_until(lambda: request(url, "GET", "/readyz").status == 200, timeout=120, what="the restart")
        assert post(url, bodies[0]).status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    rows = logged(data)
    assert acked <= set(rows)
    named = {os.path.normpath(os.path.join(data, r)) for files in rows.values() for r in files}
    on_disk = {os.path.normpath(os.path.join(folder, name)) for folder, _, names in os.walk(os.path.join(data,
                                                                                                        "heatmaps"))
               for name in names}
    assert on_disk == named  # no temporary or orphaned file is left
    for relative in named:
        with Image.open(relative) as img:
            assert img.size[0] > 0
    print(f"\nSIGKILL after {len(acked)} acknowledged inspections: all {len(acked)} in the log "
          f"({len(rows) - 1 - len(acked)} more committed but not acknowledged before the kill)")


def test_an_inspection_answer_is_a_png_pair_of_the_image_size(lite_model, tmp_path):
    """The heatmap and overlay the service stores for a Lite model inspection decode and have the
    image's size (240 x 240 is under the preview limit)."""
    model, bodies = lite_model
    process, url = start_process(["--checkpoint", model, "--data", str(tmp_path / "data")])
    try:
        wait_until(lambda: request(url, "GET", "/readyz").status == 200, timeout=120, what="the model")
        answer = post(url, bodies[0]).json()
        for key in ("heatmap_url", "overlay_url"):
            png = request(url, "GET", answer[key])
            assert Image.open(io.BytesIO(png.body)).size == (240, 240)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
