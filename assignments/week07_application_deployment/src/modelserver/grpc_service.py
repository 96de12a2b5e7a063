"""The gRPC front end (you write this): Classifier/Predict of classifier.proto and the standard health service.

    effdl.assignment07.Classifier/Predict   PredictRequest{image: PNG bytes} -> PredictReply{label, probabilities}
                                            INVALID_ARGUMENT (with the reason) for what HTTP answers with 4xx
    grpc.health.v1.Health/Check             SERVING for "" and for SERVICE_NAME once the servicer is added

It shares `app.Service` with HTTP: the same checks, the same batcher (gRPC and HTTP requests may share a
batch), the same metrics, counted with protocol="grpc". For the same image it answers exactly what HTTP does.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from modelserver.app import Rejected, Service
from modelserver.grpc_api import SERVICE_NAME

__all__ = ["add_classifier_servicer"]


async def add_classifier_servicer(
    server: grpc.aio.Server, service: Service, pb2: ModuleType, pb2_grpc: ModuleType
) -> None:
    """Register Classifier (answered by `service`) and the health service (SERVING) on `server`; `pb2` and
    `pb2_grpc` are the stubs of classifier.proto (`grpc_api.load_stubs`)."""

    # BEGIN SOLUTION: add_classifier_servicer: a ClassifierServicer whose Predict counts, calls service.predict and aborts with INVALID_ARGUMENT on Rejected; plus the health service
    class ClassifierServicer(pb2_grpc.ClassifierServicer):
        async def Predict(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802 (the .proto's)
            service.metrics.count_request("grpc")
            try:
                prediction = await service.predict(request.image)
            except Rejected as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)
            return pb2.PredictReply(label=prediction.label, probabilities=prediction.probabilities)

    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    pb2_grpc.add_ClassifierServicer_to_server(ClassifierServicer(), server)
    # END SOLUTION
