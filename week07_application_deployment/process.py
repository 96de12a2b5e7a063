"""Start the server as a subprocess on free ports, wait until it is ready, and always stop it.

    with ServerProcess.start(model_path, max_batch_size=32) as server:
        httpx.post(f"{server.http_url}/predict", files=...)

Used by the tests and the benchmark: the server runs exactly as in production (its own process, its own
signal handling), and nothing is left running whatever happens in the `with` block.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from common.errors import EffdlError
from common.weeks import REPO_ROOT

__all__ = ["ServerDidNotStartError", "ServerProcess"]


class ServerDidNotStartError(EffdlError, RuntimeError):
    """The server exited or never became ready; the message carries its output."""


@dataclass
class ServerProcess:
    """A running server subprocess and the ports it bound."""

    process: subprocess.Popen
    http_port: int
    grpc_port: int | None
    log_path: Path
    _tmp: tempfile.TemporaryDirectory = field(repr=False)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def output(self) -> str:
        """What the server printed so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")

    @classmethod
    def start(
        cls,
        model: Path,
        *,
        timeout_s: float = 120.0,
        http_port: int = 0,
        grpc_port: int | None = 0,
        **options: Any,
    ) -> ServerProcess:
        """Start `python -m week07_application_deployment.serve` and wait for GET /ready to answer 200.

        options become command-line flags: max_batch=8 -> --max-batch 8. Raises ServerDidNotStartError
        (with the server's output) if it exits or is not ready within timeout_s; it is killed then.
        """
        tmp = tempfile.TemporaryDirectory(prefix="week07-server-")
        ready_file, log_path = Path(tmp.name) / "ready.json", Path(tmp.name) / "server.log"
        command = [
            sys.executable, "-m", "week07_application_deployment.serve", "--model", str(model),
            "--http-port", str(http_port), "--grpc-port", str(-1 if grpc_port is None else grpc_port),
            "--ready-file", str(ready_file),
        ]  # fmt: skip
        for name, value in options.items():
            command += [f"--{name.replace('_', '-')}", str(value)]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + timeout_s
        try:
            while not ready_file.is_file():
                if process.poll() is not None:
                    raise ServerDidNotStartError(
                        f"the server exited with code {process.returncode} before it was ready; "
                        f"its output:\n{log_path.read_text(errors='replace')}"
                    )
                if time.monotonic() > deadline:
                    raise ServerDidNotStartError(
                        f"the server was not ready after {timeout_s:.0f} s; its output so far:\n"
                        f"{log_path.read_text(errors='replace')}"
                    )
                time.sleep(0.05)
            ports = json.loads(ready_file.read_text())
            server = cls(process, ports["http"], ports.get("grpc"), log_path, tmp)
            response = httpx.get(f"{server.http_url}/ready", timeout=max(1.0, deadline - time.monotonic()))
            if response.status_code != 200:
                raise ServerDidNotStartError(f"/ready answered {response.status_code}: {response.text}")
            return server
        except BaseException:
            _stop(process, grace_s=5)
            tmp.cleanup()
            raise

    def stop(self, grace_s: float = 30.0, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send sig (SIGTERM or SIGINT), wait up to grace_s for a graceful exit, else SIGKILL; return the
        exit code."""
        return _stop(self.process, grace_s, sig)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._tmp.cleanup()


def _stop(process: subprocess.Popen, grace_s: float, sig: signal.Signals = signal.SIGTERM) -> int:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
