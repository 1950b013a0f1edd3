"""The load generator against real loopback servers: consistent counts, per-tag figures, back-off under budgets,
and two replicas with one killed and restarted mid-run."""

from __future__ import annotations

import json
import socket
import threading
import time

import grpc
import pytest

from edge_client.client import EdgeClient
from edge_client.loadgen import LoadConfig, LoadRun, assign_tags, parse_mix, with_ids
from edge_client.runtime import EdgeEncoder
from proto import splitinfer_pb2 as pb
from server.service import RunningServer, ServerConfig
from splitinfer.cli import main
from splitinfer.loadtest import prepare_streams

from .conftest import eval_images


def test_mix_and_ids() -> None:
    assert parse_mix("clean=1,attack=3") == {"clean": 0.25, "attack": 0.75}
    for bad in ("clean", "clean=x", "clean=-1", "clean=0"):
        with pytest.raises(ValueError, match="--mix"):
            parse_mix(bad)
    tags = assign_tags({"clean": 0.5, "a": 0.3, "b": 0.2}, 10)
    assert len(tags) == 10 and tags.count("clean") == 5 and tags.count("a") == 3 and tags.count("b") == 2
    assert set(assign_tags({"clean": 0.98, "a": 0.02}, 3)) == {"clean", "a"}
    base = pb.InferRequest(model_id="m", stream=b"\x01\x02\x03\x04", tag="clean").SerializeToString()
    req = pb.InferRequest.FromString(with_ids(base, "rid-1", "load-3"))
    assert (req.request_id, req.client_id, req.tag, req.model_id) == ("rid-1", "load-3", "clean", "m")


@pytest.fixture(scope="module")
def streams():
    return prepare_streams(["clean", "attack:entropy_pgd:8"], "default-fp", images=20)


def test_loadtest_counts_are_consistent(servers: dict, streams) -> None:
    s, info = streams
    cfg = LoadConfig(servers=[f"127.0.0.1:{servers['fp'].port}"], clients=4,
                     mix={"clean": 0.5, "attack:entropy_pgd:8": 0.5}, rate=60, duration=3, timeout=10, warmup=0.5)
    result = LoadRun(cfg, s).run()
    for f in [*result["tags"].values(), result["overall"]]:
        assert f["sent"] == f["ok"] + f["error_count"] and f["sent"] > 0
    assert result["overall"]["sent"] == sum(f["sent"] for f in result["tags"].values()) == len(result["timeline"])
    clean, att = result["tags"]["clean"], result["tags"]["attack:entropy_pgd:8"]
    assert clean["ok"] > 20 and clean["error_count"] == 0
    assert att["message_bytes_mean"] > clean["message_bytes_mean"]  # attacked streams are bigger
    for f in (clean, att):
        assert f["tcp_bytes_per_s"] > f["message_bytes_per_s"] > 0  # framing is on top of the messages
        assert f["latency_ms"]["p50"] <= f["latency_ms"]["p95"] <= f["latency_ms"]["p99"]


def test_backoff_under_budget(streams) -> None:
    s, _ = streams
    server = RunningServer(ServerConfig(insecure=True, checkpoint="default-fp", port=0, budget_bytes_per_s=3000,
                                        budget_burst_bytes=3000))
    try:
        cfg = LoadConfig(servers=[f"127.0.0.1:{server.port}"], clients=2, mix={"attack:entropy_pgd:8": 1.0},
                         rate=60, duration=3, timeout=10)
        result = LoadRun(cfg, s).run()
    finally:
        server.stop(1)
    f = result["overall"]
    assert f["sent"] == f["ok"] + f["error_count"]
    assert f["errors"].get("RESOURCE_EXHAUSTED", 0) > 0 and f["skipped_backoff"] > 0
    # what the server accepted stays within 2 clients x (3000 B/s + a 3000 B burst over the 3 s run)
    accepted = f["ok"] * f["message_bytes_mean"] / 3
    assert accepted <= 2 * (3000 + 3000 / 3) * 1.15  # (the run lasts a little over 3 s)
    # honest clients back off: they send about one refused request per accepted one, far below the offered
    # 2 x 30 req/s x ~420 B (25 kB/s) they would send if they ignored the advice
    assert f["message_bytes_per_s"] < 2 * 3000 * 3


