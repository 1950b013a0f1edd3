"""SQLite storage of the monitor: one row per served request, one per relayed TCP connection, and calibrations.

Why SQLite: records must survive a monitor restart and be queryable by tag without a server to run; the
standard library's sqlite3 in WAL mode gives atomic batches and concurrent readers. Every record carries a
``record_id`` chosen by its sender, so a batch re-posted after a lost reply is stored once (INSERT OR IGNORE).
Connection rows are upserted: the relay reports cumulative byte counts while a connection lives and once more
when it closes.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    record_id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    request_id TEXT NOT NULL DEFAULT '',
    client_id TEXT NOT NULL DEFAULT '',
    tag TEXT NOT NULL DEFAULT '',
    peer TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    payload_bytes INTEGER NOT NULL,
    message_bytes INTEGER NOT NULL,
    server_ms REAL,
    predicted INTEGER,
    label INTEGER,
    model_id TEXT NOT NULL DEFAULT '',
    flagged INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS requests_tag ON requests(tag);
CREATE INDEX IF NOT EXISTS requests_peer ON requests(peer);
CREATE INDEX IF NOT EXISTS requests_ts ON requests(ts);
CREATE TABLE IF NOT EXISTS connections (
    conn_id TEXT PRIMARY KEY,
    relay TEXT NOT NULL DEFAULT '',
    client_peer TEXT NOT NULL DEFAULT '',
    upstream_peer TEXT NOT NULL,
    opened REAL NOT NULL,
    closed REAL,
    bytes_up INTEGER NOT NULL,
    bytes_down INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS connections_peer ON connections(upstream_peer);
CREATE TABLE IF NOT EXISTS calibrations (
    name TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    per_request_bytes REAL NOT NULL,
    per_connection_bytes REAL NOT NULL,
    requests INTEGER NOT NULL
);
"""

MIGRATIONS = (("flagged", "INTEGER NOT NULL DEFAULT 0"),)
REQUEST_FIELDS = ("record_id", "ts", "request_id", "client_id", "tag", "peer", "status", "payload_bytes",
                  "message_bytes", "server_ms", "predicted", "label", "model_id", "flagged")
CONNECTION_FIELDS = ("conn_id", "relay", "client_peer", "upstream_peer", "opened", "closed", "bytes_up",
                     "bytes_down")
CALIBRATION_FIELDS = ("name", "ts", "per_request_bytes", "per_connection_bytes", "requests")
MAX_TEXT = 256


class RecordError(ValueError):
    """An ingested record that is malformed: names the record and the field."""


def _clean(kind: str, i: int, rec: Any, fields: tuple[str, ...], required: tuple[str, ...],
           ints: tuple[str, ...], floats: tuple[str, ...]) -> tuple:
    if not isinstance(rec, dict):
        raise RecordError(f"{kind}[{i}] is not an object")
    unknown = set(rec) - set(fields)
    if unknown:
        raise RecordError(f"{kind}[{i}] has unknown field(s) {sorted(unknown)}")
    for f in required:
        if rec.get(f) is None:
            raise RecordError(f"{kind}[{i}].{f} is required")
    out = []
    for f in fields:
        v = rec.get(f)
        if v is None:
            out.append(None if f not in required else v)
            continue
        if f in ints:
            if isinstance(v, bool) or not isinstance(v, int) or not -(1 << 62) < v < (1 << 62):
                raise RecordError(f"{kind}[{i}].{f} must be an integer, got {v!r:.40}")
        elif f in floats:
            if isinstance(v, bool) or not isinstance(v, int | float) or v != v:
                raise RecordError(f"{kind}[{i}].{f} must be a number, got {v!r:.40}")
            v = float(v)
        elif not isinstance(v, str) or len(v) > MAX_TEXT:
            raise RecordError(f"{kind}[{i}].{f} must be a string of at most {MAX_TEXT} characters")
        out.append(v)
    return tuple(out)


