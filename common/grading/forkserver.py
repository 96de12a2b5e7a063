"""The trusted checker's start-up, paid once per batch: pytest runs forked from a warm server process.

A checker process imports torch, torch._dynamo (an optimizer's first step and torch.profiler pull it in),
pytest and hypothesis: seconds of CPU before the first test, for every submission. Instead, a server
(`python -m common.grading.forkserver`, started on first use) imports them once; each checker run is a
fork of it that changes to the assignment folder, takes the environment it is given, writes its output to a
file and runs `pytest.main`. The server reports each run's exit code, and kills a run at its deadline: the
run and every process it started, as each run leads a process group of its own.
Only trusted code runs here (the hidden tests and the checker), never a submission. Nothing in the server
touches CUDA, so a forked checker may still use the GPU it is given.

The same server runs short Python programs as `python -c` would (`run_python`): the test suite runs every
code block of the slides that way, each in a fork that has torch imported already instead of a new interpreter
that imports it (seconds each). What differs from `python -c`: the preloaded modules are imported before the
program starts, so an environment variable it sets for them (before `import torch`) comes too late.

Protocol: one JSON object per line. Grader -> server: {"id", "argv" (pytest's) or "code" (a program's),
"cwd", "env", "output", "timeout_s"}. Server -> grader: {"ready": true} once, then {"id", "code"} per run
(code: the exit status; null: killed at its deadline).
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
import types
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from common.weeks import REPO_ROOT

PRELOAD = ("torch", "torch._dynamo", "pytest", "hypothesis", "common.grading.checker")


# ------------------------------------------------------------------------------------------------ server
def _child(request: dict[str, Any]) -> None:
    """A forked run in `cwd` with exactly `env`, its output into `output`: pytest.main(argv) (a checker), or
    a program, which then exits as an interpreter does (threads joined, atexit handlers run)."""
    code = 70
    try:
        os.setpgid(0, 0)  # a process group of its own, which a kill at the deadline takes whole
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        descriptor = os.open(request["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(descriptor, 1)
        os.dup2(descriptor, 2)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.dont_write_bytecode = True  # the hidden tests' folder stays free of __pycache__
        if "code" in request:
            code = _run_program(request["code"])
        else:
            import pytest

            code = int(pytest.main(request["argv"]))
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        os._exit(code)
    if "code" in request:
        sys.exit(code)  # up through serve(): this fork's interpreter shuts down as `python -c`'s would
    os._exit(code)


def _run_program(source: str) -> int:
    """Run `source` as `python -c source` does: in a fresh __main__ module (what pickle and multiprocessing
    look classes up in), with sys.argv ["-c"] and the working folder first on sys.path. Returns the exit
    status: SystemExit's, or 1 with the traceback on stderr for an uncaught exception."""
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    sys.argv = ["-c"]
    sys.path[0] = ""
    try:
        exec(compile(source, "<string>", "exec"), main.__dict__)
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)  # sys.exit("message"), as the interpreter reports it
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def serve() -> None:
    """Preload, then fork a checker per request until the grader closes stdin (running checkers die too)."""
    for module in PRELOAD:
        importlib.import_module(module)
    running: dict[int, tuple[Any, float]] = {}  # pid -> (request id, deadline)
    server = os.getpid()

    def reply(message: dict[str, Any]) -> None:
        os.write(1, (json.dumps(message) + "\n").encode())

    reply({"ready": True})
    pending = b""
    try:
        while True:
            readable, _, _ = select.select([0], [], [], 0.05)
            if readable:
                chunk = os.read(0, 1 << 16)
                if not chunk:
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    request = json.loads(line)
                    pid = os.fork()
                    if pid == 0:
                        _child(request)
                    running[pid] = (request["id"], time.monotonic() + request["timeout_s"])
            with contextlib.suppress(ChildProcessError):
                while (found := os.waitpid(-1, os.WNOHANG))[0]:
                    pid, status = found
                    request_id, deadline = running.pop(pid)
                    code = None if time.monotonic() >= deadline else os.waitstatus_to_exitcode(status)
                    reply({"id": request_id, "code": code})
            for pid, (_, deadline) in running.items():
                if time.monotonic() >= deadline:
                    _kill_run(pid)
    finally:  # stdin closed, or the server itself was interrupted: no run outlives it
        if os.getpid() == server:  # not in a program's fork, which exits up through here (_child)
            for pid in running:
                _kill_run(pid)


def _kill_run(pid: int) -> None:
    """Kill a run and the processes it started (its process group, set up by _child)."""
    for kill in (os.killpg, os.kill):  # os.kill too, in case the fork has not made its group yet
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------ client
class CheckerServer:
    """The grader's handle on the server: thread-safe, one pending Future per run."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "common.grading.forkserver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        if json.loads(self.process.stdout.readline() or "{}").get("ready") is not True:
            raise RuntimeError(f"the checker fork server did not start (exit code {self.process.poll()})")
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: dict[int, Future] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            message = json.loads(line)
            self._waiting.pop(message["id"]).set_result(message["code"])
        for future in self._waiting.values():  # the server died: every pending run failed
            future.set_result(None)

    def run(
        self, what: dict[str, Any], cwd: Path, env: dict[str, str], output: Path, timeout_s: float
    ) -> int | None:
        """The exit status of a run of `what` ({"argv": pytest's} or {"code": a program}), or None if it ran
        past `timeout_s` (it is then killed, with every process it started)."""
        future: Future = Future()
        with self._lock:
            request_id = next(self._ids)
            self._waiting[request_id] = future
            request = {"id": request_id, **what, "cwd": str(cwd), "env": env, "output": str(output),
                       "timeout_s": timeout_s}  # fmt: skip
            try:
                self.process.stdin.write((json.dumps(request) + "\n").encode())
                self.process.stdin.flush()
            except BrokenPipeError:  # the server died: this run did not happen
                return None
        return future.result()


_SERVER: CheckerServer | None = None
_SERVER_LOCK = threading.Lock()


def _server() -> CheckerServer:
    """The warm server, started on first use (and again if it died)."""
    global _SERVER
    with _SERVER_LOCK:
        if _SERVER is None or _SERVER.process.poll() is not None:
            _SERVER = CheckerServer()
        return _SERVER


def run_pytest(argv: list[str], cwd: Path, env: dict[str, str], output: Path, timeout_s: float) -> int | None:
    """Run pytest with `argv` as a fork of the warm server; pytest's exit code (see CheckerServer.run)."""
    return _server().run({"argv": argv}, cwd, env, output, timeout_s)


def run_python(code: str, cwd: Path, env: dict[str, str], output: Path, timeout_s: float) -> int | None:
    """Run a program as `python -c code` would, as a fork of the warm server (module docstring); its exit
    status, its stdout and stderr in `output` (see CheckerServer.run)."""
    return _server().run({"code": code}, cwd, env, output, timeout_s)


if __name__ == "__main__":
    serve()
