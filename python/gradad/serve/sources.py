"""Where inspections come from besides HTTP, and where their results go: the watched folder
(:class:`FolderSource`) and the webhook (:class:`WebhookSender`). Both are threads that never hold
up the scoring: the folder source waits for room in the queue like any client, and the webhook
posts from the log's outbox table, which the inspection's own transaction fills."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Optional

from ..image_files import IMAGE_EXTENSIONS
from .images import ImageRejected, decode_image
from .inspector import Job, QueueFull

__all__ = ["FolderSource", "WebhookSender"]

PAUSED_SETTING = "watch_paused"
LOG = logging.getLogger("gradad.serve")
# names that are still being written by the usual tools, or hidden
_PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", "~")


class FolderSource:
    """Scores every image file that appears under ``folder`` (recursively; hidden files and
    folders and names ending in .tmp, .part, ... are left alone).

    A file is scored once its size and modification time are the same in two listings one
    interval apart. Each scored file's (relative path, size, modification time) is committed
    with its inspection, and each file that cannot be read is committed with its error, so
    after a restart no file is scored twice and none is skipped. A file replaced by one of
    another size or time is a new image and is scored again.
    """

    def __init__(self, folder: str, inspector, store, config, metrics=None):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"watch: folder {folder} not found")
        self.folder, self.inspector, self.store, self.config, self.metrics = (
            os.path.abspath(folder), inspector, store, config, metrics)
        # the present files already scored or refused (pruned to the listing, so it stays as
        # small as the folder), and the files seen once and waiting to settle
        self._known: set = set()
        self._pending: dict = {}
        self._stop = threading.Event()
        self._resumed = threading.Event()
        if store.setting(PAUSED_SETTING, "0") != "1":
            self._resumed.set()
        self._thread = threading.Thread(target=self._run, name="gradad-watch", daemon=True)
        self._thread.start()

    @property
    def paused(self) -> bool:
        return not self._resumed.is_set()

    def pause(self) -> None:
        """Stops picking up files (kept across a restart) until :meth:`resume`."""
        self.store.set_setting(PAUSED_SETTING, "1")
        self._resumed.clear()

    def resume(self) -> None:
        self.store.set_setting(PAUSED_SETTING, "0")
        self._resumed.set()

    def close(self) -> None:
        self._stop.set()
        self._resumed.set()
        self._thread.join()

    def _files(self) -> list:
        found = []
        for root, dirs, names in os.walk(self.folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                lower = name.lower()
                if name.startswith(".") or lower.endswith(_PARTIAL_SUFFIXES) or not lower.endswith(IMAGE_EXTENSIONS):
                    continue
                found.append(os.path.join(root, name))
        return found

    def _run(self) -> None:
        while not self._stop.is_set():
            self._resumed.wait()
            if self._stop.is_set():
                return
            try:
                self._scan()
            except OSError as error:  # the folder vanished or is unreadable for a moment: keep trying
                LOG.warning("watch: cannot list %s: %s", self.folder, error)
            self._stop.wait(self.config.watch_interval_s)

    def _scan(self) -> None:
        present = set()
        for path in self._files():
            if self._stop.is_set() or self.paused:
                return
            relative = os.path.relpath(path, self.folder).replace(os.sep, "/")
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                continue
            key = (relative, stat.st_size, stat.st_mtime_ns)
            present.add(key)
            if key in self._known:
                continue
            if self.store.is_watched(key):
                self._known.add(key)
                continue
            if self._pending.get(relative) != key:  # new or still changing: look again next time
                self._pending[relative] = key
                continue
            self._score(path, key)
        self._known &= present
        self._pending = {k: v for k, v in self._pending.items() if v in present}

    def _score(self, path: str, key: tuple) -> None:
        received = time.time()
        try:
            if key[1] > self.config.max_bytes:
                raise ImageRejected(413, f"the file has {key[1]} bytes, more than --max-bytes {self.config.max_bytes}")
            with open(path, "rb") as handle:
                data = handle.read()
            stat = os.stat(path)
            if (stat.st_size, stat.st_mtime_ns) != key[1:]:  # changed while read: not finished after all
                self._pending.pop(key[0], None)
                return
            began = time.perf_counter()
            rgb, suffix = decode_image(data, self.config.max_pixels)
        except (ImageRejected, OSError) as error:
            LOG.warning("watch: %s is not scored: %s", key[0], error)
            self.store.commit([], watched_errors=[(*key, str(error))])
            self._known.add(key)
            if self.metrics is not None:
                self.metrics.rejected.inc(reason="watch")
            return
        job = Job(rgb=rgb, received_at=received, source="watch", source_path=key[0], watched=key,
                  kept=(suffix, data) if self.config.keep_images else None,
                  timings={"decode": (time.perf_counter() - began) * 1000})
        while not self._stop.is_set():
            try:
                self.inspector.submit(job, timeout=0.5)
                break
            except QueueFull:
                continue
        else:
            return
        self._known.add(key)
        self._pending.pop(key[0], None)
        job.future.add_done_callback(lambda future: self._failed(key, future))

    def _failed(self, key: tuple, future) -> None:
        error = future.exception()
        if error is not None:  # recorded, so a file the model cannot score is not retried forever
            self.store.commit([], watched_errors=[(*key, str(error))])


class WebhookSender:
    """Posts the results queued in the log's outbox, oldest first, as JSON to ``url``.

    A post that fails (no answer within the timeout, or a status other than 2xx) is tried
    again after ``backoff_s``, doubling with each failure in a row up to ``backoff_max_s``.
    Posts stay in the log until delivered, so they survive a restart. Delivery is at least once:
    a post delivered just before a crash may be sent again.
    """

    def __init__(self, url: str, store, record: Callable[[str], Optional[dict]], config, metrics=None):
        self.url, self.store, self.record, self.config, self.metrics = url, store, record, config, metrics
        self.failures = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradad-webhook", daemon=True)
        self._thread.start()

    def wake(self, *_) -> None:
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()

    def _post(self, payload: dict) -> None:
        request = urllib.request.Request(self.url, data=json.dumps(payload).encode("utf-8"), method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": "gradad-serve"})
        with urllib.request.urlopen(request, timeout=self.config.webhook_timeout_s) as response:
            if not 200 <= response.status < 300:
                raise urllib.error.HTTPError(self.url, response.status, response.reason, response.headers, None)

    def _run(self) -> None:
        while not self._stop.is_set():
            due = self.store.due_posts(time.time())
            for row in due:
                if self._stop.is_set():
                    return
                payload = {"event": "inspection", "inspection": self.record(row["inspection_id"])}
                try:
                    self._post(payload)
                except (OSError, ValueError) as error:  # URLError and HTTPError are OSErrors
                    self.failures += 1
                    delay = min(self.config.webhook_backoff_s * 2 ** (self.failures - 1),
                                self.config.webhook_backoff_max_s)
                    self.store.post_failed(row["seq"], row["attempts"] + 1, time.time() + delay,
                                           f"{type(error).__name__}: {error}")
                    LOG.warning("webhook: posting inspection %s failed (%s: %s); next try in %.3g s",
                                row["inspection_id"], type(error).__name__, error, delay)
                    if self.metrics is not None:
                        self.metrics.webhook.inc(result="failed")
                    self._stop.wait(delay)  # back off: the next due post waits too
                    break
                self.failures = 0
                self.store.post_done(row["seq"])
                if self.metrics is not None:
                    self.metrics.webhook.inc(result="delivered")
            else:
                next_at = self.store.next_post_at()
                wait = 1.0 if next_at is None else max(0.0, min(1.0, next_at - time.time()))
                self._wake.wait(wait)
                self._wake.clear()
