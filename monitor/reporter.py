"""Posting records to the monitor from the server and the relay, off their hot paths.

Standard library only (the relay and torch-free hosts use it too). Records go into a bounded queue; a background
thread posts them in batches to ``POST /api/ingest``. A batch that fails to post is kept and retried with backoff,
and each record carries a unique ``record_id`` so a retried batch is stored once. When the queue is full (monitor
down for long) new records are dropped and counted, never blocking the data path: the monitor observes, it never
sits in the data path.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
import uuid

log = logging.getLogger("splitinfer.monitor.reporter")


def new_record_id() -> str:
    return uuid.uuid4().hex


class MonitorReporter:
    def __init__(self, url: str, token: str | None = None, batch: int = 500, interval: float = 0.25,
                 capacity: int = 100_000, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/") + "/api/ingest"
        self.token = token
        self.batch = batch
        self.interval = interval
        self.timeout = timeout
        self.queue: queue.Queue[tuple[str, dict]] = queue.Queue(capacity)
        self.dropped = 0
        self.posted = 0
        self.failures = 0
        self._pending: list[tuple[str, dict]] = []
        self._idle = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor-reporter", daemon=True)
        self._thread.start()

    def report(self, kind: str, record: dict) -> None:
        """Queue a record of ``kind`` (requests, connections or calibrations); never blocks."""
        try:
            self.queue.put_nowait((kind, record))
            self._idle.clear()
        except queue.Full:
            self.dropped += 1

    def _post(self, items: list[tuple[str, dict]]) -> None:
        body: dict[str, list[dict]] = {}
        for kind, rec in items:
            body.setdefault(kind, []).append(rec)
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            resp.read()

    def _run(self) -> None:
        backoff = self.interval
        while True:
            while len(self._pending) < self.batch:
                try:
                    self._pending.append(self.queue.get(timeout=self.interval if not self._pending else 0.01))
                except queue.Empty:
                    break
            if self._pending:
                try:
                    self._post(self._pending)
                    self.posted += len(self._pending)
                    self._pending = []
                    backoff = self.interval
                except urllib.error.HTTPError as exc:
                    if 400 <= exc.code < 500:  # the monitor refuses this batch: retrying cannot help
                        log.error("monitor refused %d records: HTTP %d %s", len(self._pending), exc.code,
                                  exc.read()[:200])
                        self.dropped += len(self._pending)
                        self._pending = []
                    else:
                        self.failures += 1
                        time.sleep(backoff)
                        backoff = min(backoff * 2, 5.0)
                except (OSError, urllib.error.URLError):
                    self.failures += 1
                    if self._stop.is_set():
                        return
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
            if not self._pending and self.queue.empty():
                self._idle.set()
                if self._stop.is_set():
                    return

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued record has been posted; False if that did not happen within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.queue.empty() and not self._pending and self._idle.wait(0.05):
                if self.queue.empty() and not self._pending:
                    return True
            time.sleep(0.01)
        return False

    def close(self, timeout: float = 10.0) -> bool:
        ok = self.flush(timeout)
        self._stop.set()
        self._thread.join(timeout=1.0)
        return ok
