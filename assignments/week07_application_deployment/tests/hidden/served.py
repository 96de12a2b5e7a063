"""The checker's end of a served submission: start its server in a sandbox, talk to it over Unix sockets.

`running(submission, model)` starts the course's `modelserver/server.py` (with the submitted app, batcher and
servicer) through `Submission.serve` on sockets the checker names, waits until the HTTP socket answers any
request, and yields a `Server` whose clients connect through those sockets. The server is killed with
everything it started when the block ends. Every answer is read here, as bytes from a socket.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from common.grading.client import Submission
from common.grading.services import Service

MODEL = "model.pt"
COURSE_API = Path(__file__).resolve().parents[2] / "src" / "modelserver" / "grpc_api.py"  # not submitted
# Expected values are float64 here, float32 in the server: features agree to ~1e-7 relative, and after
# dividing by the temperature (0.1) probabilities agree to ~1e-6. Another image's answer differs by > 1e-2.
ATOL = 1e-5
TIMEOUT_S = 30.0  # for one request: far above what a request takes, below the task's time


def _course_grpc_api() -> ModuleType:
    """The course's grpc_api.py (never a submitted file), loaded under a name of its own: the checker must not
    import the student's package."""
    spec = importlib.util.spec_from_file_location("course_grpc_api", COURSE_API)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Stubs:
    pb2: ModuleType
    pb2_grpc: ModuleType
    service_name: str


_stubs: list[Stubs] = []


def stubs() -> Stubs:
    """classifier.proto's stubs, compiled once per checker process."""
    if not _stubs:
        api = _course_grpc_api()
        pb2, pb2_grpc = api.load_stubs(Path(tempfile.mkdtemp(prefix="assignment07-stubs-")))
        _stubs.append(Stubs(pb2, pb2_grpc, api.SERVICE_NAME))
    return _stubs[0]


@dataclass
class Server:
    """A running submission and clients of its two sockets."""

    service: Service
    http: httpx.Client
    channel: grpc.Channel

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """An HTTP request; an AssertionError that says so if the server dropped the connection unanswered."""
        try:
            return self.http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            self.service.check_running(f"during {method} {path}")  # it exited, or the task's time ran out
            raise AssertionError(
                f"{method} {path}: the server closed the connection without an answer "
                f"({type(error).__name__}: {error}); an error in a request must become a 4xx answer"
            ) from None

    def predict(self, png: bytes, field: str = "image") -> httpx.Response:
        return self.request("POST", "/predict", files={field: ("image.png", png, "image/png")})

    def grpc_predict(self, png: bytes) -> Any:
        """The PredictReply; grpc.RpcError if the server answered with an error status."""
        s = stubs()
        return s.pb2_grpc.ClassifierStub(self.channel).Predict(
            s.pb2.PredictRequest(image=png), timeout=TIMEOUT_S
        )

    def grpc_health(self, name: str) -> int:
        request = health_pb2.HealthCheckRequest(service=name)
        return health_pb2_grpc.HealthStub(self.channel).Check(request, timeout=TIMEOUT_S).status

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of GET /metrics, keyed by (sample name, sorted labels), parsed by prometheus_client."""
        response = self.request("GET", "/metrics")
        assert response.status_code == 200, f"GET /metrics answered {response.status_code}, expected 200"
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
        }


def _answers(client: httpx.Client) -> bool:
    client.get("/health")  # any HTTP answer: the server is up (GET /health's own answer is a task of its own)
    return True


@contextmanager
def running(submission: Submission, model: bytes, *options: str) -> Iterator[Server]:
    """The submission's server on the model file `model`, with extra command-line `options`."""
    tree = {**submission.tree(), MODEL: model}
    argv = [sys.executable, "-m", "modelserver.server", "--model", f"{{src}}/{MODEL}",
            "--http-socket", "{sockets}/http.sock", "--grpc-socket", "{sockets}/grpc.sock", *options]  # fmt: skip
    with submission.serve(tree, argv) as service:
        transport = httpx.HTTPTransport(uds=service.socket("http.sock"))
        # A connection per request: how the server ends one request (a 500 that resets the connection) must not
        # fail the next one, whose task may be another.
        headers = {"Connection": "close"}
        with httpx.Client(
            transport=transport, base_url="http://service", headers=headers, timeout=TIMEOUT_S
        ) as http:
            service.wait_ready(lambda: _answers(http))
            with grpc.insecure_channel(f"unix:{service.socket('grpc.sock')}") as channel:
                yield Server(service, http, channel)


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    """How much one sample rose between two reads of /metrics (a sample not yet shown counts as 0)."""
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def check_answer(answer: object, expected: dict[str, float], what: str) -> str:
    """The label of a JSON answer {"label", "probabilities"} after checking it against `expected`."""
    assert type(answer) is dict and set(answer) == {"label", "probabilities"}, (
        f"{what}: the JSON must be an object with keys 'label' and 'probabilities', got {str(answer)[:120]}"
    )
    probabilities, label = answer["probabilities"], answer["label"]
    assert type(probabilities) is dict and set(probabilities) == set(expected), (
        f"{what}: 'probabilities' must map every class {sorted(expected)} to its probability"
    )
    assert all(type(p) is float for p in probabilities.values()), f"{what}: probabilities must be numbers"
    worst = max(abs(probabilities[name] - p) for name, p in expected.items())
    assert worst <= ATOL, f"{what}: probabilities differ from the model's by up to {worst:.3g}"
    assert label == max(expected, key=expected.__getitem__), (
        f"{what}: the label is not the most probable class"
    )
    return label
