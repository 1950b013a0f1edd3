"""The wire path on loopback: torch-free edge -> gRPC -> server (validate, decode, batch, tail)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_client.client import EdgeClient, ServerMismatchError
from edge_client.runtime import EdgeBundle, EdgeEncoder
from models.data import to_tensor
from models.evaluate import load_split_model

from .conftest import ROOT, eval_images


@pytest.mark.parametrize("prior", ["fp", "mshp"])
def test_wire_predictions_equal_in_process(prior: str, bundles: dict, servers: dict) -> None:
    images, _ = eval_images(200)
    encoder = EdgeEncoder(bundles[prior])
    client = EdgeClient(f"127.0.0.1:{servers[prior].port}", encoder.bundle, timeout=120)
    encoded = encoder.encode(images)
    replies = list(client.infer_stream((client.request(e) for e in encoded), timeout=900))
    assert all(r.error_code == 0 for r in replies)
    wire = np.array([r.top_k[0].label for r in replies])
    assert max(r.batch_size for r in replies) > 1  # the stream's requests shared tail batches

    model, _ = load_split_model(f"default-{prior}")
    codec = model.codec_model()
    with torch.no_grad():
        y = model.encode_latent(to_tensor(images))
        z = model.entropy.side_latent(y)
        y_hat = np.stack([codec.decode(codec.encode(y[i].numpy(), None if z is None else z[i].numpy()).data)
                          for i in range(len(images))])
        local = model.decode_tail(torch.from_numpy(y_hat)).argmax(1).numpy()
    assert len(wire) == 200
    assert (wire == local).mean() >= 0.995, f"{(wire != local).sum()} of 200 predictions differ"
    unary = client.infer(encoded[0])
    assert unary.top_k[0].label == wire[0] and unary.stream_bytes == len(encoded[0].data)
    client.close()


def test_health_reflection_and_model_info(servers: dict, bundles: dict) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{servers['mshp'].port}")
    status = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="splitinfer.v1.SplitInference"), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert "splitinfer.v1.SplitInference" in names and "grpc.health.v1.Health" in names
    info = EdgeClient(f"127.0.0.1:{servers['mshp'].port}", EdgeBundle.load(bundles["mshp"])).info
    assert info is not None and info.prior == "mshp" and list(info.latent_shape) == [24, 16, 16]
    channel.close()


def test_edge_refuses_a_server_with_another_model(servers: dict, bundles: dict) -> None:
    with pytest.raises(ServerMismatchError, match="fingerprint"):
        EdgeClient(f"127.0.0.1:{servers['fp'].port}", EdgeBundle.load(bundles["mshp"]))


def test_idempotent_retry_returns_the_same_reply(servers: dict, bundles: dict) -> None:
    encoder = EdgeEncoder(bundles["fp"])
    client = EdgeClient(f"127.0.0.1:{servers['fp'].port}", encoder.bundle)
    images, _ = eval_images(2)
    enc = encoder.encode(images)
    req = client.request(enc[0], request_id="retry-1")
    first = client.send(req)
    before = servers["fp"].service.counts["cached"]
    again = client.send(req)  # a retry of the same request: answered from the cache, not recomputed
    assert again == first
    assert servers["fp"].service.counts["cached"] == before + 1
    with pytest.raises(grpc.RpcError) as err:  # the same id for another image is refused, not mis-answered
        client.send(client.request(enc[1], request_id="retry-1"))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_edge_runs_without_torch(servers: dict, bundles: dict, tmp_path: Path) -> None:
    """The edge client imports and runs in a process where torch (and compressai) cannot be imported."""
    from PIL import Image

    images, _ = eval_images(3)
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    code = (
        "import sys, json\n"
        "for m in ('torch', 'torchvision', 'compressai'): sys.modules[m] = None\n"
        "from splitinfer.cli import main\n"
        f"rc = main(['edge', '--bundle', {str(bundles['mshp'])!r}, '--server', "
        f"'127.0.0.1:{servers['mshp'].port}', '--images', {str(tmp_path)!r}, '--json', '--insecure'])\n"
        "assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]\n"
        "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    import json

    out = json.loads(proc.stdout)
    assert len(out["images"]) == 3 and all(r["payload_bytes"] > 0 for r in out["images"])
    assert "CPUExecutionProvider" in out["providers"]


def test_concurrent_unary_calls_are_batched(servers: dict, bundles: dict) -> None:
    encoder = EdgeEncoder(bundles["fp"])
    images, _ = eval_images(32)
    enc = encoder.encode(images)
    client = EdgeClient(f"127.0.0.1:{servers['fp'].port}", encoder.bundle)
    sizes: list[int] = []
    lock = threading.Lock()

    def call(e: object) -> None:
        r = client.infer(e)
        with lock:
            sizes.append(r.batch_size)

    threads = [threading.Thread(target=call, args=(e,)) for e in enc]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(sizes) == 32 and max(sizes) > 1