def test_loadtest_cli_json(servers: dict, capsys: pytest.CaptureFixture, tmp_path) -> None:
    rc = main(["loadtest", "--server", f"127.0.0.1:{servers['fp'].port}", "--clients", "2", "--mix", "clean=1",
               "--rate", "20", "--duration", "1", "--checkpoint", "default-fp", "--images", "20", "--insecure",
               "--json", "--out", str(tmp_path)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["overall"]["sent"] == out["overall"]["ok"] + out["overall"]["error_count"] > 0
    assert (tmp_path / "loadtest.png").stat().st_size > 1000 and (tmp_path / "loadtest.json").exists()
    assert main(["loadtest", "--server", "127.0.0.1:1", "--rate", "0", "--insecure"]) == 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_replica_killed_and_restarted(bundles: dict, streams) -> None:
    """Two replicas under load; one is killed and restarted: nothing hangs past its deadline, nothing is lost
    silently, and idempotent retries succeed."""
    ports = [_free_port(), _free_port()]

    def start(port: int) -> RunningServer:
        return RunningServer(ServerConfig(insecure=True, checkpoint="default-fp", port=port, max_delay_ms=1.0))

    replicas = [start(p) for p in ports]
    target = ",".join(f"127.0.0.1:{p}" for p in ports)
    encoder = EdgeEncoder(bundles["fp"])
    encs = encoder.encode(eval_images(20)[0])
    timeout = 3.0
    client = EdgeClient(target, encoder.bundle, timeout=timeout, retries=4)
    outcomes: list[tuple[str, float]] = []
    load_result: dict = {}

    def background_load() -> None:
        cfg = LoadConfig(servers=[f"127.0.0.1:{p}" for p in ports], clients=2, mix={"clean": 1.0}, rate=30,
                         duration=6, timeout=timeout, measure_tcp=False)
        load_result.update(LoadRun(cfg, streams[0]).run())

    loader = threading.Thread(target=background_load)
    loader.start()
    try:
        for i in range(120):
            if i == 30:
                replicas[0].stop(grace=0)  # killed: in-flight calls fail, the port closes
            if i == 70:
                replicas[0] = start(ports[0])  # restarted on the same port
            t0 = time.monotonic()
            try:
                reply = client.send(client.request(encs[i % 20], request_id=f"req-{i}"))
                outcomes.append(("OK" if reply.top_k else "EMPTY", time.monotonic() - t0))
            except grpc.RpcError as exc:
                outcomes.append((exc.code().name, time.monotonic() - t0))
            time.sleep(0.02)
        loader.join(60)
        # a client of replica 0 alone: killed under it, restarted a second later; the request is retried with
        # the same id (wait_for_ready) and answered
        single = EdgeClient(f"127.0.0.1:{ports[0]}", encoder.bundle, timeout=timeout, retries=4)
        assert single.send(single.request(encs[0], request_id="single-0")).top_k
        replicas[0].stop(grace=0)
        restarter = threading.Timer(1.0, lambda: replicas.__setitem__(0, start(ports[0])))
        restarter.start()
        t0 = time.monotonic()
        reply = single.send(single.request(encs[1], request_id="single-1"))
        restarter.join()
        assert reply.top_k and single.retried_ok == 1 and time.monotonic() - t0 < timeout * 5
        single.close()
    finally:
        client.close()
        for r in replicas:
            r.stop(0)
    statuses = [s for s, _ in outcomes]
    assert len(outcomes) == 120 and "EMPTY" not in statuses
    assert max(d for _, d in outcomes) < timeout * (client.retries + 1) + 2  # nothing hung past its deadlines
    assert statuses.count("OK") >= 110, statuses  # the survivor (then both) answered; retries covered the kill
    assert client.retries_made == 0 or client.retried_ok >= 1
    f = load_result["overall"]
    assert f["sent"] == f["ok"] + f["error_count"] and f["ok"] > 0
    assert set(f["errors"]) <= {"UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED"}
    print(f"replica kill: {statuses.count('OK')}/120 unary ok, retries {client.retries_made}, "
          f"answered after retry {client.retried_ok}; load: {f['ok']} ok, errors {f['errors']}")
