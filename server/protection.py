"""Server protections against inflated (attacked) streams: per-client byte budgets, a rate-anomaly check against
the served model's clean distribution, and fair scheduling of the decode stage across clients.

Why here: an entropy attack makes each request bigger, so one client's attacked streams eat the link and the
decode workers that other clients share. The server cannot un-send bytes, but it can tell an honest edge to back
off (budget exhausted → RESOURCE_EXHAUSTED with ``retry-after-ms``), refuse or deprioritise streams far above what
the model produces on clean images, and make sure a client with a long queue does not starve the others.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

ANOMALY_POLICIES = ("off", "flag", "deprioritize", "reject")


class TokenBucket:
    """``rate`` bytes per second refill up to ``burst``; a request takes its size or is refused with a wait."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.stamp = now

    def take(self, n: int, now: float) -> float:
        """0.0 when ``n`` bytes were taken; otherwise the seconds after which they would be available."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if n <= self.tokens:
            self.tokens -= n
            return 0.0
        return (min(n, self.burst) - self.tokens) / self.rate


class Budgets:
    """One token bucket per client id (least recently seen clients forgotten beyond ``max_clients``)."""

    def __init__(self, rate: float, burst: float, max_clients: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("budget rate and burst must be positive")
        self.rate, self.burst = rate, burst
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()
        self.refused = 0

    def charge(self, client: str, n: int) -> float:
        """Charge ``n`` received bytes to ``client``: 0.0 if within budget, else the advised wait in seconds."""
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get(client)
            if bucket is None:
                bucket = self._buckets[client] = TokenBucket(self.rate, self.burst, now)
                while len(self._buckets) > self.max_clients:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(client)
            wait = bucket.take(n, now)
            self.refused += wait > 0
            return wait


@dataclass
class AnomalyDetector:
    """Two checks against the clean stream sizes of the served model (calibrated with its own codec):

    * one request: its stream is above ``threshold`` (the clean distribution's upper quantile plus a margin);
    * one client: the mean of its last ``window`` streams is above ``clean_mean + z · clean_std / √n``.

    The per-client check is the sharp one: an entropy attack shifts the *mean* size by +30 % or more, far outside
    the clean mean's spread over a window, while single attacked streams overlap the clean tail. A client is
    judged once it has sent ``window // 2`` requests; sizes of refused requests count too (they were received).
    """

    threshold: float
    clean_mean: float
    clean_std: float
    clean_quantile: float
    quantile: float
    margin: float
    policy: str = "flag"
    window: int = 16
    z: float = 4.0
    max_clients: int = 100_000

    def __post_init__(self) -> None:
        self._recent: OrderedDict[str, deque] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def calibrate(cls, sizes: np.ndarray, policy: str, quantile: float = 0.995, margin: float = 0.10,
                  window: int = 16, z: float = 4.0) -> AnomalyDetector:
        if policy not in ANOMALY_POLICIES:
            raise ValueError(f"anomaly policy {policy!r} is not one of {ANOMALY_POLICIES}")
        if len(sizes) < 20:
            raise ValueError("anomaly calibration needs at least 20 clean streams")
        q = float(np.quantile(sizes, quantile))
        return cls(threshold=q * (1 + margin), clean_mean=float(np.mean(sizes)), clean_std=float(np.std(sizes)),
                   clean_quantile=q, quantile=quantile, margin=margin, policy=policy, window=window, z=z)

    def client_limit(self, n: int) -> float:
        return self.clean_mean + self.z * self.clean_std / np.sqrt(n)

    def is_anomalous(self, payload_bytes: int, client: str | None = None) -> str | None:
        """None, or why the stream is anomalous (names the check)."""
        if self.policy == "off":
            return None
        if client is not None:
            with self._lock:
                recent = self._recent.get(client)
                if recent is None:
                    recent = self._recent[client] = deque(maxlen=self.window)
                    while len(self._recent) > self.max_clients:
                        self._recent.popitem(last=False)
                else:
                    self._recent.move_to_end(client)
                recent.append(payload_bytes)
                n, mean = len(recent), float(np.mean(recent))
            if n >= self.window // 2 and mean > self.client_limit(n):
                return (f"the client's last {n} streams average {mean:.0f} B, above the clean mean "
                        f"{self.clean_mean:.0f} B + {self.z:g}σ/√{n} = {self.client_limit(n):.0f} B")
        if payload_bytes > self.threshold:
            return (f"stream of {payload_bytes} bytes is above the anomaly threshold {self.threshold:.0f} B "
                    f"(clean p{100 * self.quantile:g} {self.clean_quantile:.0f} B + {100 * self.margin:.0f}%)")
        return None


class FairExecutor:
    """Worker threads that serve per-client FIFO queues in round-robin order, normal priority before low.

    A client that sends a burst waits behind itself, not in front of everybody else; ``priority=1`` work
    (deprioritised anomalies) runs only when no normal work is waiting.
    """

    def __init__(self, workers: int, max_pending: int = 8192, name: str = "decode") -> None:
        self._lanes: list[OrderedDict[str, deque]] = [OrderedDict(), OrderedDict()]
        self._cond = threading.Condition()
        self._pending = 0
        self.max_pending = max_pending
        self._stop = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, client: str, fn: Callable, *args: object, priority: int = 0) -> Future:
        fut: Future = Future()
        with self._cond:
            if self._stop:
                raise RuntimeError("executor is shut down")
            if self._pending >= self.max_pending:
                raise OverflowError("decode queue is full")
            lane = self._lanes[1 if priority else 0]
            lane.setdefault(client, deque()).append((fut, fn, args))
            self._pending += 1
            self._cond.notify()
        return fut

    def _next(self) -> tuple | None:
        for lane in self._lanes:
            if lane:
                client, q = next(iter(lane.items()))
                item = q.popleft()
                del lane[client]
                if q:
                    lane[client] = q  # to the back of the round
                return item
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stop and self._pending == 0:
                    self._cond.wait()
                if self._stop and self._pending == 0:
                    return
                item = self._next()
                self._pending -= 1
            assert item is not None
            fut, fn, args = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - delivered to the waiting request
                fut.set_exception(exc)

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            for lane in self._lanes:
                for q in lane.values():
                    for fut, _, _ in q:
                        if fut.set_running_or_notify_cancel():
                            fut.set_exception(RuntimeError("server shutting down"))
                lane.clear()
            self._pending = 0
            self._cond.notify_all()
