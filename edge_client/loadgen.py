"""Load generator: virtual edge clients (asyncio) replaying pre-encoded streams against one or more servers.

Why replay: encoding is the edge's cost, not the server's; replaying serialized requests lets one process drive
many clients. Each request gets a fresh request id appended to its pre-serialized bytes (protobuf fields may come
in any order), so the server's idempotency cache never short-cuts the work. Arrivals are Poisson at the client's
rate, bounded by ``duration``; a client that is told to back off (``retry-after-ms`` with RESOURCE_EXHAUSTED or
PERMISSION_DENIED) skips its frames until then, as an honest edge would. Every request sent is answered or counted
as an error by status code: ``sent == ok + errors``.

TCP bytes: each tag's clients dial through their own counting relay per server, so a tag's wire bytes are the
relays' counts. Imports no torch.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import grpc
import numpy as np

from proto import splitinfer_pb2 as pb

from .client import PLAINTEXT, Security, channel_for

INFER = "/splitinfer.v1.SplitInference/Infer"
BACKOFF_CODES = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED}


@dataclass
class LoadConfig:
    servers: list[str]
    clients: int = 4
    mix: dict[str, float] = field(default_factory=lambda: {"clean": 1.0})
    rate: float = 20.0  # requests per second, all clients together
    duration: float = 10.0
    timeout: float = 5.0
    max_in_flight: int = 64  # per client; beyond it a frame is skipped (the edge cannot keep up)
    seed: int = 0
    security: Security = PLAINTEXT
    measure_tcp: bool = True
    honor_backoff: bool = True
    client_prefix: str = "load"
    client_tags: list[str] | None = None  # explicit tag per client (overrides mix)
    warmup: float = 0.0  # seconds at the start whose requests count everywhere but in the latency percentiles


def parse_mix(text: str) -> dict[str, float]:
    """``clean=0.5,attack:entropy_pgd:8=0.5`` -> shares summing to 1."""
    out: dict[str, float] = {}
    for part in [p for p in text.split(",") if p.strip()]:
        tag, sep, share = part.rpartition("=")
        if not sep or not tag:
            raise ValueError(f"--mix {text!r}: expected TAG=SHARE[,TAG=SHARE...]")
        try:
            value = float(share)
        except ValueError:
            raise ValueError(f"--mix {text!r}: share {share!r} is not a number") from None
        if value < 0:
            raise ValueError(f"--mix {text!r}: share of {tag} is negative")
        out[tag.strip()] = out.get(tag.strip(), 0.0) + value
    total = sum(out.values())
    if total <= 0:
        raise ValueError(f"--mix {text!r}: shares sum to zero")
    return {k: v / total for k, v in out.items() if v > 0}


def assign_tags(mix: dict[str, float], clients: int) -> list[str]:
    """Largest-remainder split of ``clients`` over the tags; every tag with a share gets at least one client."""
    if clients < len(mix):
        raise ValueError(f"{clients} clients cannot carry {len(mix)} tags")
    raw = {t: s * clients for t, s in mix.items()}
    counts = {t: max(1, int(v)) for t, v in raw.items()}
    while sum(counts.values()) < clients:
        t = max(raw, key=lambda k: raw[k] - counts[k])
        counts[t] += 1
    while sum(counts.values()) > clients:
        t = max((k for k in counts if counts[k] > 1), key=lambda k: counts[k] - raw[k])
        counts[t] -= 1
    return [t for t, n in counts.items() for _ in range(n)]


def with_ids(base: bytes, request_id: str, client_id: str) -> bytes:
    """Append fields 1 (request_id) and 10 (client_id) to a serialized InferRequest (short strings only)."""
    out = bytearray(base)
    for key, text in ((0x0A, request_id), (0x52, client_id)):
        data = text.encode()
        if len(data) > 127:
            raise ValueError("ids longer than 127 bytes")
        out += bytes([key, len(data)]) + data
    return bytes(out)


@dataclass
class Sample:
    tag: str
    client: int
    sent_at: float
    latency_ms: float
    status: str
    message_bytes: int


class LoadRun:
    def __init__(self, cfg: LoadConfig, streams: dict[str, list[bytes]]) -> None:
        self.cfg = cfg
        self.streams = streams
        self.tags = cfg.client_tags or assign_tags(cfg.mix, cfg.clients)
        missing = set(self.tags) - set(streams)
        if missing:
            raise ValueError(f"no streams for tag(s) {sorted(missing)}")
        self.samples: list[Sample] = []
        self.skipped: Counter = Counter()
        self.relays: dict[str, list] = {}

    def _targets(self) -> dict[str, str]:
        """tag -> target string (through per-tag counting relays when measuring TCP)."""
        if not self.cfg.measure_tcp:
            return {t: ",".join(self.cfg.servers) for t in set(self.tags)}
        from monitor.relay import CountingRelay

        out = {}
        for tag in sorted(set(self.tags)):
            relays = []
            for server in self.cfg.servers:
                host, _, port = server.rpartition(":")
                relays.append(CountingRelay((host.strip("[]"), int(port))).start())
            self.relays[tag] = relays
            out[tag] = ",".join(f"127.0.0.1:{r.port}" for r in relays)
        return out

    async def _client(self, index: int, tag: str, target: str, start: float, stop_at: float,
                      channels: list[grpc.aio.Channel]) -> None:
        cfg = self.cfg
        rng = random.Random(cfg.seed * 1_000_003 + index)
        rate = cfg.rate / len(self.tags)
        streams = self.streams[tag]
        opts = [("grpc.max_send_message_length", 1 << 22)]
        creds = cfg.security.credentials()
        if "," in target:
            target = "ipv4:" + target
            opts.append(("grpc.lb_policy_name", "round_robin"))
        if creds is None:
            channel = grpc.aio.insecure_channel(target, options=opts)
        else:
            if cfg.security.server_name:
                opts.append(("grpc.ssl_target_name_override", cfg.security.server_name))
            channel = grpc.aio.secure_channel(target, creds, options=opts)
        channels.append(channel)  # closed once every client is done, so closing never delays others' replies
        call = channel.unary_unary(INFER, request_serializer=None, response_deserializer=pb.InferReply.FromString)
        metadata = cfg.security.metadata()
        client_id = f"{cfg.client_prefix}-{index}"
        loop = asyncio.get_running_loop()
        backoff_until = 0.0
        in_flight: set[asyncio.Task] = set()

        async def send(raw: bytes) -> None:
            nonlocal backoff_until
            t0 = loop.time()
            try:
                await call(raw, timeout=cfg.timeout, metadata=metadata)
                status = "OK"
            except grpc.aio.AioRpcError as exc:
                status = exc.code().name
                if cfg.honor_backoff and exc.code() in BACKOFF_CODES:
                    advice = dict(exc.trailing_metadata() or ()).get("retry-after-ms")
                    if advice and str(advice).isdigit():
                        backoff_until = max(backoff_until, loop.time() + int(advice) / 1000)
            self.samples.append(Sample(tag, index, t0 - start, (loop.time() - t0) * 1000, status, len(raw)))

        t = start + rng.expovariate(rate)
        k = rng.randrange(len(streams))
        while t < stop_at:
            await asyncio.sleep(max(0.0, t - loop.time()))
            if loop.time() < backoff_until:
                self.skipped[(tag, "backoff")] += 1
            elif len(in_flight) >= cfg.max_in_flight:
                self.skipped[(tag, "backlog")] += 1
            else:
                raw = with_ids(streams[k % len(streams)], uuid.uuid4().hex, client_id)
                task = asyncio.create_task(send(raw))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                k += 1
            t += rng.expovariate(rate)
        if in_flight:
            await asyncio.wait(in_flight, timeout=cfg.timeout + 5)

    async def run_async(self) -> dict:
        targets = self._targets()
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.2
        stop_at = start + self.cfg.duration
        t_wall = time.time()
        channels: list[grpc.aio.Channel] = []
        try:
            await asyncio.gather(*(self._client(i, tag, targets[tag], start, stop_at, channels)
                                   for i, tag in enumerate(self.tags)))
        finally:
            await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
            for relays in self.relays.values():
                for r in relays:
                    r.stop()
        return self.report(t_wall)

    def run(self) -> dict:
        return asyncio.run(self.run_async())

    def report(self, started: float) -> dict:
        d = self.cfg.duration
        by_tag: dict[str, list[Sample]] = defaultdict(list)
        for s in self.samples:
            by_tag[s.tag].append(s)

        def figures(samples: list[Sample], tags: list[str]) -> dict:
            answered = [s for s in samples if s.status == "OK"]
            ok = [s.latency_ms for s in answered if s.sent_at >= self.cfg.warmup]  # percentiles after warm-up
            errors = Counter(s.status for s in samples if s.status != "OK")
            tcp = sum(r.totals()["bytes_up"] for t in tags for r in self.relays.get(t, []))
            lat = np.asarray(ok) if ok else None
            return {
                "clients": sum(1 for t in self.tags if t in tags), "sent": len(samples), "ok": len(answered),
                "errors": dict(sorted(errors.items())), "error_count": sum(errors.values()),
                "skipped_backoff": sum(self.skipped[(t, "backoff")] for t in tags),
                "skipped_backlog": sum(self.skipped[(t, "backlog")] for t in tags),
                "requests_per_s": len(samples) / d, "ok_per_s": len(answered) / d,
                "latency_ms": None if lat is None else {
                    "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                    "p99": float(np.percentile(lat, 99)), "mean": float(lat.mean()), "max": float(lat.max())},
                "message_bytes_per_s": sum(s.message_bytes for s in samples) / d,
                "message_bytes_mean": float(np.mean([s.message_bytes for s in samples])) if samples else None,
                "tcp_bytes_per_s": tcp / d if self.cfg.measure_tcp else None,
            }

        tags = sorted(set(self.tags))
        return {"config": {"servers": self.cfg.servers, "clients": len(self.tags), "rate": self.cfg.rate,
                           "duration_s": d, "timeout_s": self.cfg.timeout, "mix": dict(Counter(self.tags)),
                           "latency_excludes_first_s": self.cfg.warmup,
                           "started": started},
                "tags": {t: figures(by_tag[t], [t]) for t in tags},
                "overall": figures(self.samples, tags),
                "timeline": [(s.tag, round(s.sent_at, 4), round(s.latency_ms, 3), s.status) for s in self.samples]}


def check_servers(servers: list[str], info: dict, security: Security = PLAINTEXT, timeout: float = 10.0) -> None:
    """Every server must serve the model the streams were coded for (fingerprint check before any load)."""
    from proto import splitinfer_pb2_grpc as pb_grpc

    for server in servers:
        channel = channel_for(server, security)
        try:
            got = pb_grpc.SplitInferenceStub(channel).GetModelInfo(pb.ModelInfoRequest(), timeout=timeout,
                                                                   wait_for_ready=True, metadata=security.metadata())
        finally:
            channel.close()
        if got.fingerprint != info["fingerprint"] or got.model_id != info["model_id"]:
            raise RuntimeError(f"server {server} serves {got.model_id} ({got.fingerprint[:16]}...), the streams were "
                               f"coded for {info['model_id']} ({info['fingerprint'][:16]}...)")
