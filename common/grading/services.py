"""A submitted server, run in a fresh sandbox while a hidden test talks to it over Unix sockets.

Some tasks grade a *service*: the student's server must answer HTTP and gRPC requests. The sandbox has no
network at all (a network namespace of its own, not even a loopback), so the checker cannot reach a TCP port
inside it, and opening one would need a relay that is code of its own to trust. A Unix domain socket is a
file, and a socket bound at a path is reachable from any network namespace that can see the file. So the
server is told to listen on *socket paths the test chose*, inside the one folder the sandbox shares with the
checker (`{sockets}` in the command: /outbox inside, a short folder of the checker's outside, since a socket
path has at most 107 bytes), and the test connects there with an ordinary client (httpx's `uds=` transport,
gRPC's `unix:` address). Nothing of the submission runs in the checker: what comes back is bytes on a socket.

    with submission.serve(tree, ["python", "-m", "pkg.server", "--http-socket", "{sockets}/http.sock"]) as server:
        server.wait_ready(lambda: http_get(server.socket("http.sock"), "/health").status_code == 200)
        ...                                          # requests over server.socket("http.sock")

What the harness observes and enforces itself:

- whether the command started: the launcher reports on a pipe just before it executes it (`suites`), so a
  sandbox that failed to start is the machine's fault (`CommandDidNotStartError`), never the student's;
- readiness: `wait_ready` polls the test's probe until it succeeds, and fails with the server's exit status
  and the tail of its output as soon as the server has exited, or when the time left runs out;
- time: the server runs on the task's time from start to stop, asked or not; a watchdog kills it when what
  was left of the task's limit runs out, or when it starts more processes than allowed;
- the end: `stop` (and leaving the `with` block, whatever happened) SIGKILLs every process of the sandbox,
  so a server that ignores SIGTERM, forks or daemonizes leaves nothing running (bwrap's PID namespace takes
  every process in it along with its init).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from common.grading.faults import CommandDidNotStartError, ProcessLimitError, TimeLimitError, WorkerEndedError
from common.grading.session import WATCH_INTERVAL_S, kill_all, live_tree
from common.grading.suites import (
    LAUNCH_TIMEOUT_S,
    OUTPUT_BYTES,
    IsolatedSettings,
    did_not_start,
    read_status,
    sandboxed_command,
)

POLL_INTERVAL_S = 0.05  # between two readiness probes


class Service:
    """A server running in its own sandbox; see the module doc. Start it with `start_service`."""

    def __init__(
        self, argv: list[str], budget_s: float, max_processes: int, folder: Path, status_fd: int
    ) -> None:
        self.budget_s = budget_s
        self.max_processes = max_processes
        self.sockets = folder / "sockets"  # host side of {sockets}
        self.stopped = ""  # "", "time limit" or "process limit": why the watchdog killed it
        self.duration_s = 0.0  # set by stop()
        self._folder = folder
        self._output = bytearray()
        self._lock = threading.Lock()
        self._ended = threading.Event()
        self._watchdog_killed = threading.Event()  # set once the watchdog's kill has ended every process
        self.started = time.monotonic()
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True, env={},
                                        pass_fds=(status_fd,))  # fmt: skip
        threading.Thread(target=self._drain, daemon=True).start()
        threading.Thread(target=self._watch, daemon=True).start()

    def socket(self, name: str) -> str:
        """The host path of the socket the server was told to create as `{sockets}/name`."""
        return str(self.sockets / name)

    def output(self) -> str:
        """The tail of everything the server printed (stdout and stderr)."""
        with self._lock:
            return self._output.decode(errors="replace")

    def wait_ready(self, probe: Callable[[], bool]) -> float:
        """Call `probe` until it returns True; the seconds that took. `probe` may raise OSError or any error
        of its client while the server is still starting (it is called again). Fails with what the harness
        saw when the server exits first or the task's time runs out."""
        while True:
            with contextlib.suppress(Exception):
                if probe():
                    return time.monotonic() - self.started
            self.check_running("before it was ready")
            time.sleep(POLL_INTERVAL_S)

    def check_running(self, when: str) -> None:
        """Raise the fault that ended the server, if it has ended (a test calls it after a failed request)."""
        if self.stopped:
            self._watchdog_killed.wait()  # whoever catches the fault may rely on nothing still running
        if self.stopped == "time limit":
            raise TimeLimitError(
                f"the task's time ran out ({self.budget_s:.0f} s were left) {when}: {self._tail()}"
            )
        if self.stopped == "process limit":
            raise ProcessLimitError(f"the server started more than {self.max_processes} processes {when}")
        code = self.process.poll()
        if code is not None:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            raise WorkerEndedError(f"the server {how} {when}: {self._tail()}")

    def _tail(self) -> str:
        tail = self.output().strip()[-400:]
        return f"its output ended with: {tail}" if tail else "it printed nothing"

    def stop(self) -> float:
        """SIGKILL every process of the server's sandbox and remove its folder; the seconds it ran."""
        if not self._ended.is_set():
            self._ended.set()
            self.duration_s = time.monotonic() - self.started
        kill_all(lambda: live_tree(self.process))
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        shutil.rmtree(self._folder, ignore_errors=True)
        return self.duration_s

    def _drain(self) -> None:
        while chunk := self.process.stdout.read1(65536):
            with self._lock:
                self._output += chunk
                del self._output[: max(0, len(self._output) - OUTPUT_BYTES)]

    def _watch(self) -> None:
        while not self._ended.wait(WATCH_INTERVAL_S):
            if time.monotonic() - self.started > self.budget_s:
                self.stopped = "time limit"
            elif len(live_tree(self.process)) > self.max_processes + 2:  # + bwrap and its init
                self.stopped = "process limit"
            if self.stopped:
                kill_all(lambda: live_tree(self.process))
                self._watchdog_killed.set()
                return


