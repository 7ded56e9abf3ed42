"""The scoring pipeline of ``gradad serve``: a bounded queue of decoded images, a thread that
scores them in micro-batches, and a thread that draws the previews and commits each batch to
the log before any of its requests is answered.

    submit() -> queue (at most queue_size) -> scoring thread: up to max_batch images, waiting at
    most max_wait_ms for the batch to fill, one model run per image size -> writing thread:
    heatmap and overlay PNGs, Store.commit -> each job's future gets its record

The two threads overlap: one batch is written while the next is scored. The hand-over between
them holds at most two batches, so memory stays bounded by the queue.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ..io_utils import hash_file
from .images import preview_pngs
from .store import Inspection, file_paths

__all__ = ["Inspector", "Job", "QueueFull", "model_sha256", "new_id"]

_STOP = object()


class QueueFull(RuntimeError):
    """The queue holds queue_size images already; the caller should retry later."""


def new_id() -> str:
    """32 hex digits: milliseconds since the epoch (12 digits, so ids sort by time) and 80 random bits."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


def model_sha256(path: str) -> str:
    """SHA-256 of the model file (and of its .bin beside an OpenVINO .xml)."""
    digest = hashlib.sha256()
    files = [path] + ([os.path.splitext(path)[0] + ".bin"] if path.lower().endswith(".xml") else [])
    for name in files:
        hash_file(name, digest)
    return digest.hexdigest()


@dataclass
class Job:
    """One image to inspect: the decoded RGB (H, W, 3) uint8, its labels and where it came from.
    ``future`` receives the committed row (a dict) or the exception that stopped it."""

    rgb: np.ndarray
    received_at: float
    item_id: Optional[str] = None
    station: Optional[str] = None
    source: str = "http"
    source_path: Optional[str] = None
    watched: Optional[tuple] = None
    kept: Optional[tuple] = None  # (suffix, bytes) of the image as received, with --keep-images
    timings: dict = field(default_factory=dict)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued: float = 0.0