class Store:
    """Thread-safe access to the monitor database (one connection, serialized by a lock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(requests)")}
            for name, decl in MIGRATIONS:
                if name not in columns:  # a database written by an older version: add the column
                    self._db.execute(f"ALTER TABLE requests ADD COLUMN {name} {decl}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------------------------------------ writes
    def ingest(self, requests: Iterable[dict] = (), connections: Iterable[dict] = (),
               calibrations: Iterable[dict] = ()) -> dict[str, int]:
        """Validate everything first, then write it in one transaction: a bad batch writes nothing."""
        reqs = [_clean("requests", i, r, REQUEST_FIELDS, ("record_id", "ts", "status", "payload_bytes",
                                                          "message_bytes"),
                       ("payload_bytes", "message_bytes", "predicted", "label", "flagged"), ("ts", "server_ms"))
                for i, r in enumerate(requests)]
        conns = [_clean("connections", i, c, CONNECTION_FIELDS, ("conn_id", "upstream_peer", "opened", "bytes_up",
                                                                 "bytes_down"),
                        ("bytes_up", "bytes_down"), ("opened", "closed"))
                 for i, c in enumerate(connections)]
        cals = [_clean("calibrations", i, c, CALIBRATION_FIELDS, CALIBRATION_FIELDS, ("requests",),
                       ("ts", "per_request_bytes", "per_connection_bytes"))
                for i, c in enumerate(calibrations)]
        reqs = [tuple("" if v is None and f in ("request_id", "client_id", "tag", "peer", "model_id")
                      else 0 if v is None and f == "flagged" else v
                      for f, v in zip(REQUEST_FIELDS, r, strict=True)) for r in reqs]
        conns = [tuple("" if v is None and f in ("relay", "client_peer") else v
                       for f, v in zip(CONNECTION_FIELDS, c, strict=True)) for c in conns]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                before = self._db.total_changes
                self._db.executemany(f"INSERT OR IGNORE INTO requests ({','.join(REQUEST_FIELDS)}) "
                                     f"VALUES ({','.join('?' * len(REQUEST_FIELDS))})", reqs)
                new_requests = self._db.total_changes - before
                self._db.executemany(
                    f"INSERT INTO connections ({','.join(CONNECTION_FIELDS)}) "
                    f"VALUES ({','.join('?' * len(CONNECTION_FIELDS))}) ON CONFLICT(conn_id) DO UPDATE SET "
                    "closed=COALESCE(excluded.closed, closed), bytes_up=MAX(bytes_up, excluded.bytes_up), "
                    "bytes_down=MAX(bytes_down, excluded.bytes_down)", conns)
                self._db.executemany(
                    f"INSERT OR REPLACE INTO calibrations ({','.join(CALIBRATION_FIELDS)}) "
                    f"VALUES ({','.join('?' * len(CALIBRATION_FIELDS))})", cals)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return {"requests": new_requests, "connections": len(conns), "calibrations": len(cals)}

    # ------------------------------------------------------------------------------------------------- reads
    def query(self, sql: str, params: tuple | list = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def records(self, tag: str | None = None, client_id: str | None = None, since: float | None = None,
                limit: int = 100, offset: int = 0) -> list[dict]:
        where, params = [], []
        for col, val in (("tag", tag), ("client_id", client_id)):
            if val is not None:
                where.append(f"{col} = ?")
                params.append(val)
        if since is not None:
            where.append("ts >= ?")
            params.append(since)
        sql = (f"SELECT {','.join(REQUEST_FIELDS)} FROM requests {'WHERE ' + ' AND '.join(where) if where else ''} "
               "ORDER BY ts, record_id LIMIT ? OFFSET ?")
        return [dict(r) for r in self.query(sql, [*params, limit, offset])]

    def counts(self) -> dict[str, int]:
        row = self.query("SELECT (SELECT COUNT(*) FROM requests) AS requests, "
                         "(SELECT COUNT(*) FROM connections) AS connections")[0]
        return dict(row)

    def calibration(self) -> dict | None:
        rows = self.query(f"SELECT {','.join(CALIBRATION_FIELDS)} FROM calibrations ORDER BY ts DESC LIMIT 1")
        return dict(rows[0]) if rows else None
