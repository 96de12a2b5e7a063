"""Task health: GET /health says 200 {"status": "ok"} once serving; the gRPC health service says SERVING."""

from __future__ import annotations

import served
from grpc_health.v1 import health_pb2

from common.grading.client import Submission


def test_http_and_grpc_health_say_serving(submission: Submission, model) -> None:
    with served.running(submission, model[0]) as server:
        response = server.request("GET", "/health")
        assert response.status_code == 200, f"GET /health answered {response.status_code} while serving"
        assert response.json() == {"status": "ok"}, (
            f'GET /health must answer {{"status": "ok"}}, got {response.text[:120]}'
        )
        for name in ("", served.stubs().service_name):
            status = server.grpc_health(name)
            assert status == health_pb2.HealthCheckResponse.SERVING, (
                f"gRPC health for service {name!r} is {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}, "
                "expected SERVING"
            )
