"""Servers run in a fresh sandbox and reached over Unix sockets the checker chose (common.grading.services)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.grading.client import Sandboxes, Submission, TaskRunner
from common.grading.faults import CommandDidNotStartError, ProcessLimitError, TimeLimitError, WorkerEndedError
from common.grading.services import start_service
from common.grading.session import (
    WorkerLimits,
    kill_all,
    live_tree,
    living_processes,
    process_tree,
    session_members,
)
from common.grading.suites import IsolatedSettings

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bubblewrap runs on Linux only")

# A server that answers every connection with the file it was given, from inside the sandbox; before it
# listens it starts a child that ignores SIGTERM and lives on its own, as a careless server's helper would.
ECHO_SERVER = """
import os, signal, socket, subprocess, sys
subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"], start_new_session=True)
server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen()
while True:
    conn, _ = server.accept()
    conn.sendall(open(sys.argv[2], "rb").read() + b" " + str(os.getuid()).encode())
    conn.close()
"""


def _ask(path: str) -> bytes:
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(5)
        client.connect(path)
        return client.recv(1024)


def alive(pids: list[int]) -> list[int]:
    """Those of `pids` that still run (zombies waiting for their parent count as ended)."""
    running = {process.pid for process in living_processes()}
    return [pid for pid in pids if pid in running]


@linux
def test_a_reaped_command_has_no_tree_and_what_it_left_in_its_session_is_found_and_killed() -> None:
    leader = subprocess.Popen(
        ["sh", "-c", "sleep 60 & echo $!"], stdout=subprocess.PIPE, start_new_session=True
    )
    leftover = int(leader.stdout.readline())
    leader.wait()
    try:
        assert live_tree(leader) == [], "a reaped PID may be another program's by now: never walk it"
        assert leftover in session_members(leader.pid)
        kill_all(lambda: session_members(leader.pid))
        assert not alive([leftover])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(leftover, signal.SIGKILL)
        leader.stdout.close()


@pytest.fixture
def settings(tmp_path: Path) -> IsolatedSettings:
    return IsolatedSettings(workdir=tmp_path / "runs")


@linux
def test_a_server_in_the_sandbox_is_reached_at_its_socket_and_killed_with_its_children(
    settings: IsolatedSettings,
) -> None:
    argv = [sys.executable, "-c", ECHO_SERVER, "{sockets}/echo.sock", "{src}/pkg/data.txt"]
    service = start_service({"pkg/data.txt": b"chosen"}, argv, settings, budget_s=60)
    try:
        service.wait_ready(lambda: Path(service.socket("echo.sock")).exists())
        assert _ask(service.socket("echo.sock")) == b"chosen 65534", "the sandboxed server answers"
        running = process_tree(service.process.pid)
        assert len(running) >= 3, "bwrap, the server and its child"
    finally:
        ran_s = service.stop()
    assert not alive(running) and ran_s > 0
    assert not Path(service.socket("echo.sock")).parent.exists(), "the socket folder is removed"


@linux
def test_a_server_that_exits_before_it_is_ready_fails_at_once_with_its_output(
    settings: IsolatedSettings,
) -> None:
    argv = [sys.executable, "-c", "raise NotImplementedError('write the app')"]
    service = start_service({"a": b""}, argv, settings, budget_s=60)
    try:
        start = time.monotonic()
        with pytest.raises(
            WorkerEndedError, match="(?s)exited with code 1 before it was ready.*write the app"
        ):
            service.wait_ready(lambda: False)
        assert time.monotonic() - start < 30, "an exit is seen at once, not at the time limit"
    finally:
        service.stop()


@linux
def test_a_server_that_never_becomes_ready_is_stopped_at_the_time_left(settings: IsolatedSettings) -> None:
    service = start_service({"a": b""}, ["sh", "-c", "sleep 300 & sleep 300"], settings, budget_s=2)
    running = process_tree(service.process.pid)
    try:
        with pytest.raises(TimeLimitError, match="time ran out"):
            service.wait_ready(lambda: False)
        assert service.stopped == "time limit"
    finally:
        service.stop()
    assert not alive(running)


@linux
def test_a_server_that_starts_too_many_processes_is_stopped(tmp_path: Path) -> None:
    settings = IsolatedSettings(workdir=tmp_path, max_processes=16)
    argv = ["sh", "-c", "for i in $(seq 60); do sleep 30 & done; wait"]
    service = start_service({"a": b""}, argv, settings, budget_s=60)
    try:
        with pytest.raises(ProcessLimitError):
            service.wait_ready(lambda: False)
    finally:
        service.stop()


@linux
def test_a_server_that_cannot_start_is_the_machines_fault(settings: IsolatedSettings) -> None:
    with pytest.raises(CommandDidNotStartError, match="exec failed"):
        start_service({"a": b""}, ["/no/such/server"], settings, budget_s=60)


@linux
def test_without_the_sandbox_the_socket_folder_is_a_host_folder(tmp_path: Path) -> None:
    """`effdl grade --no-sandbox`: `{sockets}` names the same folder the checker connects to."""
    settings = IsolatedSettings(workdir=tmp_path, sandboxed=False)
    argv = [sys.executable, "-c", ECHO_SERVER, "{sockets}/echo.sock", "{src}/data.txt"]
    service = start_service({"data.txt": b"plain"}, argv, settings, budget_s=60)
    try:
        service.wait_ready(lambda: Path(service.socket("echo.sock")).exists())
        assert _ask(service.socket("echo.sock")).startswith(b"plain ")
        running = process_tree(service.process.pid)
    finally:
        service.stop()
    assert not alive(running)


@linux
def test_a_tasks_server_runs_on_the_tasks_time_and_ends_the_task_when_it_runs_out(tmp_path: Path) -> None:
    """Through the `submission` fixture: the server's whole run is charged to the task; at the limit the task
    stops, and its later tests are not run."""
    no_worker = Sandboxes(lambda: pytest.fail("a server needs no worker"), str(tmp_path))
    runner = TaskRunner(
        "serving", 2.0, WorkerLimits(), no_worker, tmp_path, isolated=IsolatedSettings(tmp_path)
    )
    submission = Submission(runner, tmp_path)
    with pytest.raises(TimeLimitError, match="time limit of 2 s ran out while the server"):
        with submission.serve({"a": b""}, ["sleep", "300"]) as server:
            server.wait_ready(lambda: False)
    assert runner.used_s >= 2.0 and isinstance(runner.stopped, TimeLimitError)
    with pytest.raises(TimeLimitError, match="not run"):
        with submission.serve({"a": b""}, ["true"]):
            pass
