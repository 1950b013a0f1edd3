"""Per-tag figures from the stored records: bytes at three depths, Δ% vs clean, accuracy, latency.

Depths: ``payload`` (the coded stream), ``message`` (the exact serialized gRPC request the server received) and
``tcp`` (bytes the counting relay forwarded edge → server on the connection that carried the request).
TCP bytes of a connection are attributed to its requests in proportion to their message bytes, so a connection
shared by several tags is split fairly and connection-level overhead (HTTP/2 preface, settings, pings, the
model-info call) lands on the requests that caused it. ``framing`` is what TCP adds over the messages; the
calibration, when one is stored, predicts it (a per-request and a per-connection constant) and the summary
reports how well the prediction matches.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .store import Store

CLEAN_TAG = "clean"
DEPTHS = ("payload", "message", "tcp")
JOIN_SLACK_S = 2.0


def attribute_tcp(store: Store) -> tuple[dict[str, float], dict[str, float], dict]:
    """record_id -> attributed TCP bytes up / down, plus connection totals (incl. bytes of idle connections)."""
    conns = store.query("SELECT conn_id, upstream_peer, opened, closed, bytes_up, bytes_down FROM connections")
    by_peer: dict[str, list] = defaultdict(list)
    for c in conns:
        by_peer[c["upstream_peer"]].append(c)
    reqs = store.query("SELECT record_id, peer, ts, message_bytes FROM requests WHERE peer != ''")
    members: dict[str, list] = defaultdict(list)
    for r in reqs:
        for c in by_peer.get(r["peer"], ()):
            if c["opened"] - JOIN_SLACK_S <= r["ts"] and (c["closed"] is None or r["ts"] <= c["closed"] + JOIN_SLACK_S):
                members[c["conn_id"]].append(r)
                break
    up: dict[str, float] = {}
    down: dict[str, float] = {}
    idle_up = idle_down = 0
    for c in conns:
        rs = members.get(c["conn_id"])
        if not rs:
            idle_up += c["bytes_up"]
            idle_down += c["bytes_down"]
            continue
        total = sum(r["message_bytes"] for r in rs) or 1
        for r in rs:
            up[r["record_id"]] = c["bytes_up"] * r["message_bytes"] / total
            down[r["record_id"]] = c["bytes_down"] / len(rs)
    info = {"connections": len(conns), "with_requests": len(members),
            "bytes_up": int(sum(c["bytes_up"] for c in conns)), "bytes_down": int(sum(c["bytes_down"] for c in conns)),
            "idle_bytes_up": int(idle_up), "idle_bytes_down": int(idle_down),
            "conn_share": {rid: 1.0 / len(rs) for rs in members.values() for rid in (r["record_id"] for r in rs)}}
    return up, down, info


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "p95": float(np.percentile(a, 95)), "total": float(a.sum())}


def summarize(store: Store) -> dict:
    """The ``/api/summary`` document."""
    up, down, conn_info = attribute_tcp(store)
    conn_share = conn_info.pop("conn_share")
    cal = store.calibration()
    rows = store.query("SELECT record_id, tag, status, payload_bytes, message_bytes, server_ms, predicted, label, "
                       "flagged FROM requests")
    groups: dict[str, list] = defaultdict(list)
    for r in rows:
        groups[r["tag"] or "(untagged)"].append(r)
    tags: dict[str, dict] = {}
    for tag, rs in sorted(groups.items()):
        ok = [r for r in rs if r["status"] == "OK"]
        labelled = [r for r in ok if r["label"] is not None and r["predicted"] is not None]
        tcp = [up[r["record_id"]] for r in rs if r["record_id"] in up]
        entry: dict = {
            "requests": len(rs), "images": len(ok), "errors": len(rs) - len(ok),
            "flagged": sum(r["flagged"] for r in rs),
            "status": {st: sum(r["status"] == st for r in rs) for st in sorted({r["status"] for r in rs})},
            "payload": _stats([r["payload_bytes"] for r in rs]),
            "message": _stats([r["message_bytes"] for r in rs]),
            "tcp": _stats(tcp),
            "tcp_down": _stats([down[r["record_id"]] for r in rs if r["record_id"] in down]),
            "tcp_coverage": len(tcp) / len(rs),
            "accuracy": (sum(r["predicted"] == r["label"] for r in labelled) / len(labelled)) if labelled else None,
            "labelled": len(labelled),
            "server_ms": _stats([r["server_ms"] for r in rs if r["server_ms"] is not None]),
        }
        covered = [r for r in rs if r["record_id"] in up]
        if covered:
            msg_mean = float(np.mean([r["message_bytes"] for r in covered]))
            entry["framing_bytes_per_request"] = float(np.mean(tcp)) - msg_mean
            if cal is not None:
                conns_per_request = sum(conn_share[r["record_id"]] for r in covered) / len(covered)
                predicted = msg_mean + cal["per_request_bytes"] + cal["per_connection_bytes"] * conns_per_request
                entry["tcp_predicted"] = predicted
                entry["tcp_vs_predicted"] = float(np.mean(tcp)) / predicted
        tags[tag] = entry
    clean = tags.get(CLEAN_TAG)
    for entry in tags.values():
        for depth in DEPTHS:
            base = clean and clean[depth]
            entry[f"{depth}_delta_pct"] = (100.0 * (entry[depth]["mean"] / base["mean"] - 1.0)
                                           if base and entry[depth] else None)
    return {"tags": tags, "connections": conn_info, "calibration": cal, "records": len(rows)}
