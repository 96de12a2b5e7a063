"""Public tests of the HTTP app and the gRPC servicer, in process: the app through httpx's ASGI transport, the
servicer on a gRPC server listening on a Unix socket in a temporary folder (as the grader's does)."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from modelserver.app import Metrics, Service, build_app
from modelserver.batching import Batcher
from modelserver.grpc_api import SERVICE_NAME, load_stubs
from modelserver.grpc_service import add_classifier_servicer
from modelserver.model import Classifier, decode_image
from prometheus_client.parser import text_string_to_metric_families


async def _with_service(
    classifier: Classifier, body: Callable[[Service, httpx.AsyncClient], Awaitable[Any]]
) -> Any:
    metrics = Metrics()
    batcher = Batcher(classifier.predict, 8, 5, on_batch=metrics.observe_batch)
    service = Service(classifier, batcher, metrics, max_image_bytes=2048)
    await batcher.start()
    transport = httpx.ASGITransport(app=build_app(service))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            return await body(service, client)
    finally:
        await batcher.stop()


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_predict_answers_with_the_models_prediction(classifier: Classifier, pngs: list[bytes]) -> None:
    async def body(service: Service, client: httpx.AsyncClient) -> list[httpx.Response]:
        return [await client.post("/predict", files={"image": ("x.png", png, "image/png")}) for png in pngs]

    responses = asyncio.run(_with_service(classifier, body))
    expected = classifier.predict([decode_image(png, size=classifier.image_size) for png in pngs])
    for response, want in zip(responses, expected, strict=True):
        assert response.status_code == 200
        assert response.json() == {"label": want.label, "probabilities": want.probabilities}


def test_bad_input_gets_its_4xx_with_a_reason(classifier: Classifier, pngs: list[bytes]) -> None:
    async def body(service: Service, client: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await client.post("/predict", files={"image": ("x.png", b"not an image", "image/png")}),
            await client.post("/predict", files={"file": ("x.png", pngs[0], "image/png")}),
            await client.post("/predict", content=pngs[0], headers={"content-type": "image/png"}),
            await client.post("/predict", files={"image": ("x.png", b"\x89PNG" + bytes(4096), "image/png")}),
            await client.post("/predict", files={"image": ("x.png", pngs[0], "image/png")}),
        ]

    *bad, good = asyncio.run(_with_service(classifier, body))
    assert [r.status_code for r in bad] == [400, 400, 415, 413]
    assert all(type(r.json()["error"]) is str for r in bad)
    assert good.status_code == 200, "the service goes on serving after bad requests"


def test_health_and_the_request_counter(classifier: Classifier, pngs: list[bytes]) -> None:
    async def body(service: Service, client: httpx.AsyncClient) -> tuple:
        health = await client.get("/health")
        before = _samples((await client.get("/metrics")).text)
        await client.post("/predict", files={"image": ("x.png", pngs[0], "image/png")})
        await client.post("/predict", files={"image": ("x.png", b"junk", "image/png")})
        after = _samples((await client.get("/metrics")).text)
        return health, before, after

    health, before, after = asyncio.run(_with_service(classifier, body))
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    key = ("predict_requests_total", (("protocol", "http"),))
    assert after[key] - before.get(key, 0.0) == 2, "one count per predict request, answered or refused"
    assert after[("predict_batch_size_sum", ())] - before.get(("predict_batch_size_sum", ()), 0.0) == 1


def test_grpc_predict_and_health_over_a_unix_socket(classifier: Classifier, pngs: list[bytes]) -> None:
    pb2, pb2_grpc = load_stubs(Path(tempfile.mkdtemp(prefix="stubs-")))

    async def body(service: Service, client: httpx.AsyncClient) -> tuple:
        server = grpc.aio.server()
        await add_classifier_servicer(server, service, pb2, pb2_grpc)
        socket = Path(tempfile.mkdtemp(prefix="grpc-")) / "grpc.sock"
        server.add_insecure_port(f"unix:{socket}")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
                reply = await pb2_grpc.ClassifierStub(channel).Predict(pb2.PredictRequest(image=pngs[0]))
                try:
                    await pb2_grpc.ClassifierStub(channel).Predict(pb2.PredictRequest(image=b"junk"))
                    refused = None
                except grpc.aio.AioRpcError as error:
                    refused = error.code()
                check = health_pb2_grpc.HealthStub(channel).Check
                status = (await check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))).status
            answer = (await client.post("/predict", files={"image": ("x.png", pngs[0], "image/png")})).json()
        finally:
            await server.stop(None)
        return reply, refused, status, answer

    reply, refused, status, answer = asyncio.run(_with_service(classifier, body))
    assert reply.label == answer["label"], "gRPC and HTTP answer the same for the same image"
    assert all(abs(p - answer["probabilities"][name]) < 1e-6 for name, p in reply.probabilities.items())
    assert refused == grpc.StatusCode.INVALID_ARGUMENT
    assert status == health_pb2.HealthCheckResponse.SERVING
