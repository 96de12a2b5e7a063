"""The HTTP front end and what both front ends share: checks, the batcher, the metrics (you write this).

The contract (the grader checks each line from outside the process, over the sockets it chose):

    GET  /health    200 {"status": "ok"} while the batcher runs; 503 {"status": "not ready"} otherwise
    POST /predict   multipart/form-data, the image file in field "image"
                    -> 200 {"label": "angle-045", "probabilities": {"angle-000": 0.01, ...}}
                    -> 415 not multipart/form-data;  413 the image (or the whole request) is too large;
                       400 no file in field "image", or a file that is not an image;
                       every error as JSON {"error": "<what was wrong, and what to send instead>"}
    GET  /metrics   Prometheus text format: predict_requests_total{protocol="http"|"grpc"} counts every
                    predict request received (answered or refused); predict_batch_size (a histogram,
                    buckets BATCH_BUCKETS) observes the images of every forward pass

A bad request is the client's mistake: it gets a 4xx that says what to fix, and the service goes on serving.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.datastructures import UploadFile

from modelserver.batching import Batcher
from modelserver.model import Classifier, ImageError, Prediction, decode_image

__all__ = ["BATCH_BUCKETS", "FORM_FIELD", "Metrics", "Rejected", "Service", "build_app"]

FORM_FIELD = "image"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
FORM_OVERHEAD_BYTES = 16 * 1024  # multipart boundaries and part headers around the image itself


class Rejected(Exception):
    """A request the service refuses: the HTTP status that says why, and a message that says what to fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Metrics:
    """The service's Prometheus metrics, in a registry of their own (so tests can run several services)."""

    def __init__(self) -> None:
        # BEGIN SOLUTION: Metrics.__init__: a registry with the counter predict_requests{protocol} and the histogram predict_batch_size
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "predict_requests", "Predict requests received, answered or refused", ["protocol"],
            registry=self.registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "predict_batch_size", "Images per forward pass", buckets=BATCH_BUCKETS, registry=self.registry
        )
        # END SOLUTION

    def count_request(self, protocol: str) -> None:
        """One predict request received over `protocol` ("http" or "grpc")."""
        # BEGIN SOLUTION: Metrics.count_request: count one request of this protocol
        self.requests.labels(protocol=protocol).inc()
        # END SOLUTION

    def observe_batch(self, size: int) -> None:
        """One forward pass over `size` images (the batcher's on_batch)."""
        # BEGIN SOLUTION: Metrics.observe_batch: observe the batch size
        self.batch_size.observe(size)
        # END SOLUTION

    def render(self) -> bytes:
        """Every metric in the Prometheus text format."""
        # BEGIN SOLUTION: Metrics.render: the registry in the text format
        return generate_latest(self.registry)
        # END SOLUTION


class Service:
    """What the HTTP and gRPC front ends share: the model's input size, the batcher, the metrics, the checks."""

    def __init__(
        self, classifier: Classifier, batcher: Batcher, metrics: Metrics, max_image_bytes: int
    ) -> None:
        self.classifier, self.batcher, self.metrics = classifier, batcher, metrics
        self.max_image_bytes = max_image_bytes

    async def predict(self, data: bytes) -> Prediction:
        """Check and decode one image file, then wait for its turn in a batch; Rejected if it is refused."""
        # BEGIN SOLUTION: Service.predict: 413 above max_image_bytes, 400 if not an image, else the batcher's answer
        if len(data) > self.max_image_bytes:
            raise Rejected(
                413, f"the image is {len(data):,} bytes; this service takes at most {self.max_image_bytes:,}"
            )
        try:
            pixels = decode_image(data, size=self.classifier.image_size)
        except ImageError as error:
            raise Rejected(400, str(error)) from None
        return await self.batcher.submit(pixels)
        # END SOLUTION


def build_app(service: Service) -> FastAPI:
    """The HTTP front end of `service`, as the module doc's contract says."""
    # BEGIN SOLUTION: build_app: the routes /health, /metrics and /predict of the contract
    app = FastAPI(title="week 7 assignment classifier", docs_url=None, redoc_url=None)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not service.batcher.running:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        service.metrics.count_request("http")
        try:
            data = await _uploaded_image(request, service.max_image_bytes)
            prediction = await service.predict(data)
        except Rejected as error:
            return JSONResponse({"error": error.message}, status_code=error.status)
        return JSONResponse({"label": prediction.label, "probabilities": prediction.probabilities})

    return app
    # END SOLUTION


async def _uploaded_image(request: Request, max_image_bytes: int) -> bytes:
    """The bytes of the file in field FORM_FIELD of a multipart upload; Rejected (415, 413, 400) otherwise."""
    # BEGIN SOLUTION: _uploaded_image: check the content type and length, parse the form, read the file field
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise Rejected(
            415,
            f"send multipart/form-data with the image file in field {FORM_FIELD!r}, not "
            f"{content_type or 'no content type'!r} (curl -F '{FORM_FIELD}=@image.png' ...)",
        )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_image_bytes + FORM_OVERHEAD_BYTES:
        raise Rejected(413, f"the request is {int(length):,} bytes; images of at most {max_image_bytes:,}")
    try:
        form = await request.form(max_files=2, max_fields=8)
    except Exception as error:  # starlette's MultiPartException, or a body that is not a form at all
        raise Rejected(400, f"could not parse the multipart form: {error}") from None
    try:
        upload = form.get(FORM_FIELD)
        if not isinstance(upload, UploadFile):
            sent = ", ".join(repr(key) for key in form) or "none"
            raise Rejected(400, f"put the image file in form field {FORM_FIELD!r} (fields sent: {sent})")
        return await upload.read()
    finally:
        await form.close()
    # END SOLUTION