class Inspector:
    """Scores jobs in micro-batches and commits them (see the module docstring).

    Args:
        scorer: a :class:`gradad.deploy.Scorer`.
        store: the :class:`gradad.serve.store.Store` of the log.
        config: the :class:`gradad.serve.config.ServeConfig`.
        sha256: the model file's hash, stored with every inspection.
        threshold: the decision threshold to start with.
        metrics: the service's :class:`gradad.serve.metrics.Metrics` (or None).
        on_commit: called with each committed batch's rows (the webhook's wake-up).
    """

    def __init__(self, scorer, store, config, sha256: str, threshold: float, metrics=None,
                 on_commit: Optional[Callable[[list], None]] = None):
        self.scorer, self.store, self.config, self.sha256 = scorer, store, config, sha256
        self.metrics, self.on_commit = metrics, on_commit
        self._threshold = float(threshold)
        self._threshold_lock = threading.Lock()
        self.queue: queue.Queue = queue.Queue(maxsize=config.queue_size)
        self._scored: queue.Queue = queue.Queue(maxsize=2)
        self._threads = [threading.Thread(target=self._score_loop, name="gradad-score", daemon=True),
                         threading.Thread(target=self._write_loop, name="gradad-write", daemon=True)]
        for thread in self._threads:
            thread.start()

    # ---- threshold --------------------------------------------------------------------------

    @property
    def threshold(self) -> float:
        with self._threshold_lock:
            return self._threshold

    def set_threshold(self, value: float) -> tuple:
        """Records and applies a new threshold; returns (previous, time of the change). Images
        judged after this call use it; each inspection stores the threshold it was judged by."""
        with self._threshold_lock:
            previous = self._threshold
            changed_at = self.store.record_threshold(self.sha256, previous, float(value))
            self._threshold = float(value)
        return previous, changed_at

    # ---- submitting -------------------------------------------------------------------------

    def submit(self, job: Job, timeout: Optional[float] = 0.0) -> concurrent.futures.Future:
        """Queues a job; raises :class:`QueueFull` when the queue stays full for ``timeout``
        seconds (0: not at all; None: waits as long as it takes)."""
        job.enqueued = time.perf_counter()
        try:
            if timeout == 0:
                self.queue.put_nowait(job)
            else:
                self.queue.put(job, timeout=timeout)
        except queue.Full:
            raise QueueFull(f"{self.config.queue_size} images are waiting to be scored") from None
        return job.future

    def close(self) -> None:
        """Scores and commits what is queued, then stops both threads."""
        self.queue.put(_STOP)
        for thread in self._threads:
            thread.join()

    # ---- the threads ------------------------------------------------------------------------

    def _next_batch(self) -> tuple:
        """(jobs, stop): blocks for the first job, then gathers up to max_batch within max_wait_ms."""
        first = self.queue.get()
        if first is _STOP:
            return [], True
        batch, deadline = [first], time.perf_counter() + self.config.max_wait_ms / 1000.0
        while len(batch) < self.config.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                job = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                return batch, True
            batch.append(job)
        return batch, False

    def _score_loop(self) -> None:
        stop = False
        while not stop:
            batch, stop = self._next_batch()
            # a job whose waiter was cancelled (its request went away while queued) is dropped;
            # the others can no longer be cancelled, so their results always land
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if batch:
                self._scored.put(self._score(batch))
        self._scored.put(_STOP)

    def _score(self, batch: list) -> list:
        """[(job, anomaly map, score, threshold)] for the jobs that scored; failures go to their futures."""
        start = time.perf_counter()
        groups: dict = {}
        for job in batch:  # a graph that takes any size takes one size per run
            key = job.rgb.shape if self.scorer.any_input_size else None
            groups.setdefault(key, []).append(job)
        scored = []
        for jobs in groups.values():
            began = time.perf_counter()
            try:
                maps, scores = self.scorer.run(np.stack([self.scorer.prepare(job.rgb) for job in jobs]))
            except Exception as error:  # the runtime's own errors: these jobs fail, the service goes on
                for job in jobs:
                    job.future.set_exception(RuntimeError(f"scoring failed: {type(error).__name__}: {error}"))
                continue
            took = (time.perf_counter() - began) * 1000
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(jobs))
            threshold = self.threshold
            for job, amap, score in zip(jobs, maps, scores):
                job.timings.update(queue=(start - job.enqueued) * 1000, score=took, batch=len(jobs))
                scored.append((job, amap, float(score), threshold))
        return scored

    def _write_loop(self) -> None:
        while True:
            scored = self._scored.get()
            if scored is _STOP:
                return
            if scored:
                self._write(scored)

    def _write(self, scored: list) -> None:
        began = time.perf_counter()
        inspections, jobs = [], []
        for job, amap, score, threshold in scored:
            try:
                inspections.append(self._inspection(job, amap, score, threshold))
                jobs.append(job)
            except Exception as error:  # one image's preview failing loses none of the others
                job.future.set_exception(RuntimeError(f"drawing the heatmap failed: {error}"))
        hook = self.config.webhook is not None
        posted = {i.id for i in inspections if hook and (self.config.webhook_on == "all" or i.anomalous)}
        drawn = time.perf_counter()
        for inspection in inspections:
            inspection.timings["draw"] = (drawn - began) * 1000
        try:
            self.store.commit(inspections, outbox=posted)
        except Exception as error:
            for job in jobs:
                job.future.set_exception(RuntimeError(f"the inspection log could not be written: {error}"))
            return
        done, committed = time.time(), (time.perf_counter() - drawn) * 1000
        for job, inspection in zip(jobs, inspections):
            inspection.timings.update(commit=committed, total=(done - job.received_at) * 1000)
            if self.metrics is not None:
                self.metrics.decisions.inc(decision="anomalous" if inspection.anomalous else "normal",
                                           source=job.source)
            job.future.set_result(inspection)
        if self.on_commit is not None and posted:
            self.on_commit(inspections)

    def _inspection(self, job: Job, amap: np.ndarray, score: float, threshold: float) -> Inspection:
        inspection_id = new_id()
        paths = file_paths(inspection_id)
        heatmap, overlay = preview_pngs(job.rgb, amap, threshold, self.config.preview_side)
        files = {paths["heatmap"]: heatmap, paths["overlay"]: overlay}
        image = None
        if job.kept is not None:
            image = paths["image"] + job.kept[0]
            files[image] = job.kept[1]
        height, width = job.rgb.shape[:2]
        return Inspection(id=inspection_id, received_at=job.received_at, score=score, anomalous=score > threshold,
                          threshold=threshold, model_sha256=self.sha256, height=height, width=width,
                          heatmap=paths["heatmap"], overlay=paths["overlay"], image=image, timings=dict(job.timings),
                          files=files, item_id=job.item_id, station=job.station, source=job.source,
                          source_path=job.source_path, watched=job.watched)
