"""One running inspection service without its HTTP face: the log, the model (loaded in the
background, so /healthz answers while a large model compiles), the scoring pipeline, the
folder source and the webhook, and the JSON form of an inspection that the API, the page and
the webhook share."""
from __future__ import annotations

import json
import os
import threading
import time
import traceback
from datetime import datetime, timezone
from typing import Optional

from ..deploy.metadata import metadata_path, read_metadata
from ..deploy.scorer import Scorer
from .inspector import Inspector, model_sha256
from .metrics import Metrics
from .sources import FolderSource, WebhookSender
from .store import Store

__all__ = ["Service", "format_time", "inspection_json"]


def format_time(seconds: float) -> str:
    """Unix seconds -> ISO 8601 UTC with milliseconds ('2026-12-07T14:24:35.123Z')."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def inspection_json(row: dict) -> dict:
    """The API's form of an inspection row (a :meth:`Store.get` dict)."""
    base = f"/v1/inspections/{row['id']}"
    timings = row["timings"] if isinstance(row["timings"], dict) else json.loads(row["timings"])
    return {
        "id": row["id"], "score": row["score"], "anomalous": bool(row["anomalous"]), "threshold": row["threshold"],
        "heatmap_url": f"{base}/heatmap.png", "overlay_url": f"{base}/overlay.png",
        "image_url": f"{base}/image" if row.get("image") else None,
        "model": {"name": row["model_name"], "sha256": row["model_sha256"]},
        "received_at": format_time(row["received_at"]), "item_id": row.get("item_id"), "station": row.get("station"),
        "source": row["source"], "source_path": row.get("source_path"),
        "image_size": [row["height"], row["width"]],
        "timings_ms": {k: round(v, 3) if isinstance(v, float) else v for k, v in timings.items()},
    }


class Service:
    """The service's parts for one :class:`gradad.serve.config.ServeConfig`.

    The constructor opens the log (raising :class:`gradad.serve.store.StoreLocked` when another
    service holds the folder) and checks the model's files and metadata, so that a wrong
    command fails before anything listens; :meth:`start` loads the model in a thread.
    """

    def __init__(self, config):
        self.config = config
        if not os.path.isfile(config.checkpoint):
            raise FileNotFoundError(f"checkpoint: model file {config.checkpoint} not found")
        self.metadata = read_metadata(metadata_path(config.checkpoint))
        if config.watch is not None and not os.path.isdir(config.watch):
            raise FileNotFoundError(f"watch: folder {config.watch} not found")
        self.store = Store(config.data)
        self.model_name = os.path.basename(config.checkpoint)
        self.sha256 = model_sha256(config.checkpoint)
        self.store.register_model(self.sha256, self.model_name, self.metadata)
        restored = self.store.last_threshold(self.sha256)
        if config.threshold is not None:
            self.threshold_source = "--threshold"
        elif restored is not None:
            self.threshold_source = "set at run time (PUT /v1/threshold), restored from the log"
        else:
            self.threshold_source = self.metadata.get("threshold_source") or "model.json"
        self.start_threshold = config.threshold if config.threshold is not None else \
            restored if restored is not None else float(self.metadata["threshold"])
        self.inspector: Optional[Inspector] = None
        self.folder: Optional[FolderSource] = None
        self.webhook: Optional[WebhookSender] = None
        self.error: Optional[str] = None
        self.ready = threading.Event()
        self.started_at = time.time()
        self.metrics = Metrics(queue_depth=lambda: self.inspector.queue.qsize() if self.inspector else 0,
                               queue_capacity=config.queue_size, threshold=lambda: self.threshold,
                               ready=lambda: float(self.ready.is_set()),
                               webhook_pending=lambda: self.store.pending_posts() if config.webhook else 0)

    @property
    def threshold(self) -> float:
        return self.inspector.threshold if self.inspector is not None else self.start_threshold

    def start(self, on_failure=None) -> threading.Thread:
        """Loads the model and starts the pipeline and sources in a thread; ``on_failure(message)``
        is called if that fails (the service then cannot score and should stop)."""
        def load():
            try:
                scorer = Scorer(self.config.checkpoint, backend=self.config.backend, threads=self.config.threads,
                                streams=self.config.streams)
                if self.config.webhook is not None:
                    self.webhook = WebhookSender(self.config.webhook, self.store, self.record, self.config,
                                                 self.metrics)
                self.inspector = Inspector(scorer, self.store, self.config, self.sha256, self.start_threshold,
                                           self.metrics, on_commit=self.webhook.wake if self.webhook else None)
                if self.config.watch is not None:
                    self.folder = FolderSource(self.config.watch, self.inspector, self.store, self.config,
                                               self.metrics)
                self.ready.set()
            except Exception as error:
                self.error = f"{type(error).__name__}: {error}"
                if on_failure is not None:
                    on_failure(self.error + "\n" + traceback.format_exc())

        thread = threading.Thread(target=load, name="gradad-load", daemon=True)
        thread.start()
        return thread

    def record(self, inspection_id: str) -> Optional[dict]:
        """The API's JSON of an inspection in the log, or None."""
        row = self.store.get(inspection_id)
        return None if row is None else inspection_json(row)

    def status(self) -> dict:
        """What the page's header shows: model, threshold, counts, queue, folder source."""
        return {"ready": self.ready.is_set(), "error": self.error,
                "model": {"name": self.model_name, "sha256": self.sha256,
                          "class_names": self.metadata.get("class_names", []),
                          "precision": self.metadata.get("precision", "fp32")},
                "threshold": self.threshold, "threshold_source": self.threshold_source,
                "counts": self.store.counts(),
                "queue": {"depth": self.inspector.queue.qsize() if self.inspector else 0,
                          "capacity": self.config.queue_size},
                "watch": None if self.config.watch is None else
                {"folder": os.path.abspath(self.config.watch), "paused": bool(self.folder and self.folder.paused)},
                "webhook": None if self.config.webhook is None else {"pending": self.store.pending_posts()},
                "started_at": format_time(self.started_at)}

    def close(self) -> None:
        """Stops the folder source, scores and commits what was queued, stops the webhook, closes the log."""
        if self.folder is not None:
            self.folder.close()
        if self.inspector is not None:
            self.inspector.close()
        if self.webhook is not None:
            self.webhook.close()
        self.store.close()
