"""Dynamic batching of the tail: decoded latents wait at most ``max_delay_ms`` for company, up to ``max_batch``."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np


@dataclass
class BatchResult:
    probabilities: np.ndarray  # [num_classes]
    batch_size: int
    queue_ms: float
    tail_ms: float


class Batcher:
    """One thread that runs ``run_batch`` on stacked inputs; ``submit`` returns a Future of a BatchResult."""

    def __init__(self, run_batch: Callable[[np.ndarray], np.ndarray], max_batch: int = 32,
                 max_delay_ms: float = 5.0, max_queue: int = 4096) -> None:
        if max_batch < 1 or max_delay_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_delay_ms >= 0")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1000.0
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tail-batcher", daemon=True)
        self._thread.start()

    def submit(self, x: np.ndarray) -> Future:
        fut: Future = Future()
        try:
            self._queue.put_nowait((x, fut, time.perf_counter()))
        except queue.Full:
            raise OverflowError("tail queue is full") from None
        return fut

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            items = [first]
            deadline = time.perf_counter() + self.max_delay
            while len(items) < self.max_batch:
                remaining = deadline - time.perf_counter()
                try:
                    items.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
                except queue.Empty:
                    break
            items = [it for it in items if it[1].set_running_or_notify_cancel()]
            if not items:
                continue
            start = time.perf_counter()
            try:
                probs = self.run_batch(np.stack([it[0] for it in items]))
            except Exception as exc:  # a failed batch fails its requests, never the server
                for it in items:
                    it[1].set_exception(exc)
                continue
            tail_ms = (time.perf_counter() - start) * 1000
            for i, (_, fut, t_in) in enumerate(items):
                fut.set_result(BatchResult(probs[i], len(items), (start - t_in) * 1000, tail_ms))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        while True:
            try:
                _, fut, _ = self._queue.get_nowait()
            except queue.Empty:
                break
            if fut.set_running_or_notify_cancel():
                fut.set_exception(RuntimeError("server shutting down"))
