"""``gradad serve``: the service under uvicorn. The command line imports this module only for
that command, so the rest of gradad runs without the ``[serve]`` extra (starlette, uvicorn,
python-multipart).

Starlette and not FastAPI: the API is a dozen routes whose inputs are image bytes and a few
query parameters, so request models and a generated schema would add pydantic for little; the
OpenAPI document is written out in :mod:`gradad.serve.openapi` instead. Uvicorn: the reference
ASGI server, pure Python with its h11 protocol, so the line PC needs no compiler.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading

import uvicorn

from .app import create_app
from .service import Service

__all__ = ["build_server", "serve"]


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: a free one); OSError says why it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on the accepted connections only then,
    # and without it each answer's body waits for the client's delayed ACK (~40 ms on Linux)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.listen(2048)
    return sock


def build_server(config) -> tuple:
    """(uvicorn.Server, Service, listening socket) for a :class:`ServeConfig`; nothing runs yet."""
    service = Service(config)
    try:
        sock = listen(config.host, config.port)
    except OSError:
        service.store.close()
        raise
    server = uvicorn.Server(uvicorn.Config(create_app(service), limit_concurrency=config.max_connections,
                                           log_level="warning", access_log=False, lifespan="off",
                                           timeout_graceful_shutdown=30))
    return server, service, sock


def serve(config, announce=print) -> int:
    """Runs the service until SIGINT or SIGTERM; returns the exit status (1 if the model fails to load).

    The model loads while the server already answers /healthz; ``announce`` gets one line with
    the address once the socket listens, and one when the model is ready."""
    if not logging.getLogger().handlers:  # the folder source's and the webhook's warnings go to stderr
        logging.basicConfig(level=logging.INFO, format="gradad serve: %(levelname)s: %(message)s")
    server, service, sock = build_server(config)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    failed = []

    def on_failure(message: str) -> None:
        failed.append(message)
        print(f"gradad serve: error: the model cannot be loaded: {message}", file=sys.stderr, flush=True)
        server.should_exit = True

    announce(f"gradad serve: listening on {url} (data {os.path.abspath(config.data)}"
             f"{', token required' if config.token else ''})")
    if service.store.recovered["uncommitted"] or service.store.recovered["temporary"]:
        announce(f"gradad serve: removed files of inspections that were never committed: {service.store.recovered}")
    loader = service.start(on_failure)

    def ready_announcement():
        loader.join()
        if service.ready.is_set():
            announce(f"gradad serve: ready: {service.model_name} (sha256 {service.sha256[:12]}), threshold "
                     f"{service.threshold:.6g} ({service.threshold_source})")

    threading.Thread(target=ready_announcement, daemon=True).start()

    def stop(signum, frame):
        server.should_exit = True

    # uvicorn turns SIGINT and SIGTERM into a graceful shutdown (open requests are answered) and
    # then raises the signal again for the handler it found; this one lets the service close
    # (what is queued is scored and committed) and the command return 0
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, stop) for s in handled} if threading.current_thread() is \
        threading.main_thread() else {}
    try:
        server.run(sockets=[sock])
    finally:
        loader.join()
        service.close()
        sock.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 1 if failed else 0
