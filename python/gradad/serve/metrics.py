"""The service's counters, gauges and histograms, rendered in the Prometheus text exposition
format (version 0.0.4) for ``GET /metrics``. Standard library only; thread-safe."""
from __future__ import annotations

import math
import threading
from typing import Callable, Optional

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: tuple) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Family:
    def __init__(self, name: str, kind: str, help_text: str):
        self.name, self.kind, self.help = name, kind, help_text
        self.lock = threading.Lock()

    def header(self) -> list:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Family):
    def __init__(self, name: str, help_text: str):
        super().__init__(name, "counter", help_text)
        self.values: dict = {}

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> list:
        with self.lock:
            return self.header() + [f"{self.name}{_labels(k)} {_number(v)}" for k, v in sorted(self.values.items())]


class Gauge(_Family):
    """A value set by the service, or read from ``source`` when rendered."""

    def __init__(self, name: str, help_text: str, source: Optional[Callable[[], float]] = None):
        super().__init__(name, "gauge", help_text)
        self.value, self.source = 0.0, source

    def set(self, value: float) -> None:
        self.value = float(value)

    def render(self) -> list:
        value = self.source() if self.source is not None else self.value
        return self.header() + [f"{self.name} {_number(value)}"]


class Histogram(_Family):
    def __init__(self, name: str, help_text: str, buckets: tuple):
        super().__init__(name, "histogram", help_text)
        self.buckets = tuple(buckets) + (math.inf,)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        with self.lock:
            self.sum += value
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self.counts[i] += 1
                    break

    def render(self) -> list:
        with self.lock:
            lines, total = self.header(), 0
            for bound, count in zip(self.buckets, self.counts):
                total += count
                lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {total}')
            return lines + [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {total}"]


class Metrics:
    """The instruments of one service (names prefixed ``gradad_``)."""

    def __init__(self, queue_depth: Callable[[], float], queue_capacity: int, threshold: Callable[[], float],
                 ready: Callable[[], float], webhook_pending: Callable[[], float]):
        self.requests = Counter("gradad_http_requests_total", "HTTP requests by route and status code.")
        self.latency = Histogram("gradad_inspect_latency_seconds",
                                 "Time from receiving an inspection request to its committed answer.", LATENCY_BUCKETS)
        self.batch_size = Histogram("gradad_batch_size", "Images scored per model run.", BATCH_BUCKETS)
        self.decisions = Counter("gradad_inspections_total", "Committed inspections by decision and source.")
        self.rejected = Counter("gradad_rejected_total", "Images refused before scoring, by reason.")
        self.webhook = Counter("gradad_webhook_posts_total", "Webhook posts by result.")
        capacity = Gauge("gradad_queue_capacity", "Images that may wait to be scored.")
        capacity.set(queue_capacity)
        self._families = [
            self.requests, self.latency, self.batch_size, self.decisions, self.rejected, self.webhook,
            Gauge("gradad_queue_depth", "Images waiting to be scored.", queue_depth), capacity,
            Gauge("gradad_threshold", "The decision threshold in use.", threshold),
            Gauge("gradad_ready", "1 once the model is loaded and the log is open.", ready),
            Gauge("gradad_webhook_pending", "Webhook posts not yet delivered.", webhook_pending),
        ]

    def render(self) -> str:
        """The exposition text of every instrument."""
        lines = []
        for family in self._families:
            lines += family.render()
        return "\n".join(lines) + "\n"
