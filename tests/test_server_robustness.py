"""Bad input gets the right status and a message naming the problem; fuzzing neither crashes nor leaks."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable

import grpc
import pytest

from edge_client.client import EdgeClient
from edge_client.runtime import EdgeEncoder
from proto import splitinfer_pb2 as pb

from .conftest import eval_images

INFER = "/splitinfer.v1.SplitInference/Infer"
STREAM = "/splitinfer.v1.SplitInference/InferStream"
C = grpc.StatusCode


@pytest.fixture(scope="module")
def valid(bundles: dict, servers: dict) -> tuple[pb.InferRequest, grpc.Channel, EdgeClient]:
    encoder = EdgeEncoder(bundles["mshp"])
    client = EdgeClient(f"127.0.0.1:{servers['mshp'].port}", encoder.bundle, retries=0)
    images, _ = eval_images(1)
    req = client.request(encoder.encode(images)[0])
    req.request_id = ""  # no idempotency cache: every mutated copy below must be validated on its own
    channel = grpc.insecure_channel(f"127.0.0.1:{servers['mshp'].port}",
                                    options=[("grpc.max_send_message_length", 8 << 20)])
    return req, channel, client


def _mut(f: Callable[[pb.InferRequest], None]) -> Callable[[pb.InferRequest], bytes]:
    def apply(req: pb.InferRequest) -> bytes:
        r = pb.InferRequest()
        r.CopyFrom(req)
        f(r)
        return r.SerializeToString()
    return apply


def _set(field: str, value: object) -> Callable[[pb.InferRequest], bytes]:
    def f(r: pb.InferRequest) -> None:
        if isinstance(value, list):
            getattr(r, field)[:] = value
        else:
            setattr(r, field, value)
    return _mut(f)


BAD = {
    "truncated stream": (_mut(lambda r: setattr(r, "stream", r.stream[: len(r.stream) // 2 // 4 * 4])),
                         {C.INVALID_ARGUMENT, C.DATA_LOSS}, "stream|index"),
    "random bytes stream": (_mut(lambda r: setattr(r, "stream", random.Random(1).randbytes(len(r.stream)))),
                            {C.INVALID_ARGUMENT, C.DATA_LOSS}, "stream|index"),
    "wrong fingerprint": (_set("fingerprint", "0" * 64), {C.FAILED_PRECONDITION}, "fingerprint"),
    "missing fingerprint": (_set("fingerprint", ""), {C.INVALID_ARGUMENT}, "fingerprint is required"),
    "wrong model id": (_set("model_id", "resnet-fp-other"), {C.NOT_FOUND}, "model_id"),
    "missing model id": (_set("model_id", ""), {C.INVALID_ARGUMENT}, "model_id is required"),
    "oversized latent shape": (_set("latent_shape", [24, 16, 32]), {C.INVALID_ARGUMENT}, "latent_shape"),
    "huge dims": (_set("latent_shape", [24, 2**31, 16]), {C.INVALID_ARGUMENT}, "latent_shape"),
    "zero dim": (_set("latent_shape", [24, 0, 16]), {C.INVALID_ARGUMENT}, "latent_shape"),
    "two dims": (_set("latent_shape", [24, 256]), {C.INVALID_ARGUMENT}, "latent_shape must have 3 dims"),
    "missing hyper shape": (_set("hyper_shape", []), {C.INVALID_ARGUMENT}, "hyper_shape"),
    "zero-length stream": (_set("stream", b""), {C.INVALID_ARGUMENT}, "stream is empty"),
    "stream not word aligned": (_mut(lambda r: setattr(r, "stream", r.stream + b"\x01")), {C.INVALID_ARGUMENT},
                                "multiple of 4"),
    "stream over the latent cap": (_set("stream", b"\x01" * 40000), {C.RESOURCE_EXHAUSTED}, "exceeds the limit"),
    "oversized message": (_set("stream", b"\x01" * (2 << 20)), {C.RESOURCE_EXHAUSTED}, ""),
    "index checksum flipped": (_mut(lambda r: setattr(r, "index_checksum", r.index_checksum ^ 1)),
                               {C.DATA_LOSS}, "index_checksum"),
    "top_k above classes": (_set("top_k", 11), {C.INVALID_ARGUMENT}, "top_k"),
    "tag too long": (_set("tag", "x" * 500), {C.INVALID_ARGUMENT}, "tag"),
    "request id reused for other content": (_set("request_id", "used-once"), {C.ALREADY_EXISTS}, "already used"),
    "not a protobuf": (lambda r: b"\xff\xff\xff\xff\x0f garbage", {C.INVALID_ARGUMENT}, "not a valid InferRequest"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_gets_its_status(kind: str, valid: tuple) -> None:
    req, channel, _ = valid
    make, codes, pattern = BAD[kind]
    call = channel.unary_unary(INFER, request_serializer=None, response_deserializer=pb.InferReply.FromString)
    if kind == "request id reused for other content":
        first = pb.InferRequest()
        first.CopyFrom(req)
        first.request_id, first.tag = "used-once", "first"
        call(first.SerializeToString(), timeout=60)
    with pytest.raises(grpc.RpcError) as err:
        call(make(req), timeout=60)
    assert err.value.code() in codes, (kind, err.value.code(), err.value.details())
    import re

    assert re.search(pattern, err.value.details() or ""), err.value.details()
    assert call(req.SerializeToString(), timeout=60).top_k  # and the server keeps serving


def test_expired_deadline_is_deadline_exceeded(valid: tuple) -> None:
    req, channel, _ = valid
    call = channel.unary_unary(INFER, request_serializer=None, response_deserializer=pb.InferReply.FromString)
    with pytest.raises(grpc.RpcError) as err:
        call(req.SerializeToString(), timeout=0.0001)
    assert err.value.code() == C.DEADLINE_EXCEEDED


def test_bad_items_in_a_stream_get_error_replies(valid: tuple) -> None:
    req, _, client = valid
    bad = pb.InferRequest()
    bad.CopyFrom(req)
    bad.fingerprint = "f" * 64
    replies = list(client.infer_stream([req, bad, req]))
    assert [r.error_code for r in replies] == [0, C.FAILED_PRECONDITION.value[0], 0]
    assert "fingerprint" in replies[1].error_message


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _mutate(raw: bytes, rng: random.Random) -> bytes:
    b = bytearray(raw)
    kind = rng.randrange(6)
    if kind == 0:  # flip bits anywhere in the message
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncate
        b = b[: rng.randrange(len(b))]
    elif kind == 2:  # insert random bytes
        pos = rng.randrange(len(b))
        b[pos:pos] = rng.randbytes(rng.randint(1, 64))
    elif kind == 3:  # flip bits inside the stream only (framing stays valid: deepest decode path)
        start = raw.find(b"\x32")  # field 6 (stream) tag; falls back to anywhere
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(max(start, 0), len(b))] ^= 1 << rng.randrange(8)
    elif kind == 4:  # duplicate a chunk
        i, j = sorted(rng.randrange(len(b)) for _ in range(2))
        b[j:j] = b[i:j][:256]
    else:  # pure noise
        b = bytearray(rng.randbytes(rng.randint(0, 300)))
    return bytes(b)


def test_fuzz_10000_mutated_messages(valid: tuple, servers: dict) -> None:
    req, channel, _ = valid
    rng = random.Random(1234)
    raw = req.SerializeToString()
    stream = channel.stream_stream(STREAM, request_serializer=None, response_deserializer=pb.InferReply.FromString)
    unary = channel.unary_unary(INFER, request_serializer=None, response_deserializer=pb.InferReply.FromString)
    threads_before = threading.active_count()
    sent = answered = 0
    rss_after_warmup = 0.0
    for round_ in range(20):
        batch = [_mutate(raw, rng) for _ in range(495)]
        replies = list(stream(iter(batch), timeout=120))
        sent += len(batch)
        answered += len(replies)
        assert len(replies) == len(batch)
        for _ in range(5):  # some unary calls too: each must end with a reply or a status, never hang
            sent += 1
            try:
                unary(_mutate(raw, rng), timeout=60)
            except grpc.RpcError as exc:
                assert exc.code() != C.UNKNOWN
            answered += 1
        if round_ == 1:
            rss_after_warmup = _rss_mb()
    assert sent >= 10000 and answered == sent
    assert unary(raw, timeout=60).top_k  # still serving
    assert _rss_mb() - rss_after_warmup < 100, "memory grew by >100 MB over 9,000 fuzzed messages"
    assert threading.active_count() <= threads_before + 40
    assert servers["mshp"].service.counts["error"] > 0
