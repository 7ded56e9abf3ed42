"""The durable inspection log of ``gradad serve``: one SQLite database in WAL mode
(``inspections.sqlite``) and the PNG files beside it, in the service's data folder.

A batch of inspections is made durable in this order: each file is written to a temporary name,
flushed to disk and renamed into place (:func:`gradad.io_utils.atomic_write_bytes`), the folders
holding them are flushed, then the rows are committed in one transaction with
``synchronous=FULL``. A row therefore never names a missing file. A crash can leave complete
files without a row (written, not yet committed) and temporary files; :meth:`Store.recover`
removes both when the service starts, so what remains is exactly what was acknowledged.

File names are made here from the inspection's id (32 hex digits made by the service); nothing
from a request is ever used as a path.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from ..io_utils import atomic_write_bytes

__all__ = ["DATABASE", "ID_PATTERN", "Inspection", "Store", "StoreLocked"]

DATABASE = "inspections.sqlite"
LOCK_FILE = ".serve.lock"
FILE_DIRS = ("heatmaps", "images")
ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    sha256 TEXT PRIMARY KEY, name TEXT NOT NULL, first_used REAL NOT NULL, metadata TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS inspections (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, received_at REAL NOT NULL,
    score REAL NOT NULL, anomalous INTEGER NOT NULL, threshold REAL NOT NULL,
    model_sha256 TEXT NOT NULL REFERENCES models(sha256), item_id TEXT, station TEXT,
    source TEXT NOT NULL, source_path TEXT, height INTEGER NOT NULL, width INTEGER NOT NULL,
    heatmap TEXT NOT NULL, overlay TEXT NOT NULL, image TEXT, timings TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS inspections_by_decision ON inspections(anomalous, seq);
CREATE INDEX IF NOT EXISTS inspections_by_station ON inspections(station, seq);
CREATE INDEX IF NOT EXISTS inspections_by_time ON inspections(received_at);
CREATE TABLE IF NOT EXISTS threshold_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, changed_at REAL NOT NULL, model_sha256 TEXT NOT NULL,
    previous REAL NOT NULL, threshold REAL NOT NULL);
CREATE TABLE IF NOT EXISTS watched_files (
    path TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, seen_at REAL NOT NULL,
    inspection_id TEXT, error TEXT, PRIMARY KEY (path, size, mtime_ns));
CREATE TABLE IF NOT EXISTS webhook_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, inspection_id TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL, last_error TEXT);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_COLUMNS = ("id", "received_at", "score", "anomalous", "threshold", "model_sha256", "item_id", "station", "source",
            "source_path", "height", "width", "heatmap", "overlay", "image", "timings")


class StoreLocked(RuntimeError):
    """Another ``gradad serve`` holds the data folder."""


@dataclass
class Inspection:
    """One scored image, ready to be committed: the row's fields and the files' bytes
    (relative path -> PNG or image bytes)."""

    id: str
    received_at: float
    score: float
    anomalous: bool
    threshold: float
    model_sha256: str
    height: int
    width: int
    heatmap: str
    overlay: str
    timings: dict
    files: dict = field(default_factory=dict)
    item_id: Optional[str] = None
    station: Optional[str] = None
    source: str = "http"
    source_path: Optional[str] = None
    image: Optional[str] = None
    watched: Optional[tuple] = None  # (path, size, mtime_ns) of a watched file

    def row(self) -> tuple:
        values = dict(vars(self), anomalous=int(self.anomalous), timings=json.dumps(self.timings))
        return tuple(values[c] for c in _COLUMNS)


def file_paths(inspection_id: str) -> dict:
    """The relative paths of an inspection's files (sharded by the id's first two digits)."""
    shard = inspection_id[:2]
    return {"heatmap": f"heatmaps/{shard}/{inspection_id}.heatmap.png",
            "overlay": f"heatmaps/{shard}/{inspection_id}.overlay.png",
            "image": f"images/{shard}/{inspection_id}"}


def _lock(handle) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows: msvcrt's lock on the first byte
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


class Store:
    """The data folder: the database, its files and a lock that keeps a second service out.

    The scoring thread writes through :meth:`commit`; any thread may read (each has its own
    connection).
    """

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        os.makedirs(self.folder, exist_ok=True)
        self._lock_handle = open(os.path.join(self.folder, LOCK_FILE), "a+")
        if not _lock(self._lock_handle):
            self._lock_handle.close()
            raise StoreLocked(f"data folder {self.folder} is in use by another gradad serve")
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._connections: list = []
        db = self._connection()
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(_SCHEMA)
        self.recovered = self.recover()
        # kept here from the start (this process is the only writer), so the page's polls cost nothing
        rows = db.execute("SELECT anomalous, COUNT(*) FROM inspections GROUP BY anomalous")
        found = {bool(a): n for a, n in rows}
        self._counts = {"normal": found.get(False, 0), "anomalous": found.get(True, 0)}

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(os.path.join(self.folder, DATABASE), timeout=30.0, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=30000")
            db.row_factory = sqlite3.Row
            self._local.db = db
            with self._write_lock:
                self._connections.append(db)
        return db

    @contextlib.contextmanager
    def _transaction(self):
        db = self._connection()
        with self._write_lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def close(self) -> None:
        """Closes every thread's connection (call it once the other threads are done) and the lock."""
        with self._write_lock:
            for db in self._connections:
                db.close()
            self._connections.clear()
        self._local = threading.local()
        self._lock_handle.close()

    # ---- files ------------------------------------------------------------------------------

    def path(self, relative: str) -> str:
        """The absolute path of a file the log names (relative to the data folder)."""
        return os.path.join(self.folder, *relative.split("/"))

    def recover(self) -> dict:
        """Removes temporary files and files of inspections that were never committed; returns
        the counts {'temporary': n, 'uncommitted': n}."""
        db = self._connection()
        removed = {"temporary": 0, "uncommitted": 0}
        for top in FILE_DIRS:
            for folder, _, names in os.walk(os.path.join(self.folder, top)):
                for name in names:
                    path = os.path.join(folder, name)
                    if name.startswith(".") and name.endswith(".tmp"):
                        os.unlink(path)
                        removed["temporary"] += 1
                        continue
                    inspection_id = name.split(".")[0]
                    if not db.execute("SELECT 1 FROM inspections WHERE id = ?", (inspection_id,)).fetchone():
                        os.unlink(path)
                        removed["uncommitted"] += 1
        return removed

    def commit(self, inspections: list, watched_errors: tuple = (), outbox: bool = False) -> None:
        """Makes a batch durable (see the module docstring): files, then rows in one transaction,
        with a webhook post queued per inspection when ``outbox`` says which (a set of ids) and the
        watched files' rows ((path, size, mtime_ns, error) for files that could not be scored)."""
        folders = set()
        for inspection in inspections:
            for relative, data in inspection.files.items():
                path = self.path(relative)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                atomic_write_bytes(path, data)
                folders.add(os.path.dirname(path))
        for folder in folders:  # the renames themselves reach the disk
            with contextlib.suppress(OSError):
                descriptor = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)
        now = time.time()
        with self._transaction() as db:
            db.executemany(f"INSERT INTO inspections ({', '.join(_COLUMNS)}) VALUES "
                           f"({', '.join('?' * len(_COLUMNS))})", [i.row() for i in inspections])
            db.executemany("INSERT OR IGNORE INTO watched_files VALUES (?, ?, ?, ?, ?, NULL)",
                           [(*i.watched, now, i.id) for i in inspections if i.watched])
            db.executemany("INSERT OR IGNORE INTO watched_files VALUES (?, ?, ?, ?, NULL, ?)",
                           [(path, size, mtime, now, error) for path, size, mtime, error in watched_errors])
            if outbox:
                db.executemany("INSERT INTO webhook_outbox (inspection_id, next_attempt_at) VALUES (?, ?)",
                               [(i.id, now) for i in inspections if i.id in outbox])
        for inspection in inspections:
            self._counts["anomalous" if inspection.anomalous else "normal"] += 1

    # ---- inspections ------------------------------------------------------------------------

    def register_model(self, sha256: str, name: str, metadata: dict) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO models VALUES (?, ?, ?, ?)",
                       (sha256, name, time.time(), json.dumps(metadata, sort_keys=True)))

    def get(self, inspection_id: str) -> Optional[dict]:
        """The inspection's row as a dict (with the model's name), or None."""
        if not ID_PATTERN.match(inspection_id):
            return None
        row = self._connection().execute(
            "SELECT i.*, m.name AS model_name FROM inspections i JOIN models m ON m.sha256 = i.model_sha256 "
            "WHERE i.id = ?", (inspection_id,)).fetchone()
        return dict(row) if row else None

    def list(self, *, limit: int = 50, before: Optional[int] = None, anomalous: Optional[bool] = None,
             station: Optional[str] = None, since: Optional[float] = None, until: Optional[float] = None) -> list:
        """Rows newest first (by commit order), at most ``limit``, with seq < ``before`` and the filters."""
        where, args = [], []
        for clause, value in (("i.seq < ?", before), ("i.anomalous = ?", None if anomalous is None else int(anomalous)),
                              ("i.station = ?", station), ("i.received_at >= ?", since),
                              ("i.received_at < ?", until)):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = ("SELECT i.*, m.name AS model_name FROM inspections i JOIN models m ON m.sha256 = i.model_sha256 "
               + (f"WHERE {' AND '.join(where)} " if where else "") + "ORDER BY i.seq DESC LIMIT ?")
        return [dict(r) for r in self._connection().execute(sql, (*args, limit))]

    def counts(self) -> dict:
        """{'normal': n, 'anomalous': n} over the whole log."""
        return dict(self._counts)

    # ---- threshold, settings, watched files ------------------------------------------------

    def record_threshold(self, model_sha256: str, previous: float, threshold: float) -> float:
        """Logs a threshold change; returns its time."""
        now = time.time()
        with self._transaction() as db:
            db.execute("INSERT INTO threshold_changes (changed_at, model_sha256, previous, threshold) "
                       "VALUES (?, ?, ?, ?)", (now, model_sha256, previous, threshold))
        return now

    def last_threshold(self, model_sha256: str) -> Optional[float]:
        row = self._connection().execute("SELECT threshold FROM threshold_changes WHERE model_sha256 = ? "
                                         "ORDER BY seq DESC LIMIT 1", (model_sha256,)).fetchone()
        return None if row is None else float(row[0])

    def threshold_changes(self) -> list:
        return [dict(r) for r in self._connection().execute("SELECT * FROM threshold_changes ORDER BY seq")]

    def setting(self, key: str, default: Optional[str] = None) -> Optional[str]:
        row = self._connection().execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def set_setting(self, key: str, value: str) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, value))

    def is_watched(self, key: tuple) -> bool:
        """Whether the watched file (path, size, mtime_ns) was scored or refused already."""
        return self._connection().execute("SELECT 1 FROM watched_files WHERE path = ? AND size = ? AND "
                                          "mtime_ns = ?", key).fetchone() is not None

    def watched_rows(self) -> list:
        return [dict(r) for r in self._connection().execute("SELECT * FROM watched_files ORDER BY seen_at")]

    # ---- webhook outbox ---------------------------------------------------------------------

    def due_posts(self, now: float, limit: int = 16) -> list:
        return [dict(r) for r in self._connection().execute(
            "SELECT * FROM webhook_outbox WHERE next_attempt_at <= ? ORDER BY seq LIMIT ?", (now, limit))]

    def next_post_at(self) -> Optional[float]:
        row = self._connection().execute("SELECT MIN(next_attempt_at) FROM webhook_outbox").fetchone()
        return row[0]

    def pending_posts(self) -> int:
        return self._connection().execute("SELECT COUNT(*) FROM webhook_outbox").fetchone()[0]

    def post_done(self, seq: int) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM webhook_outbox WHERE seq = ?", (seq,))

    def post_failed(self, seq: int, attempts: int, next_attempt_at: float, error: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE webhook_outbox SET attempts = ?, next_attempt_at = ?, last_error = ? WHERE seq = ?",
                       (attempts, next_attempt_at, error[:500], seq))
