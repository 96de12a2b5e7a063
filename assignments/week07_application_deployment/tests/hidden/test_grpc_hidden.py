"""Task grpc_predict: Classifier/Predict answers exactly what POST /predict answers, and refuses bad input."""

from __future__ import annotations

import grpc
import reference
import served

from common.grading.client import Submission

# proto floats are float32, JSON numbers float64 of the same float32 value: equal up to float32 rounding.
PARITY_ATOL = 1e-6


def test_grpc_answers_what_http_answers(submission: Submission, model, known) -> None:
    model_file, centroids = model
    pngs = [png for png, _ in known[:8]]
    expected = reference.expected_probabilities(pngs, centroids)
    with served.running(submission, model_file) as server:
        replies = [server.grpc_predict(png) for png in pngs]
        answers = [server.predict(png).json() for png in pngs]
        try:
            server.grpc_predict(b"not an image")
            refused = None
        except grpc.RpcError as error:
            refused = error.code()
    for i, (reply, answer, want) in enumerate(zip(replies, answers, expected, strict=True)):
        ours = {"label": reply.label, "probabilities": dict(reply.probabilities)}
        served.check_answer(ours, want, f"gRPC, image {i}")
        assert reply.label == answer.get("label"), (
            f"image {i}: gRPC says {reply.label!r}, HTTP {answer.get('label')!r}"
        )
        http_probabilities = answer.get("probabilities", {})
        assert all(
            abs(p - http_probabilities.get(name, -1.0)) <= PARITY_ATOL
            for name, p in ours["probabilities"].items()
        ), f"image {i}: gRPC's probabilities differ from HTTP's"
    assert refused == grpc.StatusCode.INVALID_ARGUMENT, (
        f"a Predict of bytes that are not an image ended with {refused}, expected INVALID_ARGUMENT"
    )
