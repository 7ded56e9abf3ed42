"""Helpers of the gradad serve tests: the service in a thread of the test process or in a
process of its own, and a small HTTP client (the standard library's http.client, so what is
tested is the bytes on the wire)."""
from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid

from PIL import Image

from gradad.serve.config import ServeConfig
from gradad.serve.server import build_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def request(url, method, path, body=None, headers=None, timeout=60.0) -> Response:
    """One request on a fresh connection."""
    host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Response(response.status, dict(response.getheaders()), response.read())
    finally:
        conn.close()


def multipart(fields: dict, filename="part.png", file_type="image/png") -> tuple:
    """(body, Content-Type) of a multipart/form-data body; bytes values are files."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        if isinstance(value, bytes):
            head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                    f"Content-Type: {file_type}\r\n\r\n")
            parts.append(head.encode() + value + b"\r\n")
        else:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def png_bytes(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def wait_until(check, timeout=30.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextlib.contextmanager
def service_thread(**settings):
    """A running service (uvicorn in a thread of this process) on a free loopback port; yields
    (url, Service)."""
    config = ServeConfig(**{"port": 0, **settings})
    server, service, sock = build_server(config)
    service.start()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = "http://127.0.0.1:%d" % sock.getsockname()[1]
    try:
        wait_until(lambda: server.started, what="uvicorn to start")
        wait_until(service.ready.is_set, what="the model to load")
        yield url, service
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        service.close()
        sock.close()


def start_process(args, env=None) -> tuple:
    """`python -m gradad serve ARGS --port 0` in its own process; returns (process, url) once it
    listens (it announces its address on stdout)."""
    if env is None:  # this checkout's gradad, installed or not
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python"),
                                                           os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen([sys.executable, "-m", "gradad", "serve", *map(str, args), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"gradad serve exited: {''.join(lines)} {process.stderr.read()}")
        lines.append(line)
        found = re.search(r"listening on (http://\S+)", line)
        if found:  # from now on its output is read in the background, so it never blocks on a full pipe
            process.output = lines
            for stream in (process.stdout, process.stderr):
                threading.Thread(target=lambda s=stream: lines.extend(iter(s.readline, "")), daemon=True).start()
            return process, found.group(1)
    process.kill()
    raise AssertionError("gradad serve did not announce its address")
