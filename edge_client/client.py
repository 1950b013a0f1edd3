"""gRPC client of the edge: checks the server's model fingerprint, sends coded streams, retries idempotently.

Imports no torch. ``target`` may list several servers (``host:port,host:port``): the channel then balances
round-robin across them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator

import grpc

from codec.model import Encoded
from proto import splitinfer_pb2 as pb
from proto import splitinfer_pb2_grpc as pb_grpc

from .runtime import EdgeBundle

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


class ServerMismatchError(RuntimeError):
    """The server serves another model or codec than the edge bundle."""


def channel_for(target: str, options: list[tuple[str, object]] | None = None) -> grpc.Channel:
    opts = list(options or [])
    if "," in target:
        target = "ipv4:" + target if not target.startswith(("ipv4:", "ipv6:", "dns:")) else target
        opts.append(("grpc.lb_policy_name", "round_robin"))
    return grpc.insecure_channel(target, options=opts)


class EdgeClient:
    def __init__(self, target: str, bundle: EdgeBundle, timeout: float = 10.0, retries: int = 3,
                 client_id: str = "", check: bool = True) -> None:
        self.bundle = bundle
        self.timeout = timeout
        self.retries = retries
        self.client_id = client_id
        self.channel = channel_for(target)
        self.stub = pb_grpc.SplitInferenceStub(self.channel)
        self.info: pb.ModelInfo | None = None
        if check:
            self.check_server()

    def check_server(self) -> pb.ModelInfo:
        info = self.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=self.timeout, wait_for_ready=True)
        if info.fingerprint != self.bundle.info["fingerprint"] or info.model_id != self.bundle.info["model_id"]:
            raise ServerMismatchError(
                f"server serves {info.model_id} (fingerprint {info.fingerprint[:16]}...), bundle is "
                f"{self.bundle.info['model_id']} ({self.bundle.info['fingerprint'][:16]}...)")
        self.info = info
        return info

    def request(self, enc: Encoded, request_id: str | None = None, tag: str = "", top_k: int = 0,
                label: int | None = None) -> pb.InferRequest:
        """``tag`` and ``label`` are optional experiment metadata (the monitor groups and scores by them)."""
        info = self.bundle.info
        return pb.InferRequest(request_id=request_id or uuid.uuid4().hex, model_id=info["model_id"],
                               fingerprint=info["fingerprint"], latent_shape=info["latent_shape"],
                               hyper_shape=info["hyper_shape"], stream=enc.data, index_checksum=enc.index_checksum,
                               top_k=top_k, tag=tag, client_id=self.client_id, label=label)

    def send(self, req: pb.InferRequest) -> pb.InferReply:
        """Unary call; UNAVAILABLE/RESOURCE_EXHAUSTED are retried with the same request id (idempotent)."""
        delay = 0.05
        for attempt in range(self.retries + 1):
            try:
                return self.stub.Infer(req, timeout=self.timeout, wait_for_ready=attempt > 0)
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or attempt == self.retries:
                    raise
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def infer(self, enc: Encoded, **kw: object) -> pb.InferReply:
        return self.send(self.request(enc, **kw))  # type: ignore[arg-type]

    def infer_stream(self, requests: Iterable[pb.InferRequest], timeout: float | None = None
                     ) -> Iterator[pb.InferReply]:
        """One bidirectional call for many requests; ``timeout`` bounds the whole call (default: none)."""
        return self.stub.InferStream(iter(requests), timeout=timeout)

    def close(self) -> None:
        self.channel.close()