def start_service(
    tree: dict[str, bytes],
    argv: list[str],
    settings: IsolatedSettings,
    budget_s: float,
    env: dict[str, str] | None = None,
) -> Service:
    """Start `argv` in a fresh sandbox whose /submission/src is `tree`; `{src}` and `{sockets}` in `argv` are
    filled in. It runs until `Service.stop` or until `budget_s` seconds have passed. CommandDidNotStartError
    if the sandbox or the launcher failed before the command ran (the machine's fault)."""
    # Short: the checker connects at sockets/<name>, and a Unix socket's path has at most 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="effdl-svc-"))
    sockets = folder / "sockets"
    sockets.mkdir()
    argv = [arg.replace("{sockets}", "{outbox}") for arg in argv]
    try:
        launch = sandboxed_command(tree, argv, settings, dict(env or {}), folder, sockets)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        service = Service(launch.argv, budget_s, settings.max_processes, folder, launch.status_write)
    except OSError as error:
        os.close(launch.status_read)
        shutil.rmtree(folder, ignore_errors=True)
        raise CommandDidNotStartError(f"the sandbox could not be started: {error}") from None
    finally:
        os.close(launch.status_write)
    try:
        status = _wait_for_launch(launch.status_read, service)
    finally:
        os.close(launch.status_read)
    if status != b"exec\n" and not service.stopped:
        output = service.output()
        service.stop()
        raise did_not_start(argv, status, output)
    return service


def _wait_for_launch(fd: int, service: Service) -> bytes:
    """What the launcher wrote before its status pipe closed: "exec" alone once the command runs (the exec
    closes the pipe), anything else if the sandbox or the exec failed."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    data = b""
    while time.monotonic() < deadline and not service.stopped:
        if service.process.poll() is not None:
            return data + read_status(fd)
        readable, _, _ = select.select([fd], [], [], WATCH_INTERVAL_S)
        if readable:
            chunk = os.read(fd, 1024)
            if not chunk:
                break
            data += chunk
    return data[:1024]
