"""Request validation: every field is checked against the served model *before* any byte is decoded.

The server never trusts the edge: a request that fails a check is answered with a precise gRPC status and a
message naming the field, and nothing is decoded from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from proto import splitinfer_pb2 as pb

MAX_DIM = 4096
MAX_TEXT = 128


class RequestError(Exception):
    """A request the server refuses: the status code to answer with and a message naming the field."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms  # advice to back off (budgets, anomaly policy)


@dataclass(frozen=True)
class Limits:
    model_id: str
    fingerprint: str
    prior: str
    latent_shape: tuple[int, ...]
    hyper_shape: tuple[int, ...]
    num_classes: int
    max_stream_bytes: int


def parse_request(raw: bytes) -> pb.InferRequest:
    req = pb.InferRequest()
    try:
        req.ParseFromString(raw)
    except Exception as exc:  # protobuf raises DecodeError and, for some inputs, other errors
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid InferRequest ({exc})") from exc
    return req


def _shape(name: str, got: list[int], want: tuple[int, ...]) -> None:
    if len(got) != len(want):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{name} must have {len(want)} dims, got {len(got)}")
    if any(d == 0 or d > MAX_DIM for d in got):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{name} {list(got)} has a dim outside 1..{MAX_DIM}")
    if tuple(got) != want:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{name} {list(got)} != served model's {list(want)}")


def validate(req: pb.InferRequest, limits: Limits) -> None:
    """Raise RequestError for the first problem found, in the order a client can fix them."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if not req.model_id:
        raise RequestError(bad, "model_id is required")
    if req.model_id != limits.model_id:
        raise RequestError(grpc.StatusCode.NOT_FOUND,
                           f"model_id {req.model_id[:80]!r} is not served here (serving {limits.model_id!r})")
    if not req.fingerprint:
        raise RequestError(bad, "fingerprint is required")
    if req.fingerprint != limits.fingerprint:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"fingerprint {req.fingerprint[:16]}... differs from the served codec's "
                           f"{limits.fingerprint[:16]}...: re-export the edge bundle from the served checkpoint")
    for name in ("request_id", "tag", "client_id"):
        if len(getattr(req, name)) > MAX_TEXT:
            raise RequestError(bad, f"{name} longer than {MAX_TEXT} characters")
    _shape("latent_shape", list(req.latent_shape), limits.latent_shape)
    if limits.prior == "mshp":
        _shape("hyper_shape", list(req.hyper_shape), limits.hyper_shape)
    elif len(req.hyper_shape):
        raise RequestError(bad, "hyper_shape must be empty for a factorized-prior model")
    n = len(req.stream)
    if n == 0:
        raise RequestError(bad, "stream is empty")
    if n > limits.max_stream_bytes:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"stream of {n} bytes exceeds the limit of {limits.max_stream_bytes}")
    if n % 4:
        raise RequestError(bad, f"stream length {n} is not a multiple of 4 (ANS streams are 32-bit words)")
    if req.HasField("label") and not 0 <= req.label < limits.num_classes:
        raise RequestError(bad, f"label {req.label} is outside 0..{limits.num_classes - 1}")
    if req.top_k > limits.num_classes:
        raise RequestError(bad, f"top_k {req.top_k} exceeds the {limits.num_classes} classes")
