"""The monitor: API contract, SQLite persistence, Prometheus text, the dashboard in a real headless browser, and
byte accounting at three depths through a real server and a counting relay."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor.app import MonitorThread
from monitor.reporter import MonitorReporter, new_record_id

from .conftest import eval_images


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url: str, body: object, token: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    req = urllib.request.Request(url + "/api/ingest", data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _records(n: int, tag: str, size: int, seed: int = 0, labelled: bool = True) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        payload = int(size + rng.integers(-20, 21))
        label = int(rng.integers(0, 10))
        out.append({"record_id": new_record_id(), "ts": time.time() + i * 1e-3, "request_id": f"r{i}",
                    "client_id": "edge-1", "tag": tag, "status": "OK", "payload_bytes": payload,
                    "message_bytes": payload + 150, "server_ms": float(rng.uniform(1, 30)),
                    "predicted": label if i % 4 else (label + 1) % 10, "label": label if labelled else None})
    return out


@pytest.fixture
def monitor(tmp_path: Path):
    m = MonitorThread(tmp_path / "monitor.sqlite3").start()
    yield m
    m.stop()


def test_api_contract(monitor: MonitorThread) -> None:
    status, body = _post(monitor.url, {"requests": _records(40, "clean", 200) + _records(40, "attack:entropy_pgd:8",
                                                                                         300, seed=1)})
    assert status == 200 and body["stored"]["requests"] == 80
    s = _get(monitor.url + "/api/summary")
    clean, att = s["tags"]["clean"], s["tags"]["attack:entropy_pgd:8"]
    assert clean["images"] == 40 and clean["errors"] == 0
    assert clean["accuracy"] == pytest.approx(0.75)  # every 4th record is predicted wrong
    assert att["message"]["mean"] > clean["message"]["mean"]
    assert att["payload_delta_pct"] == pytest.approx(100 * (att["payload"]["mean"] / clean["payload"]["mean"] - 1))
    assert clean["payload_delta_pct"] == 0.0
    assert clean["payload"]["p95"] >= clean["payload"]["mean"]
    assert clean["tcp"] is None and clean["tcp_coverage"] == 0.0  # no relay in this test: no TCP figure invented

    page = _get(monitor.url + "/api/records?tag=clean&limit=15&offset=30")
    assert page["count"] == 10 and all(r["tag"] == "clean" for r in page["records"])
    assert _get(monitor.url + "/healthz")["requests"] == 80

    # bad input: a clear 4xx naming the problem, nothing stored
    bad = _records(2, "clean", 200)
    bad[1]["payload_bytes"] = "many"
    status, body = _post(monitor.url, {"requests": bad})
    assert status == 400 and "requests[1].payload_bytes" in body["detail"]
    status, body = _post(monitor.url, {"requests": [{"record_id": "x"}]})
    assert status == 400 and "ts is required" in body["detail"]
    status, body = _post(monitor.url, {"rows": []})
    assert status == 400
    status, _ = _post(monitor.url, [1, 2])
    assert status == 400
    assert _get(monitor.url + "/healthz")["requests"] == 80
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(monitor.url + "/api/records?limit=0")
    assert err.value.code == 422


def test_ingest_token(tmp_path: Path) -> None:
    m = MonitorThread(tmp_path / "m.sqlite3", token="s3cret").start()
    try:
        assert _post(m.url, {"requests": _records(1, "clean", 100)})[0] == 401
        assert _post(m.url, {"requests": _records(1, "clean", 100)}, token="wrong")[0] == 401
        assert _post(m.url, {"requests": _records(1, "clean", 100)}, token="s3cret")[0] == 200
    finally:
        m.stop()


def test_persistence_across_restart_and_retried_batches(tmp_path: Path) -> None:
    db = tmp_path / "monitor.sqlite3"
    port = _free_port()
    # the reporter starts while the monitor is down: it must keep its records and deliver them later
    reporter = MonitorReporter(f"http://127.0.0.1:{port}", interval=0.05)
    recs = _records(300, "clean", 200)
    for r in recs[:150]:
        reporter.report("requests", r)
    time.sleep(0.3)
    m = MonitorThread(db, port=port).start()
    for r in recs[150:]:
        reporter.report("requests", r)
    assert reporter.flush(20)
    assert _post(m.url, {"requests": recs[:50]})[1]["stored"]["requests"] == 0  # a re-posted batch is stored once
    m.stop()
    m2 = MonitorThread(db, port=port).start()
    try:
        got = _get(m2.url + "/api/records?limit=1000")["records"]
        assert sorted(r["record_id"] for r in got) == sorted(r["record_id"] for r in recs)
        assert _get(m2.url + "/api/summary")["tags"]["clean"]["images"] == 300
    finally:
        reporter.close(1)
        m2.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_parse_with_prometheus_parser(monitor: MonitorThread) -> None:
    recs = _records(30, "clean", 200) + _records(20, "corruption:shot_noise:3", 260, seed=2)
    recs[0]["status"] = "INVALID_ARGUMENT"
    _post(monitor.url, {"requests": recs})
    with urllib.request.urlopen(monitor.url + "/metrics") as r:
        text = r.read().decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    reqs = {(s.labels["tag"], s.labels["status"]): s.value for s in fams["splitinfer_requests"].samples
            if s.name == "splitinfer_requests_total"}
    assert reqs == {("clean", "OK"): 29, ("clean", "INVALID_ARGUMENT"): 1, ("corruption:shot_noise:3", "OK"): 20}
    byts = {(s.labels["tag"], s.labels["depth"]): s.value for s in fams["splitinfer_bytes"].samples}
    assert byts[("clean", "payload")] == sum(r["payload_bytes"] for r in recs[:30])
    assert byts[("corruption:shot_noise:3", "message")] == sum(r["message_bytes"] for r in recs[30:])
    hist = [s for s in fams["splitinfer_server_latency_seconds"].samples if s.labels["tag"] == "clean"]
    count = next(s.value for s in hist if s.name.endswith("_count"))
    inf = next(s.value for s in hist if s.name.endswith("_bucket") and s.labels["le"] == "+Inf")
    buckets = [s.value for s in hist if s.name.endswith("_bucket")]
    assert count == inf == 30 and buckets == sorted(buckets)
    total = next(s.value for s in hist if s.name.endswith("_sum"))
    assert total == pytest.approx(sum(r["server_ms"] for r in recs[:30]) / 1000)


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "Debian chromium is required for the dashboard test (make test installs it: apt-get install chromium)"
    return exe


def test_dashboard_in_headless_chromium(monitor: MonitorThread, tmp_path: Path) -> None:
    tags = ["clean", "attack:entropy_pgd:4", "defended:object_tv"]
    _post(monitor.url, {"requests": sum((_records(25, t, 200 + 50 * i, seed=i) for i, t in enumerate(tags)), [])})
    common = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--virtual-time-budget=5000", "--dump-dom", monitor.url + "/"],
                         capture_output=True, text=True, timeout=120).stdout
    assert "<table id=\"summary\"" in dom or "<table id='summary'" in dom
    for tag in tags:
        assert f'data-tag="{tag}"' in dom
    for fig in ("plot-bytes-by-tag", "plot-distribution", "plot-over-time"):
        start = dom.index(f'id="{fig}"')
        assert "<svg" in dom[start:start + 2000], f"{fig} has no rendered SVG plot"
    shot = tmp_path / "dashboard.png"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,1600", monitor.url + "/"],
                   capture_output=True, timeout=120)
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (1600, 1200)
    colours = {tuple(c) for c in img.reshape(-1, 3)[::7]}
    assert len(colours) > 50, "the screenshot is (nearly) blank: plots did not render"


def test_three_depths_through_server_and_relay(tmp_path: Path, bundles: dict[str, Path]) -> None:
    """≥500 real requests through a counting relay: TCP bytes agree with message bytes + calibrated framing."""
    from edge_client.client import EdgeClient
    from edge_client.runtime import EdgeEncoder
    from monitor.calibrate import calibrate_framing
    from monitor.relay import CountingRelay
    from server.service import RunningServer, ServerConfig

    images, labels = eval_images(100)
    encoder = EdgeEncoder(bundles["fp"])
    encs = encoder.encode(images)
    mon = MonitorThread(tmp_path / "m.sqlite3").start()
    server = RunningServer(ServerConfig(insecure=True, checkpoint="default-fp", port=0, monitor=mon.url,
                                        max_delay_ms=1.0))
    reporter = MonitorReporter(mon.url)
    relay = CountingRelay(("127.0.0.1", server.port), reporter=reporter).start()
    target = f"127.0.0.1:{relay.port}"
    try:
        cal = calibrate_framing(relay, lambda: EdgeClient(target, encoder.bundle),
                                lambda c, i: c.request(encs[i % 100]))
        reporter.report("calibrations", cal)
        sent = {"clean": 0, "other": 0}
        for tag, rounds in (("clean", 3), ("other", 3)):
            client = EdgeClient(target, encoder.bundle, client_id="edge-7")
            for _ in range(rounds):
                for i, enc in enumerate(encs):
                    client.send(client.request(enc, tag=tag, label=int(labels[i])))
                    sent[tag] += 1
            client.close()
        bad = EdgeClient(target, encoder.bundle)
        req = bad.request(encs[0], tag="clean")
        req.stream = req.stream[:-1]  # not whole 32-bit words: refused before decoding
        with pytest.raises(grpc.RpcError) as err:
            bad.send(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        bad.close()
        relay.stop()
        server.reporter.flush(10)
        reporter.flush(10)
        s = _get(mon.url + "/api/summary")
    finally:
        relay.stop()
        server.stop(1)
        reporter.close(2)
        mon.stop()
    clean = s["tags"]["clean"]
    assert clean["requests"] == sent["clean"] + 1 and clean["errors"] == 1  # the refused request is recorded
    assert clean["tcp_coverage"] == 1.0
    assert sent["clean"] + sent["other"] >= 500
    for tag in ("clean", "other"):
        e = s["tags"][tag]
        assert e["payload"]["mean"] < e["message"]["mean"] < e["tcp"]["mean"]
        assert abs(e["tcp_vs_predicted"] - 1) < 0.05, (tag, e["tcp"]["mean"], e["tcp_predicted"])
        assert e["accuracy"] is not None and e["accuracy"] > 0.5
    conn = s["connections"]
    attributed = sum(e["tcp"]["total"] for e in s["tags"].values() if e["tcp"])
    assert attributed + conn["idle_bytes_up"] == pytest.approx(conn["bytes_up"])  # every relayed byte accounted
    assert 20 < s["calibration"]["per_request_bytes"] < 200
