"""Task request_counter: predict_requests_total{protocol} rises by exactly one per predict request."""

from __future__ import annotations

import contextlib

import grpc
import served

from common.grading.client import Submission

COUNTER = "predict_requests_total"


def test_the_counter_rises_by_one_per_request_and_protocol(submission: Submission, model, known) -> None:
    pngs = [png for png, _ in known[:3]]
    with served.running(submission, model[0]) as server:
        before = server.metrics()
        for png in pngs:
            server.predict(png)
        with contextlib.suppress(AssertionError):  # its answer is another task's; it counts all the same
            server.predict(b"not an image")
        server.request("GET", "/health")  # not a predict request
        middle = server.metrics()  # nor is reading the metrics
        for png in pngs[:2]:
            server.grpc_predict(png)
        try:
            server.grpc_predict(b"not an image")
        except grpc.RpcError:
            pass  # its status is another task's; it is a request all the same
        after = server.metrics()
    http_first = served.delta(before, middle, COUNTER, protocol="http")
    assert http_first == 4, (
        f'{COUNTER}{{protocol="http"}} rose by {http_first:g} for 4 POST /predict, expected 4'
    )
    http_second = served.delta(middle, after, COUNTER, protocol="http")
    assert http_second == 0, f'{COUNTER}{{protocol="http"}} rose by {http_second:g} for no HTTP predict'
    grpc_second = served.delta(middle, after, COUNTER, protocol="grpc")
    assert grpc_second == 3, f'{COUNTER}{{protocol="grpc"}} rose by {grpc_second:g} for 3 gRPC Predict calls'
    assert served.delta(before, middle, COUNTER, protocol="grpc") == 0, "HTTP requests were counted as gRPC"
