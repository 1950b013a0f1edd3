"""The split-inference gRPC server: validate -> decode (worker threads) -> batch -> decoder + tail -> top-k.

Handlers receive the *raw serialized* request (no deserializer registered) and parse it themselves, so a
malformed message is answered with INVALID_ARGUMENT and the exact request size is known. The standard health
service and server reflection are registered beside the service.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from codec.ans import CodecError
from codec.model import IndexMismatchError
from monitor.reporter import MonitorReporter, new_record_id
from proto import splitinfer_pb2 as pb

from .batching import Batcher
from .protection import AnomalyDetector, Budgets, FairExecutor
from .security import TokenTable, server_credentials
from .validation import Limits, RequestError, parse_request, validate

STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SplitInference"].full_name
log = logging.getLogger("splitinfer.server")


@dataclass
class ServerConfig:
    checkpoint: str = "default-mshp"
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "cpu"
    max_batch: int = 32
    max_delay_ms: float = 5.0
    decode_workers: int = 2
    rpc_workers: int = 16
    max_message_bytes: int = 1 << 20
    max_stream_bytes: int | None = None  # default: 4 bytes per latent element + 1 KiB
    default_top_k: int = 5
    idempotency_cache: int = 10000
    stream_window: int = 32  # requests of one InferStream call processed concurrently
    torch_threads: int | None = None
    monitor: str | None = None  # monitor base URL: every request's bytes are reported there
    monitor_token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # given: clients must present a certificate signed by it (mutual TLS)
    insecure: bool = False  # plaintext must be asked for explicitly
    tokens: str | None = None  # YAML/JSON token -> client id; given: every call needs a known bearer token
    budget_bytes_per_s: float | None = None  # per-client token bucket on received bytes; None: no budget
    budget_burst_bytes: int | None = None  # bucket size; default 2 s of budget (at least one max-size message)
    anomaly_policy: str = "off"  # off | flag | deprioritize | reject, against the clean stream-size distribution
    anomaly_quantile: float = 0.995
    anomaly_margin: float = 0.10
    anomaly_backoff_ms: int = 1000  # retry-after advised with a rejected anomalous request
    max_connection_age_s: int = 300


class TailRunner:
    """The served split model's server half on the chosen device; also the model's identity and limits."""

    def __init__(self, cfg: ServerConfig) -> None:
        from models.evaluate import load_split_model
        from models.export import model_id

        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {cfg.device}: CUDA is not available on this machine")
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        model, man = load_split_model(cfg.checkpoint)
        self.codec = model.codec_model()
        self.manifest = man
        self.device = torch.device(cfg.device)
        self.model = model.to(self.device).eval()
        c, h, w = self.codec.latent_shape
        self.limits = Limits(
            model_id=model_id(man, self.codec.fingerprint), fingerprint=self.codec.fingerprint, prior=man["prior"],
            latent_shape=tuple(self.codec.latent_shape), hyper_shape=tuple(self.codec.hyper_shape or ()),
            num_classes=len(man["classes"]), max_stream_bytes=cfg.max_stream_bytes or 4 * c * h * w + 1024)

    @torch.no_grad()
    def clean_sizes(self, root: str | None = None) -> np.ndarray:
        """Real coded sizes of clean images (the package's sample test images by default) with this codec."""
        from pathlib import Path

        from models.data import load_image_folder

        root = root or str(Path(__file__).resolve().parents[1] / "splitinfer" / "sample_images")
        images = load_image_folder(root, self.model.spec.input_size, use_cache=False).images
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
        model = self.model.cpu()
        try:
            y = model.encode_latent(x)
            z = model.entropy.side_latent(y)
        finally:
            self.model.to(self.device)
        return np.array([len(self.codec.encode(y[i].numpy(), None if z is None else z[i].numpy()).data)
                         for i in range(len(y))])

    @torch.no_grad()
    def run(self, y_hat: np.ndarray) -> np.ndarray:
        logits = self.model.decode_tail(torch.from_numpy(y_hat).to(self.device))
        return torch.softmax(logits.float(), dim=1).cpu().numpy()


class SplitInferenceService:
    """Request handling (transport-independent pieces are methods so tests and the servicer share them)."""

    def __init__(self, cfg: ServerConfig, runner: TailRunner,
                 recorder: Callable[[dict], None] | None = None) -> None:
        self.cfg = cfg
        self.recorder = recorder
        self.tokens = TokenTable.load(cfg.tokens) if cfg.tokens else None
        self.budgets = None
        if cfg.budget_bytes_per_s:
            burst = cfg.budget_burst_bytes or max(2 * cfg.budget_bytes_per_s, cfg.max_message_bytes)
            self.budgets = Budgets(cfg.budget_bytes_per_s, burst)
        self.anomaly = (AnomalyDetector.calibrate(runner.clean_sizes(), cfg.anomaly_policy, cfg.anomaly_quantile,
                                                  cfg.anomaly_margin) if cfg.anomaly_policy != "off" else None)
        self.runner = runner
        self.limits = runner.limits
        self.decoders = FairExecutor(cfg.decode_workers)
        self.batcher = Batcher(runner.run, cfg.max_batch, cfg.max_delay_ms)
        self.stream_pool = futures.ThreadPoolExecutor(max(cfg.stream_window, 4), thread_name_prefix="stream")
        # (client_id, request_id) -> (digest of the request bytes, serialized reply): retries are answered from
        # here; the same id with other content is refused rather than silently answered with another reply
        self._cache: OrderedDict[tuple[str, str], tuple[bytes, bytes]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.counts = {"ok": 0, "error": 0, "cached": 0}

    # ------------------------------------------------------------------------------------------- core path
    def handle(self, raw: bytes, deadline: float | None, note: dict | None = None,
               client_id: str | None = None) -> pb.InferReply:
        """Parse, validate, decode, batch, answer. ``note`` receives the parsed request (for accounting);
        ``client_id`` is the authenticated identity, which replaces what the request claims."""
        t0 = time.perf_counter()
        req = parse_request(raw)
        if client_id is not None:
            req.client_id = client_id
        if note is not None:
            note["req"] = req
        key = (req.client_id, req.request_id)
        digest = hashlib.blake2b(raw, digest_size=16).digest() if req.request_id else b""
        if req.request_id:
            with self._cache_lock:
                cached = self._cache.get(key)
            if cached is not None:
                if cached[0] != digest:
                    raise RequestError(grpc.StatusCode.ALREADY_EXISTS,
                                       f"request_id {req.request_id[:40]!r} was already used for a different request")
                self.counts["cached"] += 1
                reply = pb.InferReply()
                reply.ParseFromString(cached[1])
                return reply
        client = req.client_id or (note or {}).get("peer", "")
        if self.budgets is not None:
            wait = self.budgets.charge(client, len(raw))
            if wait > 0:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"client {client[:40]!r} is over its byte budget ({self.budgets.rate:.0f} B/s, "
                                   f"burst {self.budgets.burst:.0f} B): retry after {wait * 1000:.0f} ms",
                                   retry_after_ms=int(wait * 1000) + 1)
        validate(req, self.limits)
        priority = 0
        why = self.anomaly.is_anomalous(len(req.stream), client) if self.anomaly is not None else None
        if why is not None:
            if note is not None:
                note["flagged"] = True
            if self.anomaly.policy == "reject":  # type: ignore[union-attr]
                raise RequestError(grpc.StatusCode.PERMISSION_DENIED, f"{why}: inputs look attacked or corrupted",
                                   retry_after_ms=self.cfg.anomaly_backoff_ms)
            priority = int(self.anomaly.policy == "deprioritize")  # type: ignore[union-attr]

        def remaining() -> float | None:
            if deadline is None:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the reply was ready")
            return left

        checksum = req.index_checksum if self.limits.prior == "mshp" else None
        t_dec = time.perf_counter()
        fut: futures.Future | None = None
        try:
            fut = self.decoders.submit(client, self.runner.codec.decode, req.stream, checksum, priority=priority)
            y_hat = fut.result(timeout=remaining())
        except IndexMismatchError as exc:
            raise RequestError(grpc.StatusCode.DATA_LOSS, f"index_checksum: {exc}") from exc
        except CodecError as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"stream does not decode: {exc}") from exc
        except (futures.TimeoutError, RequestError):
            if fut is not None:
                fut.cancel()  # still queued: a worker will skip it instead of decoding for nobody
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while decoding") from None
        except OverflowError:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy: decode queue is full",
                               retry_after_ms=100) from None
        decode_ms = (time.perf_counter() - t_dec) * 1000
        if not np.isfinite(y_hat).all():
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "stream decodes to non-finite latent values")
        fut = None
        try:
            fut = self.batcher.submit(y_hat)
            result = fut.result(timeout=remaining())
        except OverflowError:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy: tail queue is full") from None
        except (futures.TimeoutError, RequestError):
            if fut is not None:
                fut.cancel()
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded waiting for the tail") from None
        k = req.top_k or min(self.cfg.default_top_k, self.limits.num_classes)
        order = np.argsort(-result.probabilities)[:k]
        classes = self.runner.manifest["classes"]
        reply = pb.InferReply(
            request_id=req.request_id,
            top_k=[pb.Prediction(label=int(i), name=classes[i], probability=float(result.probabilities[i]))
                   for i in order],
            decode_ms=decode_ms, queue_ms=result.queue_ms, tail_ms=result.tail_ms,
            server_ms=(time.perf_counter() - t0) * 1000, stream_bytes=len(req.stream), batch_size=result.batch_size,
            flagged=bool(note and note.get("flagged")))
        if req.request_id:
            with self._cache_lock:
                self._cache[key] = (digest, reply.SerializeToString())
                while len(self._cache) > self.cfg.idempotency_cache:
                    self._cache.popitem(last=False)
        return reply

    def model_info(self) -> pb.ModelInfo:
        man = self.runner.manifest
        return pb.ModelInfo(model_id=self.limits.model_id, fingerprint=self.limits.fingerprint, arch=man["arch"],
                            prior=man["prior"], input_size=self.runner.model.spec.input_size,
                            latent_shape=list(self.limits.latent_shape), hyper_shape=list(self.limits.hyper_shape),
                            classes=man["classes"], max_stream_bytes=self.limits.max_stream_bytes,
                            max_batch=self.cfg.max_batch)

    # -------------------------------------------------------------------------------------- gRPC handlers
    @staticmethod
    def _deadline(context: grpc.ServicerContext) -> float | None:
        left = context.time_remaining()  # a call without a deadline reports a huge number, not None
        return None if left is None or left > 1e6 else time.monotonic() + left

    def answer(self, raw: bytes, deadline: float | None, peer: str = "", client_id: str | None = None
               ) -> pb.InferReply:
        """``handle`` plus accounting; never raises: a refused request becomes a reply with ``error_code``."""
        t0 = time.perf_counter()
        note: dict = {"peer": peer}
        try:
            reply = self.handle(raw, deadline, note, client_id)
            status = "OK"
            self.counts["ok"] += 1
        except RequestError as exc:
            reply = pb.InferReply(error_code=exc.code.value[0], error_message=exc.message,
                                  retry_after_ms=exc.retry_after_ms, flagged=bool(note.get("flagged")))
            status = exc.code.name
            self.counts["error"] += 1
        except Exception as exc:  # never let a request take the server down; report it as INTERNAL
            log.exception("unexpected error while answering a request")
            reply = pb.InferReply(error_code=grpc.StatusCode.INTERNAL.value[0],
                                  error_message=f"internal error: {type(exc).__name__}")
            status = "INTERNAL"
            self.counts["error"] += 1
        if self.recorder is not None:
            self._record(raw, note.get("req"), reply, status, peer, t0)
        return reply

    def _record(self, raw: bytes, req: pb.InferRequest | None, reply: pb.InferReply, status: str, peer: str,
                t0: float) -> None:
        """Bytes at the two depths the server sees: the coded payload and the exact request message."""
        rec = {"record_id": new_record_id(), "ts": time.time(), "peer": peer[:256], "status": status,
               "payload_bytes": len(req.stream) if req is not None else 0, "message_bytes": len(raw),
               "server_ms": (time.perf_counter() - t0) * 1000, "model_id": self.limits.model_id,
               "predicted": int(reply.top_k[0].label) if reply.top_k else None, "flagged": int(reply.flagged)}
        if req is not None:
            rec |= {"request_id": req.request_id[:256], "client_id": req.client_id[:256], "tag": req.tag[:256],
                    "label": int(req.label) if req.HasField("label") else None}
        try:
            self.recorder(rec)  # type: ignore[misc]
        except Exception:  # accounting must never fail a request
            log.exception("recording a request failed")

    def _identity(self, context: grpc.ServicerContext) -> str | None:
        """The authenticated client id (tokens configured), else None; aborts UNAUTHENTICATED on a bad token."""
        if self.tokens is None:
            return None
        client = self.tokens.identify(context.invocation_metadata())
        if client is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or unknown bearer token (metadata 'authorization: Bearer <token>')")
        return client

    def infer(self, raw: bytes, context: grpc.ServicerContext) -> pb.InferReply:
        client = self._identity(context)
        reply = self.answer(raw, self._deadline(context), context.peer(), client)
        if reply.error_code:
            if reply.retry_after_ms:
                context.set_trailing_metadata((("retry-after-ms", str(reply.retry_after_ms)),))
            context.abort(STATUS_BY_VALUE[reply.error_code], reply.error_message)
        return reply

    def infer_stream(self, raws: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[pb.InferReply]:
        """Pipelined: up to ``stream_window`` requests of one stream are in flight (so they can share tail
        batches); replies are yielded in request order; a bad item gets an error reply, the stream goes on."""
        client = self._identity(context)
        deadline = self._deadline(context)
        peer = context.peer()
        pending: deque[futures.Future] = deque()
        for raw in raws:
            pending.append(self.stream_pool.submit(self.answer, raw, deadline, peer, client))
            while len(pending) >= self.cfg.stream_window or (pending and pending[0].done()):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def get_model_info(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        self._identity(context)
        return self.model_info()

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Infer": grpc.unary_unary_rpc_method_handler(
                self.infer, request_deserializer=None, response_serializer=pb.InferReply.SerializeToString),
            "InferStream": grpc.stream_stream_rpc_method_handler(
                self.infer_stream, request_deserializer=None, response_serializer=pb.InferReply.SerializeToString),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                self.get_model_info, request_deserializer=pb.ModelInfoRequest.FromString,
                response_serializer=pb.ModelInfo.SerializeToString),
        })

    def close(self) -> None:
        self.batcher.stop()
        self.decoders.shutdown()
        self.stream_pool.shutdown(wait=False, cancel_futures=True)


