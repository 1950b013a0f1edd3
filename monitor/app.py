"""The monitor service (FastAPI on uvicorn): ingest records, serve figures, metrics and a dashboard.

Endpoints: ``POST /api/ingest`` (records from servers and relays; bearer token when configured),
``GET /api/summary`` (per tag: images, mean/p95 bytes at each depth, Δ% vs clean, accuracy),
``GET /api/records`` (raw rows, filtered and paged), ``GET /metrics`` (Prometheus text, computed from the
database so counters survive restarts), ``GET /healthz`` and ``GET /`` (dashboard).
"""

from __future__ import annotations

import hmac
import json
import socket
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .report import render_fragment, render_page
from .store import RecordError, Store
from .summary import attribute_tcp, summarize

MAX_INGEST_BYTES = 16 << 20
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SIZE_BUCKETS_B = (64, 128, 256, 384, 512, 768, 1024, 2048, 4096, 16384, 65536)
DASHBOARD_RECORDS = 5000


class StoreCollector:
    """Prometheus collector reading aggregates from SQLite at scrape time."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _histogram(self, name: str, doc: str, column: str, buckets: tuple, scale: float
                   ) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(name, doc, labels=["tag"])
        cols = ", ".join(f"SUM({column} <= {b * scale})" for b in buckets)
        rows = self.store.query(f"SELECT tag, COUNT({column}), SUM({column}), {cols} FROM requests "
                                f"WHERE {column} IS NOT NULL GROUP BY tag")
        for row in rows:
            tag, count, total, *cum = tuple(row)
            fam.add_metric([tag], [(str(b), float(c or 0)) for b, c in zip(buckets, cum, strict=True)]
                           + [("+Inf", float(count))], float(total or 0) / scale)
        return fam

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        reqs = CounterMetricFamily("splitinfer_requests", "Requests answered by the server, by tag and status",
                                   labels=["tag", "status"])
        byts = CounterMetricFamily("splitinfer_bytes", "Bytes edge -> server by tag and depth "
                                   "(payload: coded stream; message: serialized gRPC request; tcp: relay-counted)",
                                   labels=["tag", "depth"])
        per_tag: dict[str, list[float]] = {}
        for row in self.store.query("SELECT tag, status, COUNT(*), SUM(payload_bytes), SUM(message_bytes) "
                                    "FROM requests GROUP BY tag, status"):
            tag, status, n, payload, message = tuple(row)
            reqs.add_metric([tag, status], n)
            acc = per_tag.setdefault(tag, [0.0, 0.0, 0.0])
            acc[0] += payload or 0
            acc[1] += message or 0
        up, _, info = attribute_tcp(self.store)
        for row in self.store.query("SELECT record_id, tag FROM requests WHERE peer != ''"):
            if row["record_id"] in up:
                per_tag.setdefault(row["tag"], [0.0, 0.0, 0.0])[2] += up[row["record_id"]]
        for tag, (payload, message, tcp) in per_tag.items():
            byts.add_metric([tag, "payload"], payload)
            byts.add_metric([tag, "message"], message)
            byts.add_metric([tag, "tcp"], tcp)
        conn = CounterMetricFamily("splitinfer_relay_bytes", "Bytes through counting relays, all connections",
                                   labels=["direction"])
        conn.add_metric(["up"], info["bytes_up"])
        conn.add_metric(["down"], info["bytes_down"])
        flagged = CounterMetricFamily("splitinfer_flagged_requests", "Requests above the anomaly threshold, by tag",
                                      labels=["tag"])
        for tag, n in self.store.query("SELECT tag, SUM(flagged) FROM requests GROUP BY tag"):
            flagged.add_metric([tag], n or 0)
        conns = GaugeMetricFamily("splitinfer_relay_connections", "Relayed TCP connections recorded")
        conns.add_metric([], info["connections"])
        yield reqs
        yield byts
        yield conn
        yield conns
        yield flagged
        yield self._histogram("splitinfer_server_latency_seconds", "Server time per request (receipt to reply)",
                              "server_ms", LATENCY_BUCKETS_S, 1000.0)
        yield self._histogram("splitinfer_message_bytes", "Serialized request size", "message_bytes",
                              SIZE_BUCKETS_B, 1.0)


def create_app(db: str | Path, token: str | None = None, title: str = "splitinfer monitor") -> FastAPI:
    store = Store(db)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store))  # type: ignore[arg-type]
    app = FastAPI(title=title, description=__doc__)
    app.state.store = store
    started = time.time()

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "db": str(db), "uptime_s": time.time() - started, **store.counts()}

    @app.post("/api/ingest")
    async def ingest(request: Request) -> dict:
        if token is not None:
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
                raise HTTPException(401, "missing or wrong bearer token")
        length = int(request.headers.get("content-length") or 0)
        if length > MAX_INGEST_BYTES:
            raise HTTPException(413, f"body of {length} bytes exceeds {MAX_INGEST_BYTES}")
        body = await request.body()
        if len(body) > MAX_INGEST_BYTES:
            raise HTTPException(413, f"body exceeds {MAX_INGEST_BYTES} bytes")
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise HTTPException(400, f"body is not JSON: {exc}") from exc
        if not isinstance(doc, dict) or set(doc) - {"requests", "connections", "calibrations"}:
            raise HTTPException(400, "body must be an object with requests, connections and/or calibrations lists")
        for key, val in doc.items():
            if not isinstance(val, list):
                raise HTTPException(400, f"{key} must be a list")
        try:
            stored = store.ingest(doc.get("requests", []), doc.get("connections", []), doc.get("calibrations", []))
        except RecordError as exc:
            raise HTTPException(400, str(exc)) from exc
        return {"stored": stored}

    @app.get("/api/summary")
    def summary() -> dict:
        return summarize(store)

    @app.get("/api/records")
    def records(tag: str | None = None, client_id: str | None = None, since: float | None = None,
                limit: int = Query(100, ge=1, le=10000), offset: int = Query(0, ge=0)) -> dict:
        rows = store.records(tag, client_id, since, limit, offset)
        return {"records": rows, "count": len(rows), "offset": offset}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    def dashboard(fragment: bool = False) -> HTMLResponse:
        recent = store.query("SELECT COUNT(*) FROM requests")[0][0]
        rows = store.records(limit=DASHBOARD_RECORDS, offset=max(0, recent - DASHBOARD_RECORDS))
        s = summarize(store)
        page = render_fragment(s, rows, title) if fragment else render_page(s, rows, title, refresh_s=10)
        return HTMLResponse(page)

    @app.exception_handler(ValueError)
    async def value_error(_request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    return app


class MonitorThread:
    """The monitor on uvicorn in a background thread (for the demo and tests); ``url``, ``stop()``."""

    def __init__(self, db: str | Path, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> None:
        self.app = create_app(db, token)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> MonitorThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("monitor did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.app.state.store.close()


def serve_monitor(db: str | Path, host: str = "127.0.0.1", port: int = 8000, token: str | None = None) -> None:
    uvicorn.run(create_app(db, token), host=host, port=port, log_level="info")
