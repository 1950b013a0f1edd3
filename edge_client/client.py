"""gRPC client of the edge: checks the server's model fingerprint, sends coded streams, retries idempotently.

Imports no torch. ``target`` may list several servers (``host:port,host:port``): the channel then balances
round-robin across them.
"""

from __future__ import annotations

import ipaddress
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from codec.model import Encoded
from proto import splitinfer_pb2 as pb
from proto import splitinfer_pb2_grpc as pb_grpc

from .runtime import EdgeBundle

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


class ServerMismatchError(RuntimeError):
    """The server serves another model or codec than the edge bundle."""


@dataclass(frozen=True)
class Security:
    """How the edge talks to servers: TLS (system roots or ``tls_ca``), optionally a client certificate for
    mutual TLS, and a bearer token naming this edge. Plaintext only with ``insecure=True``."""

    insecure: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = None
    server_name: str | None = None  # TLS name to verify when dialling by IP address of a name-only certificate

    def credentials(self) -> grpc.ChannelCredentials | None:
        if self.insecure:
            if self.tls_ca or self.tls_cert or self.tls_key:
                raise ValueError("--insecure contradicts --tls-ca/--tls-cert/--tls-key")
            return None
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        files = {}
        for name in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"--{name.replace('_', '-')} {path}: no such file")
            files[name] = Path(path).read_bytes() if path else None
        return grpc.ssl_channel_credentials(files["tls_ca"], files["tls_key"], files["tls_cert"])

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


PLAINTEXT = Security(insecure=True)


def _resolve(host_port: str) -> str:
    """``name:port`` -> ``a.b.c.d:port`` (gRPC's comma-separated address lists take IP addresses only)."""
    host, _, port = host_port.strip().rpartition(":")
    try:
        ipaddress.IPv4Address(host)
        return host_port.strip()
    except ValueError:
        pass
    try:
        return f"{socket.getaddrinfo(host, int(port), socket.AF_INET)[0][4][0]}:{port}"
    except (OSError, ValueError) as exc:
        raise ValueError(f"server address {host_port!r}: cannot resolve ({exc})") from exc


def channel_for(target: str, security: Security = PLAINTEXT, options: list[tuple[str, object]] | None = None
                ) -> grpc.Channel:
    """A channel to one server or, for ``host:port,host:port``, round-robin over several."""
    opts = list(options or [])
    if "," in target and not target.startswith(("ipv4:", "ipv6:")):
        target = "ipv4:" + ",".join(_resolve(hp) for hp in target.split(","))
    if target.startswith(("ipv4:", "ipv6:", "dns:")):  # several addresses, or a name with several records
        opts.append(("grpc.lb_policy_name", "round_robin"))
    creds = security.credentials()
    if creds is None:
        return grpc.insecure_channel(target, options=opts)
    if security.server_name:
        opts.append(("grpc.ssl_target_name_override", security.server_name))
    return grpc.secure_channel(target, creds, options=opts)


def build_request(info: dict, enc: Encoded, request_id: str = "", tag: str = "", top_k: int = 0,
                  label: int | None = None, client_id: str = "") -> pb.InferRequest:
    """The request for one coded image, from the bundle's ``info`` (model id, fingerprint, shapes)."""
    return pb.InferRequest(request_id=request_id, model_id=info["model_id"], fingerprint=info["fingerprint"],
                           latent_shape=info["latent_shape"], hyper_shape=info["hyper_shape"], stream=enc.data,
                           index_checksum=enc.index_checksum, top_k=top_k, tag=tag, client_id=client_id, label=label)


class EdgeClient:
    def __init__(self, target: str, bundle: EdgeBundle, timeout: float = 10.0, retries: int = 3,
                 client_id: str = "", check: bool = True, security: Security = PLAINTEXT) -> None:
        self.bundle = bundle
        self.timeout = timeout
        self.retries = retries
        self.client_id = client_id
        self.metadata = security.metadata()
        self.retries_made = 0  # attempts repeated after UNAVAILABLE / RESOURCE_EXHAUSTED
        self.retried_ok = 0  # requests answered after at least one retry
        self.channel = channel_for(target, security)
        self.stub = pb_grpc.SplitInferenceStub(self.channel)
        self.info: pb.ModelInfo | None = None
        if check:
            self.check_server()

    def check_server(self) -> pb.ModelInfo:
        info = self.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=self.timeout, wait_for_ready=True,
                                      metadata=self.metadata)
        if info.fingerprint != self.bundle.info["fingerprint"] or info.model_id != self.bundle.info["model_id"]:
            raise ServerMismatchError(
                f"server serves {info.model_id} (fingerprint {info.fingerprint[:16]}...), bundle is "
                f"{self.bundle.info['model_id']} ({self.bundle.info['fingerprint'][:16]}...)")
        self.info = info
        return info

    def request(self, enc: Encoded, request_id: str | None = None, tag: str = "", top_k: int = 0,
                label: int | None = None) -> pb.InferRequest:
        """``tag`` and ``label`` are optional experiment metadata (the monitor groups and scores by them)."""
        return build_request(self.bundle.info, enc, request_id or uuid.uuid4().hex, tag, top_k, label,
                             self.client_id)

    def send(self, req: pb.InferRequest) -> pb.InferReply:
        """Unary call; UNAVAILABLE/RESOURCE_EXHAUSTED are retried with the same request id (idempotent)."""
        delay = 0.05
        for attempt in range(self.retries + 1):
            try:
                reply = self.stub.Infer(req, timeout=self.timeout, wait_for_ready=attempt > 0, metadata=self.metadata)
                self.retried_ok += attempt > 0
                return reply
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or attempt == self.retries:
                    raise
                self.retries_made += 1
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def infer(self, enc: Encoded, **kw: object) -> pb.InferReply:
        return self.send(self.request(enc, **kw))  # type: ignore[arg-type]

    def infer_stream(self, requests: Iterable[pb.InferRequest], timeout: float | None = None
                     ) -> Iterator[pb.InferReply]:
        """One bidirectional call for many requests; ``timeout`` bounds the whole call (default: none)."""
        return self.stub.InferStream(iter(requests), timeout=timeout, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()