class RunningServer:
    """A started server: ``port``, ``stop()``; used by the CLI and by tests (real server on loopback)."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        creds = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca, cfg.insecure)  # fail before loading
        self.reporter = MonitorReporter(cfg.monitor, cfg.monitor_token) if cfg.monitor else None
        recorder = (lambda rec: self.reporter.report("requests", rec)) if self.reporter else None
        self.service = SplitInferenceService(cfg, TailRunner(cfg), recorder)
        # connections are recycled every few minutes so clients re-resolve names and reach replicas added later
        opts = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.max_connection_age_ms", cfg.max_connection_age_s * 1000),
                ("grpc.max_connection_age_grace_ms", 30_000)]
        self.server = grpc.server(futures.ThreadPoolExecutor(cfg.rpc_workers, thread_name_prefix="rpc"),
                                  options=opts)
        self.server.add_generic_rpc_handlers((self.service.generic_handler(),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.server)
        address = f"{cfg.host}:{cfg.port}"
        self.tls = creds is not None
        self.port = (self.server.add_secure_port(address, creds) if creds is not None
                     else self.server.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"cannot bind {cfg.host}:{cfg.port}")
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float = 5.0) -> None:
        """Graceful: report NOT_SERVING, finish in-flight calls for up to ``grace`` seconds, then close."""
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace).wait()
        self.service.close()
        if self.reporter is not None:
            self.reporter.close()


def serve_forever(cfg: ServerConfig) -> None:
    running = RunningServer(cfg)
    info = running.service.model_info()
    print(f"serving {info.model_id} ({info.prior}, fingerprint {info.fingerprint[:16]}...) on "
          f"{cfg.host}:{running.port} ({'mutual TLS' if cfg.tls_client_ca else 'TLS' if running.tls else 'PLAINTEXT'}"
          f"{', tokens' if cfg.tokens else ''}) device={cfg.device} max_batch={cfg.max_batch} "
          f"max_delay_ms={cfg.max_delay_ms}", flush=True)
    done = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        print(f"signal {signum}: shutting down gracefully", flush=True)
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    done.wait()
    running.stop()
