"""The classifier as a service: HTTP (FastAPI on uvicorn) and gRPC in one process, one dynamic batcher.

    python -m week07_application_deployment.serve --model build/week07/classifier.pt2 \
        --http-port 8000 --grpc-port 50051 --max-batch 32 --max-wait-ms 5

HTTP:  POST /predict   multipart/form-data, the image in field `file` -> {"label", "probabilities"}
       GET  /health    200 while the process runs (liveness)
       GET  /ready     200 once the model is loaded and the batcher runs, 503 before and while draining
       GET  /metrics   Prometheus text: requests by endpoint and status, latency, batch sizes, queue depth
gRPC:  effdl.week07.Classifier/Predict (classifier.proto), grpc.health.v1.Health/Check

Both front ends submit decoded images to the same DynamicBatcher, whose one worker thread runs the exported
model. On SIGTERM or SIGINT the server stops accepting (listening sockets closed, /ready 503, gRPC health
NOT_SERVING), answers every request already received, then exits 0. Port 0 asks the OS for a free port;
--ready-file receives the ports actually bound, as JSON, once the model is loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.errors import EffdlError
from common.serving.batcher import BatchingConfig, DynamicBatcher, QueueFullError
from week07_application_deployment.classifier import Classifier, Prediction, load_classifier
from week07_application_deployment.grpc_stubs import SERVICE_NAME, load_stubs
from week07_application_deployment.images import ImageRejected, decode_image

__all__ = ["Metrics", "PortInUseError", "ServiceConfig", "ServiceState", "build_app", "main", "serve"]

log = logging.getLogger("week07.serve")

FORM_FIELD = "file"
FORM_OVERHEAD_BYTES = 16 * 1024  # multipart boundaries and part headers around the image itself
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ENDPOINTS = frozenset({"/predict", "/health", "/ready", "/metrics"})  # label values stay bounded


class PortInUseError(EffdlError, OSError):
    """The port asked for is taken by another process."""


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the server process is started with (the command line maps onto it)."""

    model: Path
    host: str = "127.0.0.1"
    http_port: int = 8000  # 0: any free port (see ready_file)
    grpc_port: int | None = 50051  # 0: any free port; None: no gRPC server
    max_batch_size: int = 32  # 1 = no batching, the baseline
    max_wait_ms: float = 5.0
    max_queue: int = 4096
    max_image_bytes: int = 1 << 20  # uploads above this size: 413
    max_pixels: int = 4_000_000  # images above this many pixels: 413 (checked before decoding)
    torch_threads: int = 1  # intra-op threads of the inference worker; the event loop needs a core too
    graceful_timeout_s: float = 30.0
    ready_file: Path | None = None

    def __post_init__(self) -> None:
        for name in ("http_port", "grpc_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port < 65536:
                raise ValueError(f"{name} must be in 0..65535 (0: any free port), got {port}")
        if self.max_image_bytes < 1 or self.max_pixels < 1 or self.torch_threads < 1:
            raise ValueError("max_image_bytes, max_pixels and torch_threads must be >= 1")

    @property
    def batching(self) -> BatchingConfig:
        return BatchingConfig(self.max_batch_size, self.max_wait_ms, self.max_queue)


class Metrics:
    """The service's Prometheus metrics, in a registry of their own (several servers can share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "classifier_requests", "Requests answered, by endpoint and status", ["endpoint", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "classifier_request_latency_seconds", "Time from request to response headers, by endpoint",
            ["endpoint"], buckets=LATENCY_BUCKETS_S, registry=self.registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "classifier_batch_size", "Images per forward pass", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.queue_depth = Gauge(
            "classifier_queue_depth", "Requests waiting for the inference worker", registry=self.registry
        )

    def observe(self, endpoint: str, status: str, seconds: float) -> None:
        """Count one answered request and its latency."""
        self.requests.labels(endpoint=endpoint, status=status).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)


class ServiceState:
    """What the front ends share: the config, the metrics, the model and its batcher, the lifecycle."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.classifier: Classifier | None = None
        self.batcher: DynamicBatcher[torch.Tensor, Prediction] | None = None
        self.draining = False

    def not_ready_reason(self) -> str | None:
        """None when ready; else why not, in words."""
        if self.draining:
            return "shutting down: finishing the requests in flight"
        if self.classifier is None:
            return f"loading the model from {self.config.model}"
        if self.batcher is None or not self.batcher.running:
            return "the inference worker is not running"
        return None

    async def start_model(self) -> None:
        """Load the model (in a thread: the HTTP server answers /health meanwhile), then start the batcher."""
        torch.set_num_threads(self.config.torch_threads)
        self.classifier = await asyncio.to_thread(load_classifier, self.config.model)
        self.batcher = DynamicBatcher(
            self.classifier.predict,
            self.config.batching,
            on_batch=self.metrics.batch_size.observe,
            on_queue_depth=self.metrics.queue_depth.set,
        )
        await self.batcher.start()

    async def predict(self, data: bytes) -> Prediction:
        """Decode and check one image file, then wait for its turn in a batch."""
        if self.classifier is None or self.batcher is None:
            raise ImageRejected(503, self.not_ready_reason() or "not ready")
        if len(data) > self.config.max_image_bytes:
            raise ImageRejected(
                413,
                f"the image file is {len(data):,} bytes; this server takes at most "
                f"{self.config.max_image_bytes:,} bytes (--max-image-bytes)",
            )
        pixels = decode_image(data, size=self.classifier.image_size, max_pixels=self.config.max_pixels)
        try:
            return await self.batcher.submit(pixels)
        except QueueFullError as error:
            raise ImageRejected(503, str(error)) from None


# ----------------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------------


class MetricsMiddleware:
    """Pure ASGI middleware: counts every response by endpoint and status when its headers go out, before
    the client can read them, so a client that got N answers finds the counters N higher."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.observe(endpoint, str(message["status"]), time.perf_counter() - start)
            await send(message)

        await self.app(scope, receive, send_counted)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def build_app(state: ServiceState) -> FastAPI:
    """The HTTP front end over a ServiceState."""
    app = FastAPI(title="week 7 classifier", docs_url=None, redoc_url=None)
    config = state.config

    @app.get("/health")
    async def health_check() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        reason = state.not_ready_reason()
        if reason is not None:
            return JSONResponse({"ready": False, "reason": reason}, status_code=503)
        return JSONResponse({"ready": True})

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            return _error(
                415,
                f"POST /predict takes multipart/form-data with the image in field {FORM_FIELD!r}; got "
                f"content type {content_type or '(none)'!r} (curl -F '{FORM_FIELD}=@image.png' ...)",
            )
        length = request.headers.get("content-length")
        if length is None:
            return _error(411, "send a Content-Length header: uploads without one are not accepted")
        if int(length) > config.max_image_bytes + FORM_OVERHEAD_BYTES:
            return _error(
                413,
                f"the request is {int(length):,} bytes; this server takes images of at most "
                f"{config.max_image_bytes:,} bytes (--max-image-bytes)",
            )
        try:
            form = await request.form(max_files=4, max_fields=16)
        except Exception as error:  # starlette's MultiPartException, or a malformed body
            return _error(400, f"could not parse the multipart form: {error}")
        upload = form.get(FORM_FIELD)
        if not isinstance(upload, UploadFile):
            got = ", ".join(repr(k) for k in form.keys()) or "none"
            what = "is a text value, not a file" if upload is not None else f"is missing (fields sent: {got})"
            await form.close()
            return _error(422, f"form field {FORM_FIELD!r} must hold the image file, but it {what}")
        data = await upload.read()
        await form.close()
        try:
            prediction = await state.predict(data)
        except ImageRejected as error:
            return _error(error.status, error.message)
        return JSONResponse({"label": prediction.label, "probabilities": prediction.probabilities})

    return MetricsMiddleware(app, state.metrics)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------
# gRPC
# ----------------------------------------------------------------------------------------------------


def add_grpc_services(server: grpc.aio.Server, state: ServiceState) -> health.aio.HealthServicer:
    """Register Classifier and the standard health service on a gRPC server; return the health servicer."""
    pb2, pb2_grpc = load_stubs()
    metrics = state.metrics

    class ClassifierServicer(pb2_grpc.ClassifierServicer):
        async def Predict(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
            start = time.perf_counter()
            try:
                prediction = await state.predict(request.image)
            except ImageRejected as error:
                code = (
                    grpc.StatusCode.UNAVAILABLE if error.status == 503 else grpc.StatusCode.INVALID_ARGUMENT
                )
                metrics.observe("grpc:Predict", code.name, time.perf_counter() - start)
                await context.abort(code, error.message)
            metrics.observe("grpc:Predict", grpc.StatusCode.OK.name, time.perf_counter() - start)
            return pb2.PredictReply(label=prediction.label, probabilities=prediction.probabilities)

    pb2_grpc.add_ClassifierServicer_to_server(ClassifierServicer(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return health_servicer


# ----------------------------------------------------------------------------------------------------
# The process
# ----------------------------------------------------------------------------------------------------


def bind_socket(host: str, port: int, what: str) -> socket.socket:
    """A listening TCP socket, or a PortInUseError that names the port and the fix."""
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP. Without
    # it, Nagle's algorithm holds a response's body until the client acknowledges its headers, which a client
    # delays by up to 40 ms: every HTTP answer took 40 ms longer.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart reuses a port in TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise PortInUseError(
                f"{what} port {port} on {host} is already in use by another process; stop it, or pass "
                f"another --{what.lower()}-port (0 picks any free port)"
            ) from None
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: serve() decides the order of shutdown (both front ends
    stop accepting, in-flight requests finish, then the batcher stops)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(
    config: ServiceConfig, *, on_ready: Callable[[dict[str, int]], Awaitable[None]] | None = None
) -> int:
    """Run the service until SIGTERM/SIGINT; return the exit code (0 after a graceful shutdown)."""
    http_sock = bind_socket(config.host, config.http_port, "HTTP")
    grpc_server: grpc.aio.Server | None = None
    ports = {"http": http_sock.getsockname()[1]}
    state = ServiceState(config)
    if config.grpc_port is not None:
        # gRPC binds by address; probe the port first so a taken one gets the same clear error as HTTP.
        if config.grpc_port:
            bind_socket(config.host, config.grpc_port, "gRPC").close()
        grpc_server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", config.max_image_bytes + 1024)]
        )
        health_servicer = add_grpc_services(grpc_server, state)
        ports["grpc"] = grpc_server.add_insecure_port(f"{config.host}:{config.grpc_port}")
        if not ports["grpc"]:
            raise PortInUseError(f"gRPC could not bind {config.host}:{config.grpc_port}")

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    server = _Uvicorn(
        uvicorn.Config(
            build_app(state),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=config.graceful_timeout_s,
        )
    )
    http_task = asyncio.create_task(server.serve(sockets=[http_sock]))
    if grpc_server is not None:
        await grpc_server.start()
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        await state.start_model()
    except EffdlError:
        server.should_exit = True
        await http_task
        raise
    if grpc_server is not None:
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if on_ready is not None:
        await on_ready(ports)
    print(f"ready: {json.dumps(ports)}", flush=True)

    await stop.wait()
    print("shutting down: no new connections; finishing the requests in flight", flush=True)
    state.draining = True
    if grpc_server is not None:
        await health_servicer.enter_graceful_shutdown()
    server.should_exit = True  # uvicorn closes its socket, then waits for open connections to finish
    waits: list[Awaitable[Any]] = [http_task]
    if grpc_server is not None:
        waits.append(grpc_server.stop(grace=config.graceful_timeout_s))
    await asyncio.gather(*waits)
    assert state.batcher is not None
    await state.batcher.stop()  # nothing is queued any more: both front ends have answered everything
    print("stopped", flush=True)
    return 0


def _write_ready_file(path: Path) -> Callable[[dict[str, int]], Awaitable[None]]:
    async def write(ports: dict[str, int]) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({**ports, "pid": os.getpid()}))
        tmp.replace(path)  # atomic: a reader never sees half a file

    return write


def build_parser() -> argparse.ArgumentParser:
    """The command line of the server."""
    parser = argparse.ArgumentParser(
        prog="python -m week07_application_deployment.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = ServiceConfig(model=Path())
    parser.add_argument("--model", required=True, type=Path, help="exported model file (train.py --out)")
    parser.add_argument("--host", default=d.host)
    parser.add_argument("--http-port", type=int, default=d.http_port, help="0: any free port")
    parser.add_argument("--grpc-port", type=int, default=d.grpc_port, help="0: any free port; -1: no gRPC")
    parser.add_argument("--max-batch", type=int, default=d.max_batch_size, help="1: no batching (baseline)")
    parser.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms)
    parser.add_argument("--max-queue", type=int, default=d.max_queue)
    parser.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes)
    parser.add_argument("--max-pixels", type=int, default=d.max_pixels)
    parser.add_argument("--threads", type=int, default=d.torch_threads, help="torch threads for inference")
    parser.add_argument("--graceful-timeout", type=float, default=d.graceful_timeout_s)
    parser.add_argument("--ready-file", type=Path, help="write the bound ports here (JSON) once ready")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and serve; problems a user can fix exit 2 with one line."""
    args = build_parser().parse_args(argv)
    try:
        config = ServiceConfig(
            model=args.model, host=args.host, http_port=args.http_port,
            grpc_port=None if args.grpc_port < 0 else args.grpc_port,
            max_batch_size=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
            max_image_bytes=args.max_image_bytes, max_pixels=args.max_pixels, torch_threads=args.threads,
            graceful_timeout_s=args.graceful_timeout, ready_file=args.ready_file,
        )  # fmt: skip
        config.batching  # noqa: B018  (validates the batching settings now, with the others)
        on_ready = _write_ready_file(config.ready_file) if config.ready_file else None
        return asyncio.run(serve(config, on_ready=on_ready))
    except (EffdlError, ValueError) as error:
        print(f"serve: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
