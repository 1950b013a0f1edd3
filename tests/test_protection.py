"""Server protections: byte budgets, the anomaly policy and fair scheduling, unit-level and on a real server."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from edge_client.client import EdgeClient
from edge_client.runtime import EdgeEncoder
from server.protection import AnomalyDetector, Budgets, FairExecutor
from server.service import RunningServer, ServerConfig

from .conftest import eval_images


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_budget_token_bucket() -> None:
    clock = FakeClock()
    b = Budgets(rate=1000, burst=3000, clock=clock)
    assert [b.charge("a", 1000) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = b.charge("a", 1000)
    assert wait == pytest.approx(1.0)  # empty bucket: 1000 B at 1000 B/s
    assert b.charge("b", 1000) == 0.0  # another client has its own budget
    clock.t += 0.5
    assert b.charge("a", 1000) == pytest.approx(0.5)
    clock.t += 0.5
    assert b.charge("a", 1000) == 0.0
    assert b.refused == 2


def test_anomaly_calibration() -> None:
    sizes = np.arange(100, 300)
    det = AnomalyDetector.calibrate(sizes, "reject", quantile=0.99, margin=0.1)
    assert det.threshold == pytest.approx(np.quantile(sizes, 0.99) * 1.1)
    assert not det.is_anomalous(int(det.threshold)) and det.is_anomalous(int(det.threshold) + 1)
    assert not AnomalyDetector.calibrate(sizes, "off").is_anomalous(10**6)
    with pytest.raises(ValueError, match="anomaly policy"):
        AnomalyDetector.calibrate(sizes, "drop")


def test_anomaly_per_client_window() -> None:
    rng = np.random.default_rng(0)
    clean = rng.normal(230, 40, 400).clip(100)
    det = AnomalyDetector.calibrate(clean, "reject", window=16, z=4.0)
    # a clean client is never judged anomalous over a long run; a client whose streams are 30% bigger is,
    # although most of its single streams are below the per-request threshold
    assert not any(det.is_anomalous(int(v), "clean-client") for v in rng.normal(230, 40, 500).clip(100))
    attacked = rng.normal(300, 40, 40).clip(100)
    assert np.mean(attacked < det.threshold) > 0.5
    verdicts = [det.is_anomalous(int(v), "attacked-client") for v in attacked]
    assert not any(verdicts[:7]) and all(verdicts[12:])
    assert "average" in verdicts[-1] and "clean mean" in verdicts[-1]


def test_fair_executor_round_robin_and_priority() -> None:
    ex = FairExecutor(workers=1)
    gate = threading.Event()
    order: list[str] = []
    ex.submit("block", gate.wait)
    futs = [ex.submit("greedy", order.append, f"greedy{i}") for i in range(10)]
    futs.append(ex.submit("low", order.append, "low", priority=1))
    futs.append(ex.submit("polite", order.append, "polite"))
    gate.set()
    for f in futs:
        f.result(5)
    assert order.index("polite") <= 1, order  # not behind the greedy client's ten
    assert order[-1] == "low"  # deprioritised work runs when nothing else waits
    gate2 = threading.Event()
    ex.submit("block", gate2.wait)
    stale = ex.submit("late", order.append, "stale")
    assert stale.cancel()  # its request gave up (deadline): the worker must not run it
    done = ex.submit("late", order.append, "fresh")
    gate2.set()
    done.result(5)
    assert "stale" not in order and order[-1] == "fresh"
    ex.shutdown()


@pytest.fixture(scope="module")
def streams(bundles: dict[str, Path]):
    """Clean streams of the MSHP bundle and an inflated one: the largest of four entropy-attacked images (ε=16/255;
    hand-made noise or checkerboards code *small* with this model)."""
    import torch

    from models.evaluate import load_split_model
    from resilience.attacks import entropy_pgd

    encoder = EdgeEncoder(bundles["mshp"])
    images, _ = eval_images(8)
    model, _ = load_split_model("default-mshp")
    x = torch.from_numpy(images[:4]).permute(0, 3, 1, 2).float() / 255
    adv = entropy_pgd(model, x, eps=16 / 255, steps=10, eot_iter=2, seed=0)
    adv_u8 = (adv.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    inflated = max(encoder.encode(adv_u8), key=lambda e: len(e.data))
    return encoder.bundle, encoder.encode(images), inflated


def _client(server: RunningServer, bundle, client_id: str) -> EdgeClient:
    return EdgeClient(f"127.0.0.1:{server.port}", bundle, timeout=20, retries=0, client_id=client_id)


def test_budgets_on_a_real_server(streams) -> None:
    bundle, clean, _ = streams
    server = RunningServer(ServerConfig(insecure=True, checkpoint="default-mshp", port=0, budget_bytes_per_s=2000,
                                        budget_burst_bytes=2000))
    try:
        greedy, other = _client(server, bundle, "greedy"), _client(server, bundle, "other")
        outcomes = []
        for enc in clean:
            try:
                greedy.send(greedy.request(enc))
                outcomes.append("ok")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "byte budget" in exc.details()
                retry = dict(exc.trailing_metadata())["retry-after-ms"]
                assert 0 < int(retry) <= 2000
                outcomes.append("refused")
        assert outcomes[:3] == ["ok"] * 3 and "refused" in outcomes  # ~400 B messages: burst of 2000 B
        assert other.send(other.request(clean[0])).top_k  # other clients keep their own budget
        time.sleep(1.0)
        assert greedy.send(greedy.request(clean[0])).top_k  # the budget refills
        assert server.service.budgets is not None and server.service.budgets.refused >= 1
    finally:
        server.stop(1)


@pytest.mark.parametrize("policy", ["flag", "deprioritize", "reject"])
def test_anomaly_policies(streams, policy: str) -> None:
    bundle, clean, inflated = streams
    server = RunningServer(ServerConfig(insecure=True, checkpoint="default-mshp", port=0, anomaly_policy=policy))
    records: list[dict] = []
    server.service.recorder = records.append
    try:
        det = server.service.anomaly
        assert det is not None and det.clean_mean < det.threshold < len(inflated.data)
        c = _client(server, bundle, "edge")
        ok = [c.send(c.request(enc)) for enc in clean]
        assert not any(r.flagged for r in ok)
        if policy == "reject":
            with pytest.raises(grpc.RpcError) as err:
                c.send(c.request(inflated))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "anomaly threshold" in err.value.details()
            assert dict(err.value.trailing_metadata())["retry-after-ms"] == "1000"
        else:
            assert c.send(c.request(inflated)).flagged
        assert records[-1]["flagged"] == 1 and sum(r["flagged"] for r in records) == 1
    finally:
        server.stop(1)
