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
    def run(self, y_hat: np.ndarray) -> np.ndarray:
        logits = self.model.decode_tail(torch.from_numpy(y_hat).to(self.device))
        return torch.softmax(logits.float(), dim=1).cpu().numpy()


class SplitInferenceService:
    """Request handling (transport-independent pieces are methods so tests and the servicer share them)."""

    def __init__(self, cfg: ServerConfig, runner: TailRunner,
                 recorder: Callable[[dict], None] | None = None) -> None:
        self.cfg = cfg
        self.recorder = recorder
        self.runner = runner
        self.limits = runner.limits
        self.decoders = futures.ThreadPoolExecutor(cfg.decode_workers, thread_name_prefix="decode")
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
        validate(req, self.limits)

        def remaining() -> float | None:
            if deadline is None:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the reply was ready")
            return left

        checksum = req.index_checksum if self.limits.prior == "mshp" else None
        t_dec = time.perf_counter()
        try:
            y_hat = self.decoders.submit(self.runner.codec.decode, req.stream, checksum).result(timeout=remaining())
        except IndexMismatchError as exc:
            raise RequestError(grpc.StatusCode.DATA_LOSS, f"index_checksum: {exc}") from exc
        except CodecError as exc:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"stream does not decode: {exc}") from exc
        except futures.TimeoutError:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while decoding") from None
        decode_ms = (time.perf_counter() - t_dec) * 1000
        if not np.isfinite(y_hat).all():
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "stream decodes to non-finite latent values")
        try:
            result = self.batcher.submit(y_hat).result(timeout=remaining())
        except OverflowError:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy: tail queue is full") from None
        except futures.TimeoutError:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded waiting for the tail") from None
        k = req.top_k or min(self.cfg.default_top_k, self.limits.num_classes)
        order = np.argsort(-result.probabilities)[:k]
        classes = self.runner.manifest["classes"]
        reply = pb.InferReply(
            request_id=req.request_id,
            top_k=[pb.Prediction(label=int(i), name=classes[i], probability=float(result.probabilities[i]))
                   for i in order],
            decode_ms=decode_ms, queue_ms=result.queue_ms, tail_ms=result.tail_ms,
            server_ms=(time.perf_counter() - t0) * 1000, stream_bytes=len(req.stream), batch_size=result.batch_size)
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
        note: dict = {}
        try:
            reply = self.handle(raw, deadline, note, client_id)
            status = "OK"
            self.counts["ok"] += 1
        except RequestError as exc:
            reply = pb.InferReply(error_code=exc.code.value[0], error_message=exc.message)
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
               "predicted": int(reply.top_k[0].label) if reply.top_k else None}
        if req is not None:
            rec |= {"request_id": req.request_id[:256], "client_id": req.client_id[:256], "tag": req.tag[:256],
                    "label": int(req.label) if req.HasField("label") else None}
        try:
            self.recorder(rec)  # type: ignore[misc]
        except Exception:  # accounting must never fail a request
            log.exception("recording a request failed")

    def infer(self, raw: bytes, context: grpc.ServicerContext) -> pb.InferReply:
        reply = self.answer(raw, self._deadline(context), context.peer())
        if reply.error_code:
            context.abort(STATUS_BY_VALUE[reply.error_code], reply.error_message)
        return reply

    def infer_stream(self, raws: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[pb.InferReply]:
        """Pipelined: up to ``stream_window`` requests of one stream are in flight (so they can share tail
        batches); replies are yielded in request order; a bad item gets an error reply, the stream goes on."""
        deadline = self._deadline(context)
        peer = context.peer()
        pending: deque[futures.Future] = deque()
        for raw in raws:
            pending.append(self.stream_pool.submit(self.answer, raw, deadline, peer))
            while len(pending) >= self.cfg.stream_window or (pending and pending[0].done()):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def get_model_info(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
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
        self.decoders.shutdown(wait=False, cancel_futures=True)
        self.stream_pool.shutdown(wait=False, cancel_futures=True)


class RunningServer:
    """A started server: ``port``, ``stop()``; used by the CLI and by tests (real server on loopback)."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.reporter = MonitorReporter(cfg.monitor, cfg.monitor_token) if cfg.monitor else None
        recorder = (lambda rec: self.reporter.report("requests", rec)) if self.reporter else None
        self.service = SplitInferenceService(cfg, TailRunner(cfg), recorder)
        opts = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes)]
        self.server = grpc.server(futures.ThreadPoolExecutor(cfg.rpc_workers, thread_name_prefix="rpc"),
                                  options=opts)
        self.server.add_generic_rpc_handlers((self.service.generic_handler(),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.server)
        self.port = self.server.add_insecure_port(f"{cfg.host}:{cfg.port}")
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
          f"{cfg.host}:{running.port} device={cfg.device} max_batch={cfg.max_batch} "
          f"max_delay_ms={cfg.max_delay_ms}", flush=True)
    done = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        print(f"signal {signum}: shutting down gracefully", flush=True)
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    done.wait()
    running.stop()
