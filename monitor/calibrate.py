"""Measure the framing overhead TCP adds over gRPC messages, through a counting relay.

HTTP/2 and gRPC add bytes per request (HEADERS frame with HPACK-coded headers, DATA frame header, the 5-byte gRPC
length prefix, flow-control updates) and per connection (preface, SETTINGS, the model-info call a client makes
first). Rather than model HPACK's dynamic table, open fresh connections carrying different numbers of real
requests and fit ``tcp_up - Σ message = per_connection + per_request · n`` by least squares. The summary then
predicts each tag's TCP bytes from its message bytes and reports how well the prediction holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from edge_client.client import EdgeClient
from proto import splitinfer_pb2 as pb

from .relay import CountingRelay

CALIBRATION_TAG = "calibration"


def calibrate_framing(relay: CountingRelay, make_client: Callable[[], EdgeClient],
                      make_request: Callable[[EdgeClient, int], pb.InferRequest],
                      sizes: tuple[int, ...] = (4, 16, 48), name: str = "unary") -> dict:
    """One fresh connection per entry of ``sizes``, each sending that many unary requests; returns the fit."""
    points = []
    for n in sizes:
        before = set(relay.connections)
        client = make_client()
        message_bytes = 0
        for i in range(n):
            req = make_request(client, i)
            req.tag = CALIBRATION_TAG
            message_bytes += req.ByteSize()
            client.send(req)
        client.close()
        deadline = time.monotonic() + 10
        while True:
            new = [c for cid, c in relay.connections.items() if cid not in before]
            if new and all(c.closed is not None for c in new):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("calibration connection did not close at the relay within 10 s")
            time.sleep(0.02)
        points.append((n, sum(c.bytes_up for c in new) - message_bytes))
    a = np.array([[1.0, n] for n, _ in points])
    b = np.array([float(extra) for _, extra in points])
    (per_connection, per_request), *_ = np.linalg.lstsq(a, b, rcond=None)
    return {"name": name, "ts": time.time(), "per_request_bytes": float(per_request),
            "per_connection_bytes": float(per_connection), "requests": int(sum(sizes))}
