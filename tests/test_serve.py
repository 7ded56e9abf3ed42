"""gradad serve, its HTTP API on a tiny exported model (tests/test_runtime_onnx.py's, fixed
32 x 48 input, dynamic batch): scores against the model run in torch, the log (read with
sqlite3 directly), micro-batches, the bounded queue, bad input, the threshold, the token,
/metrics and /openapi.json. The folder source and the webhook: tests/test_serve_sources.py;
load and SIGKILL: tests/test_serve_load.py; the page: tests/test_serve_page.py."""
import concurrent.futures
import io
import json
import os
import re
import sqlite3
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from gradad.serve.app import create_app
from gradad.serve.config import ServeConfig
from gradad.serve.openapi import openapi_schema
from gradad.serve.service import Service
from gradad.serve.store import DATABASE, StoreLocked
from tests.serving import multipart, png_bytes, request, service_thread, wait_until
from tests.test_runtime_onnx import export_tiny, torch_reference

SIZES = [(40, 52), (61, 83), (32, 48), (100, 70)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(torch module, model.onnx, threshold): the threshold is the median score of IMAGES, so
    both decisions occur."""
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)  # the conv's bias is drawn from the global generator: the same model twice
    module, _ = export_tiny(str(folder), name="probe")
    scores = torch_reference(module, images())[1]
    threshold = float(np.median(scores))
    torch.manual_seed(0)
    module, path = export_tiny(str(folder), threshold=threshold)
    assert np.array_equal(torch_reference(module, images())[1], scores)
    return module, path, threshold


def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES * 2]


def rows(data):
    with sqlite3.connect(os.path.join(data, DATABASE)) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM inspections ORDER BY seq")]


def test_inspections_match_the_model_and_are_in_the_log(model, tmp_path):
    module, path, threshold = model
    rgbs = images()
    _, ref_scores = torch_reference(module, rgbs)
    data = str(tmp_path / "data")
    with service_thread(checkpoint=path, data=data, keep_images=True) as (url, service):
        answers = []
        for i, rgb in enumerate(rgbs):
            body = png_bytes(rgb)
            if i % 2:
                form, kind = multipart({"image": body, "item_id": f"part-{i}", "station": "cam1"})
                r = request(url, "POST", "/v1/inspect", form, {"Content-Type": kind})
            else:
                r = request(url, "POST", f"/v1/inspect?item_id=part-{i}&station=cam2", body,
                            {"Content-Type": "image/png"})
            assert r.status == 200, r.body
            answers.append((r.json(), body))
        for (got, body), score, rgb in zip(answers, ref_scores, rgbs):
            np.testing.assert_allclose(got["score"], score, rtol=1e-4, atol=1e-6)
            assert got["anomalous"] == (got["score"] > threshold) and got["threshold"] == pytest.approx(threshold)
            assert got["image_size"] == list(rgb.shape[:2]) and got["model"]["name"] == "model.onnx"
            assert set(got["timings_ms"]) >= {"decode", "queue", "score", "draw", "commit", "total"}
            assert request(url, "GET", f"/v1/inspections/{got['id']}").json() == \
                {**got, "timings_ms": {k: v for k, v in got["timings_ms"].items() if k not in ("commit", "total")}}
            heatmap = request(url, "GET", got["heatmap_url"])
            overlay = request(url, "GET", got["overlay_url"])
            for png in (heatmap, overlay):
                assert png.status == 200 and png.headers["content-type"] == "image/png"
                assert Image.open(io.BytesIO(png.body)).size == (rgb.shape[1], rgb.shape[0])
            assert request(url, "GET", got["image_url"]).body == body
        assert {a["anomalous"] for a, _ in answers} == {True, False}
    log = rows(data)
    assert [r["id"] for r in log] == [a["id"] for a, _ in answers]
    for row, (got, _) in zip(log, answers):
        assert row["score"] == got["score"] and bool(row["anomalous"]) == got["anomalous"]
        assert row["item_id"] == got["item_id"] and row["station"] in ("cam1", "cam2")
        for name in ("heatmap", "overlay", "image"):
            assert os.path.isfile(os.path.join(data, row[name]))


def test_requests_together_are_scored_in_micro_batches(model, tmp_path):
    _, path, _ = model
    bodies = [png_bytes(rgb) for rgb in images()]
    with service_thread(checkpoint=path, data=str(tmp_path / "d"), max_batch=4, max_wait_ms=300) as (url, service):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda b: request(url, "POST", "/v1/inspect", b, {"Content-Type": "image/png"}),
                                    bodies))
        assert all(a.status == 200 for a in answers)
        batches = [a.json()["timings_ms"]["batch"] for a in answers]
        assert max(batches) > 1 and max(batches) <= 4
        text = request(url, "GET", "/metrics").body.decode()
        count = float(re.search(r"^gradad_batch_size_count (\S+)$", text, re.M).group(1))
        assert count < len(bodies)  # fewer runs than images


def test_a_full_queue_answers_503_and_logs_nothing_for_it(model, tmp_path):
    _, path, _ = model
    body = png_bytes(images()[0])
    data = str(tmp_path / "d")
    with service_thread(checkpoint=path, data=data, queue_size=1, max_batch=1, max_wait_ms=0) as (url, service):
        scorer = service.inspector.scorer
        run, gate = scorer.run, __import__("threading").Event()
        scorer.run = lambda batch: (gate.wait(30), run(batch))[1]  # the model is stuck until the gate opens
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(request, url, "POST", "/v1/inspect", body, {"Content-Type": "image/png"})
                       for _ in range(6)]
            busy = wait_until(lambda: [f.result() for f in futures if f.done()], what="503 answers")
            gate.set()
            answers = [f.result() for f in futures]
        statuses = sorted(a.status for a in answers)
        assert busy and all(a.status == 503 for a in busy)
        assert set(statuses) == {200, 503}
        for a in answers:
            if a.status == 503:
                assert a.headers["retry-after"] == "1" and "busy" in a.json()["error"]
        accepted = {a.json()["id"] for a in answers if a.status == 200}
    assert {r["id"] for r in rows(data)} == accepted


def _png_header_only(width, height):
    """A PNG whose header claims width x height pixels, with a few bytes of (bogus) data."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_bad_input_gets_a_clear_error_and_is_not_logged(model, tmp_path):
    _, path, _ = model
    good = png_bytes(images()[0])
    data = str(tmp_path / "d")
    with service_thread(checkpoint=path, data=data, max_bytes=200_000, max_pixels=1_000_000) as (url, service):
        png = {"Content-Type": "image/png"}
        cases = [
            ("empty body", b"", png, 422, "empty"),
            ("not an image", b"hello, this is text", png, 422, "not an image"),
            ("truncated", good[:len(good) // 2], png, 422, "truncated"),
            ("text content type", good, {"Content-Type": "text/plain"}, 415, "Content-Type text/plain"),
            ("json content type", good, {"Content-Type": "application/json"}, 415, "not accepted"),
            ("no content type", good, {}, 415, "(none)"),
            ("too many pixels", _png_header_only(5000, 5000), png, 413, "--max-pixels"),
            ("bad label", good, {"Content-Type": "image/png"}, 422, "item_id"),
        ]
        for name, body, headers, status, words in cases:
            where = "/v1/inspect?item_id=a%20b" if name == "bad label" else "/v1/inspect"
            r = request(url, "POST", where, body, headers)
            assert r.status == status and words in r.json()["error"], (name, r.status, r.body)
        form, kind = multipart({"image": b"plain text"}, filename="a.txt", file_type="text/plain")
        r = request(url, "POST", "/v1/inspect", form, {"Content-Type": kind})
        assert r.status == 415 and "image/*" in r.json()["error"]
        form, kind = multipart({"picture": good})
        r = request(url, "POST", "/v1/inspect", form, {"Content-Type": kind})
        assert r.status == 422 and "'image'" in r.json()["error"]
        for missing in ("/v1/inspections/" + "0" * 32, "/v1/inspections/../../etc/passwd",
                        "/v1/inspections/" + "0" * 32 + "/heatmap.png", "/nothing"):
            r = request(url, "GET", missing)
            assert r.status == 404 and r.json()["status"] == 404, missing
        assert request(url, "POST", "/v1/inspect", good, png).status == 200  # still serving
    assert len(rows(data)) == 1


def _read_answer(sock) -> str:
    """One HTTP response from a raw socket: the head and a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < \
            int(re.search(rb"content-length: (\d+)", data.split(b"\r\n\r\n")[0], re.I).group(1)):
        more = sock.recv(65536)
        if not more:
            break
        data += more
    return data.decode("latin-1")


def test_a_body_over_max_bytes_is_refused_before_it_is_read(model, tmp_path):
    """Content-Length says 50 MB and only 1 KB is sent: the answer comes anyway (so the body was
    not read), and a chunked body without a length is cut off once it passes the limit."""
    import socket

    _, path, _ = model
    with service_thread(checkpoint=path, data=str(tmp_path / "d"), max_bytes=100_000) as (url, service):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"POST /v1/inspect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 50000000\r\n\r\n" + b"\0" * 1024)
            answer = _read_answer(sock)
        assert answer.startswith("HTTP/1.1 413") and "--max-bytes" in answer
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"POST /v1/inspect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            answer = b""
            for _ in range(40):  # 40 chunks of 8 KB: over the limit after 13
                try:
                    sock.sendall(b"2000\r\n" + b"\0" * 0x2000 + b"\r\n")
                except OSError:
                    break
            answer = _read_answer(sock)
        assert answer.startswith("HTTP/1.1 413"), answer[:200]
        assert "gradad_rejected_total{reason=\"413\"} 2" in request(url, "GET", "/metrics").body.decode()


def test_threshold_changes_are_recorded_used_and_restored(model, tmp_path):
    _, path, threshold = model
    body = png_bytes(images()[0])
    data = str(tmp_path / "d")
    with service_thread(checkpoint=path, data=data) as (url, service):
        first = request(url, "POST", "/v1/inspect", body, {"Content-Type": "image/png"}).json()
        new = first["score"] + 1.0  # the same image is normal under the new threshold
        for bad in (b"{}", b'{"threshold": "high"}', b'{"threshold": true}', b"nope"):
            assert request(url, "PUT", "/v1/threshold", bad, {"Content-Type": "application/json"}).status == 422
        r = request(url, "PUT", "/v1/threshold", json.dumps({"threshold": new}).encode(),
                    {"Content-Type": "application/json"})
        assert r.status == 200 and r.json()["previous"] == pytest.approx(threshold)
        second = request(url, "POST", "/v1/inspect", body, {"Content-Type": "image/png"}).json()
        assert second["threshold"] == new and not second["anomalous"] and first["anomalous"] == (first["score"] >
                                                                                                  threshold)
        changes = request(url, "GET", "/v1/threshold").json()["changes"]
        assert [(c["previous"], c["threshold"]) for c in changes] == [(pytest.approx(threshold), new)]
    assert [r["threshold"] for r in rows(data)] == [pytest.approx(threshold), new]
    with service_thread(checkpoint=path, data=data) as (url, service):
        status = request(url, "GET", "/v1/status").json()
        assert status["threshold"] == new and "restored" in status["threshold_source"]
    with service_thread(checkpoint=path, data=data, threshold=0.5) as (url, service):
        assert request(url, "GET", "/v1/status").json()["threshold"] == 0.5


def test_the_token_guards_everything_but_healthz_and_the_page_shell(model, tmp_path):
    _, path, _ = model
    token = "s3cret-token-value"
    with service_thread(checkpoint=path, data=str(tmp_path / "d"), token=token) as (url, service):
        assert request(url, "GET", "/healthz").status == 200
        page = request(url, "GET", "/")
        assert page.status == 200 and b"/v1/inspect" in page.body
        for where in ("/readyz", "/metrics", "/openapi.json", "/v1/status", "/v1/inspections", "/v1/threshold"):
            for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": token}):
                r = request(url, "GET", where, headers=headers)
                assert r.status == 401 and r.headers["www-authenticate"] == "Bearer", where
            assert request(url, "GET", where, headers={"Authorization": f"Bearer {token}"}).status == 200, where
        r = request(url, "POST", "/v1/inspect", png_bytes(images()[0]), {"Content-Type": "image/png"})
        assert r.status == 401


def test_metrics_are_prometheus_text(model, tmp_path):
    _, path, _ = model
    with service_thread(checkpoint=path, data=str(tmp_path / "d")) as (url, service):
        for _ in range(3):
            request(url, "POST", "/v1/inspect", png_bytes(images()[0]), {"Content-Type": "image/png"})
        request(url, "POST", "/v1/inspect", b"x", {"Content-Type": "text/plain"})
        r = request(url, "GET", "/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.body.decode()
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"]*",?)*\})? [-+0-9.eEInf]+$')
    for line in text.splitlines():
        assert line.startswith(("# HELP ", "# TYPE ")) or sample.match(line), line
    assert 'gradad_http_requests_total{route="/v1/inspect",status="200"} 3' in text
    assert 'gradad_http_requests_total{route="/v1/inspect",status="415"} 1' in text
    assert "gradad_inspect_latency_seconds_count 3" in text
    buckets = [float(v) for v in re.findall(r'^gradad_inspect_latency_seconds_bucket\{le="[^"]+"\} (\S+)$', text, re.M)]
    assert buckets == sorted(buckets) and buckets[-1] == 3
    decisions = sum(float(v) for v in re.findall(r"^gradad_inspections_total\{[^}]*\} (\S+)$", text, re.M))
    assert decisions == 3
    for name in ("gradad_queue_depth", "gradad_queue_capacity", "gradad_threshold", "gradad_ready"):
        assert re.search(rf"^{name} \S+$", text, re.M), name


def test_openapi_names_every_route(model, tmp_path):
    _, path, _ = model
    service = Service(ServeConfig(checkpoint=path, data=str(tmp_path / "d")))
    try:
        app = create_app(service)
        served = {(r.path, m) for r in app.routes for m in r.methods - {"HEAD"}}
    finally:
        service.close()
    schema = openapi_schema()
    documented = {(p, m.upper()) for p, ops in schema["paths"].items() for m in ops}
    assert served == documented
    assert schema["openapi"].startswith("3.1") and "Inspection" in schema["components"]["schemas"]


def test_list_pages_newest_first_with_filters(model, tmp_path):
    _, path, threshold = model
    with service_thread(checkpoint=path, data=str(tmp_path / "d")) as (url, service):
        made = []
        for i, rgb in enumerate(images()):
            station = "a" if i % 3 else "b"
            made.append(request(url, "POST", f"/v1/inspect?station={station}", png_bytes(rgb),
                                {"Content-Type": "image/png"}).json())
        seen, cursor = [], None
        while True:
            page = request(url, "GET", "/v1/inspections?limit=3" + (f"&before={cursor}" if cursor else "")).json()
            seen += [item["id"] for item in page["items"]]
            cursor = page["next"]
            if cursor is None:
                break
        assert seen == [m["id"] for m in reversed(made)]
        for flag in ("true", "false"):
            got = request(url, "GET", f"/v1/inspections?anomalous={flag}").json()["items"]
            assert [g["id"] for g in got] == [m["id"] for m in reversed(made) if m["anomalous"] == (flag == "true")]
        got = request(url, "GET", "/v1/inspections?station=b").json()["items"]
        assert [g["id"] for g in got] == [m["id"] for m in reversed(made) if m["station"] == "b"]
        middle = made[4]["received_at"]
        newer = request(url, "GET", f"/v1/inspections?since={middle}").json()["items"]
        older = request(url, "GET", f"/v1/inspections?until={middle}").json()["items"]
        assert len(newer) + len(older) == len(made) and made[4]["id"] in {n["id"] for n in newer}
        for bad in ("limit=0", "limit=x", "anomalous=maybe", "since=yesterday"):
            assert request(url, "GET", f"/v1/inspections?{bad}").status == 422, bad
        status = request(url, "GET", "/v1/status").json()
        assert status["counts"] == {"normal": sum(not m["anomalous"] for m in made),
                                    "anomalous": sum(m["anomalous"] for m in made)}


def test_a_second_service_on_the_same_data_is_refused(model, tmp_path):
    _, path, _ = model
    data = str(tmp_path / "d")
    with service_thread(checkpoint=path, data=data):
        with pytest.raises(StoreLocked, match="in use by another gradad serve"):
            Service(ServeConfig(checkpoint=path, data=data))


def test_uncommitted_and_temporary_files_are_removed_at_start(model, tmp_path):
    _, path, _ = model
    data = tmp_path / "d"
    with service_thread(checkpoint=path, data=str(data)) as (url, service):
        kept = request(url, "POST", "/v1/inspect", png_bytes(images()[0]), {"Content-Type": "image/png"}).json()
    shard = data / "heatmaps" / "ff"
    shard.mkdir(parents=True)
    (shard / ("f" * 32 + ".heatmap.png")).write_bytes(b"a file whose row was never committed")
    (shard / ".x.heatmap.png.abc.tmp").write_bytes(b"half")
    with service_thread(checkpoint=path, data=str(data)) as (url, service):
        assert service.store.recovered == {"temporary": 1, "uncommitted": 1}
        assert request(url, "GET", kept["heatmap_url"]).status == 200
    assert sorted(os.listdir(shard)) == []


@pytest.mark.parametrize("settings, words", [
    ({"port": 70000}, "port"), ({"max_batch": 0}, "max_batch"), ({"token": "short"}, "token"),
    ({"webhook": "ftp://x"}, "webhook"), ({"checkpoint": "model.pt"}, "checkpoint"), ({"max_wait_ms": -1}, "max_wait"),
])
def test_bad_settings_are_named(settings, words):
    with pytest.raises(ValueError, match=words):
        ServeConfig(**{"checkpoint": "m.onnx", "data": "d", **settings})


def test_the_command_line_names_what_is_wrong(model, tmp_path, capsys, monkeypatch):
    from gradad.cli import build_light_parser, main
    from gradad.serve.config import TOKEN_ENV, config_from_args

    _, path, _ = model
    monkeypatch.setenv(TOKEN_ENV, "token-from-the-environment")
    args = build_light_parser().parse_args(["serve", "--checkpoint", path, "--data", str(tmp_path)])
    config = config_from_args(args)
    assert config.token == "token-from-the-environment" and config.host == "127.0.0.1" and config.port == 8000
    given = build_light_parser().parse_args(["serve", "--checkpoint", path, "--data", str(tmp_path), "--token",
                                             "token-on-the-line"])
    assert config_from_args(given).token == "token-on-the-line"
    assert config.streams == 1
    streamed = build_light_parser().parse_args(["serve", "--checkpoint", path, "--data", str(tmp_path), "--threads",
                                                "2", "--streams", "2"])
    assert (config_from_args(streamed).threads, config_from_args(streamed).streams) == (2, 2)
    for argv, words in ([["--max-batch", "0"], "max_batch must be a positive int"],
                        [["--streams", "0"], "streams must be a positive int"],
                        [["--threads", "1", "--streams", "2"], "streams (2) must not exceed threads (1)"],
                        [["--checkpoint", str(tmp_path / "none.onnx")], "none.onnx not found"],
                        [["--watch", str(tmp_path / "nowhere")], "nowhere not found"]):
        base = ["serve", "--checkpoint", path, "--data", str(tmp_path / "d")]
        assert main(base + argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("gradad serve: error:") and words in err, err


def test_without_the_serve_extra_the_command_says_how_to_install_it(model, tmp_path):
    import subprocess
    import sys

    _, path, _ = model
    stub = tmp_path / "stub" / "starlette"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('No module named starlette (test stub)')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "stub"), root, os.path.join(root, "python")]))
    done = subprocess.run([sys.executable, "-m", "gradad", "serve", "--checkpoint", path, "--data",
                           str(tmp_path / "d")], env=env, capture_output=True, text=True)
    assert done.returncode == 1 and "gradad-runtime[serve]" in done.stderr and "Traceback" not in done.stderr


def test_the_serve_benchmark_runs_and_writes_its_tables(model, tmp_path):
    """benchmarks/bench_serve.py on the tiny model, a few images: both modes, every field (no
    assertion on the timings)."""
    import subprocess
    import sys

    _, path, _ = model
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_serve.py"), "--model", path,
                           "--images", "6", "--size", "40", "--clients", "1", "3", "--settings", "default",
                           "--warmup", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (folder,) = tmp_path.iterdir()
    results = json.loads((folder / "serve.json").read_text())
    serve = [r for r in results["rows"] if r["mode"] == "serve"]
    assert [r["clients"] for r in serve] == [1, 3] and all(r["images"] == 6 for r in results["rows"])
    for row in serve:
        latency = row["latency_ms"]
        assert row["images_per_s"] > 0 and latency["p50"] <= latency["p99"] <= latency["max"]
    assert {r["mode"] for r in results["rows"]} == {"predict", "serve"}
    assert (folder / "serve.md").read_text().count("| serve |") == 2


def test_a_request_cancelled_while_queued_is_dropped_and_the_service_goes_on(model, tmp_path):
    """A job whose future is cancelled before it is scored is neither scored nor logged, and the
    pipeline keeps answering the others (a cancelled future must not stop the writing thread)."""
    import threading

    from gradad.serve.inspector import Job

    _, path, _ = model
    data = str(tmp_path / "d")
    with service_thread(checkpoint=path, data=data, max_batch=1, max_wait_ms=0) as (url, service):
        scorer = service.inspector.scorer
        run, gate = scorer.run, threading.Event()
        scorer.run = lambda batch: (gate.wait(30), run(batch))[1]
        blocker = service.inspector.submit(Job(rgb=images()[0], received_at=0.0))
        wait_until(lambda: service.inspector.queue.qsize() == 0, what="the first job to be taken")
        dropped = service.inspector.submit(Job(rgb=images()[1], received_at=0.0))
        assert dropped.cancel()
        gate.set()
        assert blocker.result(30).id
        r = request(url, "POST", "/v1/inspect", png_bytes(images()[2]), {"Content-Type": "image/png"})
        assert r.status == 200
    assert [row["id"] for row in rows(data)] == [blocker.result().id, r.json()["id"]]
