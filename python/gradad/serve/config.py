"""Every setting of ``gradad serve`` and its default, in one dataclass (:class:`ServeConfig`),
with the command-line flags built from it. Light (the standard library and gradad.deploy): the
light command line parses ``gradad serve`` without starlette or uvicorn installed."""
from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass, fields
from typing import Optional

from ..deploy.scorer import BACKENDS

__all__ = ["LABEL_PATTERN", "TOKEN_ENV", "WEBHOOK_ON", "ServeConfig", "add_serve_arguments", "config_from_args"]

TOKEN_ENV = "GRADAD_SERVE_TOKEN"  # the token when --token is not given
WEBHOOK_ON = ("all", "anomalous")
# an item_id or station label (also the OpenAPI document's pattern)
LABEL_PATTERN = r"^[\w.:/@+-]{1,128}$"
_LABEL = re.compile(LABEL_PATTERN)


@dataclass
class ServeConfig:
    """The service's settings. Memory is bounded by them: at most ``max_connections`` request
    bodies of up to ``max_bytes`` each are read at once, and at most ``queue_size`` decoded
    images of up to ``max_pixels`` pixels (3 bytes each) wait for the scorer.

    Args:
        checkpoint: the exported model (``model.onnx`` or ``model.xml`` with ``model.json``).
        data: the folder of the inspection log (``inspections.sqlite``) and its image files.
        host, port: where to listen (127.0.0.1: this machine only; port 0 picks a free one).
        token: the bearer token every endpoint but /healthz and the page's shell requires
            (None: no authentication; :data:`TOKEN_ENV` is read when the flag is absent).
        threshold: a decision threshold instead of the model's (a threshold set at run time
            with PUT /v1/threshold is restored on restart unless this is given).
        backend: the runtime ('auto' picks by the model file's suffix).
        threads: the runtime's threads in all (None: its default).
        streams: parts of a batch scored at the same time, each on its share of the threads
            (gradad.deploy.Scorer's ``streams``; 2 suits an int8 model on a 2-core PC).
        max_batch: most images scored in one run of the model.
        max_wait_ms: how long the first image of a batch waits for others to join it. 0: a batch
            is what queued up while the previous one ran, so a lone client never waits and
            concurrent ones are still batched (on the 2-core CPU with the Lite demo: one client
            40.6 images/s at 0 ms, 34.0 at 5 ms; eight clients 49 images/s either way).
        queue_size: images accepted and waiting to be scored; beyond it, 503 with Retry-After.
        max_connections: requests handled at once (uvicorn's limit_concurrency; beyond it, 503).
        max_bytes: largest request body; a larger one is refused (413) before it is read.
        max_pixels: largest image (width x height) decoded; a larger one is refused (413).
        keep_images: also store each inspected image as it was received.
        watch: a folder whose new image files are scored (None: no folder source).
        watch_interval_s: how often the folder is listed; a file is scored once its size and
            modification time stayed the same over one interval.
        webhook: a URL each result is posted to as JSON (None: no webhook).
        webhook_on: post 'all' results or only the 'anomalous' ones.
        webhook_timeout_s: how long one post may take.
        webhook_backoff_s: the first retry's delay; each failure doubles it up to
            ``webhook_backoff_max_s``.
        preview_side: the longest side of the stored heatmap and overlay PNGs (the map is
            computed at the image's size; the PNGs are shrunk to this for the log and the page).
    """

    checkpoint: str
    data: str
    host: str = "127.0.0.1"
    port: int = 8000
    token: Optional[str] = None
    threshold: Optional[float] = None
    backend: str = "auto"
    threads: Optional[int] = None
    streams: int = 1
    max_batch: int = 8
    max_wait_ms: float = 0.0
    queue_size: int = 32
    max_connections: int = 64
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 25_000_000
    keep_images: bool = False
    watch: Optional[str] = None
    watch_interval_s: float = 0.5
    webhook: Optional[str] = None
    webhook_on: str = "all"
    webhook_timeout_s: float = 5.0
    webhook_backoff_s: float = 1.0
    webhook_backoff_max_s: float = 300.0
    preview_side: int = 512

    def __post_init__(self):
        self.validate()

    def validate(self) -> "ServeConfig":
        """Raises ValueError naming the first setting that is out of range."""
        for name in ("checkpoint", "data"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty path, got {getattr(self, name)!r}")
        if not self.checkpoint.lower().endswith((".onnx", ".xml")):
            raise ValueError(f"checkpoint must be an exported model.onnx or model.xml, got {self.checkpoint!r}")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port!r}")
        if self.token is not None and (len(self.token) < 8 or not self.token.isprintable() or " " in self.token):
            raise ValueError("token must be at least 8 printable characters without spaces")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        for name in ("max_batch", "queue_size", "max_connections", "max_bytes", "max_pixels", "preview_side",
                     "streams"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive int, got {self.threads!r}")
        if self.threads is not None and self.streams > self.threads:
            raise ValueError(f"streams ({self.streams}) must not exceed threads ({self.threads})")
        for name in ("max_wait_ms", "watch_interval_s", "webhook_timeout_s", "webhook_backoff_s",
                     "webhook_backoff_max_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or \
                    (value == 0 and name != "max_wait_ms"):
                raise ValueError(f"{name} must be a positive number of seconds (max_wait_ms: >= 0), got {value!r}")
        if self.webhook is not None and not re.match(r"^https?://[^\s]+$", self.webhook):
            raise ValueError(f"webhook must be an http:// or https:// URL, got {self.webhook!r}")
        if self.webhook_on not in WEBHOOK_ON:
            raise ValueError(f"webhook_on must be one of {list(WEBHOOK_ON)}, got {self.webhook_on!r}")
        return self


def valid_label(value: str) -> bool:
    """An item_id or station label: 1-128 letters, digits and ``_ . : / @ + -``."""
    return bool(_LABEL.match(value))


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``gradad serve``, one per :class:`ServeConfig` field (defaults from it)."""
    defaults = {f.name: f.default for f in fields(ServeConfig)}
    add = parser.add_argument
    add("--checkpoint", required=True, help="exported model.onnx or model.xml, model.json beside it")
    add("--data", required=True, help="folder of the inspection log (SQLite) and its heatmaps; created if missing")
    add("--host", default=defaults["host"], help="address to listen on (default %(default)s: this machine only)")
    add("--port", type=int, default=defaults["port"], help="TCP port (default %(default)s; 0 picks a free one)")
    add("--token", default=None, help=f"require `Authorization: Bearer TOKEN` (default: ${TOKEN_ENV} if set)")
    add("--threshold", type=float, help="decision threshold instead of the model's")
    add("--backend", choices=BACKENDS, default=defaults["backend"], help="runtime (auto: by the file's suffix)")
    add("--threads", type=int, help="the runtime's threads in all (default: its own choice)")
    add("--streams", type=int, default=defaults["streams"],
        help="parts of a batch scored at once, each on its share of the threads (%(default)s)")
    add("--max-batch", type=int, default=defaults["max_batch"], help="most images per model run (%(default)s)")
    add("--max-wait-ms", type=float, default=defaults["max_wait_ms"],
        help="how long a batch waits to fill (%(default)s ms)")
    add("--queue-size", type=int, default=defaults["queue_size"],
        help="images waiting to be scored before 503 (%(default)s)")
    add("--max-connections", type=int, default=defaults["max_connections"],
        help="requests handled at once before 503 (%(default)s)")
    add("--max-bytes", type=int, default=defaults["max_bytes"], help="largest request body (%(default)s bytes)")
    add("--max-pixels", type=int, default=defaults["max_pixels"], help="largest image, width x height (%(default)s)")
    add("--keep-images", action="store_true", help="also store each inspected image")
    add("--watch", help="score every image file that appears in this folder")
    add("--watch-interval", type=float, dest="watch_interval_s", default=defaults["watch_interval_s"],
        help="seconds between listings of --watch (%(default)s)")
    add("--webhook", help="post each result as JSON to this URL")
    add("--webhook-on", choices=WEBHOOK_ON, default=defaults["webhook_on"], help="which results to post")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """A :class:`ServeConfig` from parsed :func:`add_serve_arguments` flags (ValueError if one is bad)."""
    names = {f.name for f in fields(ServeConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if "token" not in values and os.environ.get(TOKEN_ENV):
        values["token"] = os.environ[TOKEN_ENV]
    return ServeConfig(**values)
