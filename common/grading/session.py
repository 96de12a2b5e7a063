"""The trusted end of one sandbox: start it, fork workers in it, exchange messages, enforce limits, kill it.

A `Session` starts the worker template in the sandbox (`sandbox.command`) with one end of a socket pair as
its channel. Its output (stdout and stderr of everything inside) is drained into a capped tail for the TA's
log. A watchdog thread counts the sandbox's processes five times a second and kills the whole sandbox when
there are more than the limit (so a fork bomb runs for at most a fifth of a second; where the grader is
root, RLIMIT_NPROC cannot cap it, since the sandbox's uid maps to root's, which the kernel exempts). Time limits are waits on the channel: a reply that does not come in time
kills the sandbox too. Killing is final: every process of the tree gets SIGKILL (inside bwrap, the PID
namespace then takes every process with it).

Whose fault a failure is follows from when it happens: before the template says "ready", no submission code
has run, so it is the machine's (`WorkerDidNotStartError`); after that it is the submission's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.grading import wire
from common.grading.faults import (
    ProcessLimitError,
    TimeLimitError,
    WorkerDidNotStartError,
    WorkerEndedError,
)
from common.grading.sandbox import SandboxSpec, command

START_TIMEOUT_S = 300.0  # importing torch in a fresh sandbox on a busy machine; not the submission's time
END_TIMEOUT_S = 30.0  # for a worker to exit and the template to clean up after it
WATCH_INTERVAL_S = 0.2


@dataclass(frozen=True)
class WorkerLimits:
    """What one worker may use; applied by the worker to itself (`worker._apply_limits`)."""

    address_space_bytes: int | None = None  # None: no RLIMIT_AS (GPU tasks: CUDA maps huge ranges)
    max_file_bytes: int = 64 * 2**20
    max_open_files: int = 256
    gpu_memory_bytes: int = 0


class Session:
    """A running sandbox and the trusted end of its channel."""

    def __init__(self, spec: SandboxSpec, max_processes: int = 64, output_bytes: int = 64 * 1024) -> None:
        self.spec = spec
        self.max_processes = max_processes
        self.output_bytes = output_bytes
        self.process_limit_hit = False
        self.ran_submission_code = False  # from the first spawn on, a failure may be the submission's doing
        self._output = bytearray()
        self._lock = threading.Lock()
        self._dead = threading.Event()
        parent, child = socket.socketpair()
        self.channel = parent
        try:
            self.process = subprocess.Popen(
                command(spec, child.fileno()),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=(child.fileno(),),
                start_new_session=True,
                env={},  # bwrap's own process is the sandbox's PID 1: its /proc/1/environ is readable inside
            )
        except OSError as error:
            raise WorkerDidNotStartError(f"the sandbox could not be started: {error}") from None
        finally:
            child.close()
        threading.Thread(target=self._drain, daemon=True).start()
        threading.Thread(target=self._watch, daemon=True).start()
        try:
            self._expect("template ready", START_TIMEOUT_S)
        except (WorkerEndedError, TimeLimitError, ProcessLimitError) as error:
            self.kill()
            tail = self.output_tail()[-800:]
            raise WorkerDidNotStartError(f"the sandbox did not start ({error}): {tail}") from None

    # ------------------------------------------------------------------------------------------- workers
    def spawn(self, limits: WorkerLimits, cwd: str) -> None:
        """Fork a worker with `limits`; it works in `cwd` (created inside the sandbox's /tmp)."""
        self.ran_submission_code = True
        wire.send(self.channel, {"op": "spawn", "cwd": cwd, "threads": self.spec.threads, "limits": {
            "address_space_bytes": limits.address_space_bytes, "max_file_bytes": limits.max_file_bytes,
            "max_open_files": limits.max_open_files}, "gpu_memory_bytes": limits.gpu_memory_bytes})  # fmt: skip
        self._expect("worker ready", END_TIMEOUT_S)

    def exchange(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Send a request to the worker and return its reply (the message with the same id)."""
        self._send(request)
        message = self._receive(timeout_s)
        if message.get("event") == "worker ended":
            raise WorkerEndedError(f"the submission's process ended ({message.get('status')})")
        if message.get("id") != request["id"]:
            self.kill()
            raise WorkerEndedError("the submission's process sent a message out of turn")
        return message

    def end_worker(self) -> None:
        """Ask the worker to exit and wait until the template has cleaned up after it (or kill the sandbox)."""
        try:
            self._send({"op": "exit"})
            self._expect("worker ended", END_TIMEOUT_S)
        except (WorkerEndedError, TimeLimitError, ProcessLimitError):
            self.kill()

    @property
    def alive(self) -> bool:
        """Whether the sandbox runs (not killed, and its template has not ended it)."""
        return not self._dead.is_set() and self.process.poll() is None

    # ------------------------------------------------------------------------------------------- channel
    def _send(self, message: dict[str, Any]) -> None:
        try:
            wire.send(self.channel, message)
        except OSError:
            raise self._ended() from None

    def _receive(self, timeout_s: float) -> dict[str, Any]:
        self.channel.settimeout(max(timeout_s, 0.001))
        try:
            return wire.receive(self.channel)
        except TimeoutError:
            self.kill()
            raise TimeLimitError("the time limit ran out") from None
        except wire.WireError as error:
            self.kill()
            raise WorkerEndedError(f"the submission's process sent malformed data ({error})") from None
        except (EOFError, OSError):
            raise self._ended() from None

    def _expect(self, event: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            message = self._receive(deadline - time.monotonic())
            if message.get("event") == event:
                return message
            if message.get("event") == "worker ended":
                raise WorkerEndedError(f"the submission's process ended ({message.get('status')})")

    def _ended(self) -> Exception:
        self.kill()
        if self.process_limit_hit:
            return ProcessLimitError(f"stopped for starting more than {self.max_processes} processes")
        return WorkerEndedError(f"the sandbox ended ({_status(self.process.poll())})")

    # ------------------------------------------------------------------------------------- output, limits
    def _drain(self) -> None:
        stream = self.process.stdout
        while chunk := stream.read1(65536):
            with self._lock:
                self._output += chunk
                del self._output[: max(0, len(self._output) - self.output_bytes)]

    def output_tail(self) -> str:
        """The last `output_bytes` of everything printed inside the sandbox."""
        with self._lock:
            return self._output.decode(errors="replace")

    def _watch(self) -> None:
        while not self._dead.wait(WATCH_INTERVAL_S):
            if len(live_tree(self.process)) > self.max_processes + 2:  # + bwrap and its init
                self.process_limit_hit = True
                self.kill()

    def pids(self) -> set[int]:
        """Host pids of every process in the sandbox (for telling our GPU memory from another's)."""
        return set(live_tree(self.process))

    def kill(self) -> None:
        """SIGKILL every process of the sandbox; safe to call twice."""
        if self._dead.is_set():
            return
        self._dead.set()
        kill_all(lambda: live_tree(self.process))
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        self.channel.close()


def _status(code: int | None) -> str:
    if code is None:
        return "still running"
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


@dataclass(frozen=True)
class LivingProcess:
    """A process that has not exited (zombies left out), as /proc/PID/stat describes it."""

    pid: int
    parent: int
    session: int


def living_processes() -> list[LivingProcess]:
    """Every process that still runs, read from /proc/PID/stat (one that ends while being read is left out)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    state, parent, _, session = stat.read().rsplit(b")", 1)[1].split()[:4]
                if state not in (b"Z", b"X"):
                    found.append(LivingProcess(int(entry.name), int(parent), int(session)))
    return found


def process_tree(root: int) -> list[int]:
    """`root` and its living descendants (zombies left out)."""
    children: dict[int, list[int]] = {}
    for process in living_processes():
        children.setdefault(process.parent, []).append(process.pid)
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found if any(root in pids for pids in children.values()) else []


def session_members(session_id: int) -> list[int]:
    """Living processes of a session (a command started with `start_new_session=True` leads the session of
    its own PID). Safe after the leader is reaped: the kernel does not reuse a PID while a process still has
    it as its session id."""
    return [process.pid for process in living_processes() if process.session == session_id]


def live_tree(process: subprocess.Popen) -> list[int]:
    """`process` and its living descendants while it has not been reaped; nothing once it has: its PID may
    then belong to an unrelated process (PIDs are reused), whose tree must not be killed."""
    return [] if process.returncode is not None else process_tree(process.pid)


def kill_all(pids_of: Callable[[], list[int]], wait_s: float = 10.0) -> int:
    """SIGKILL every process `pids_of()` lists until none is left (a fork bomb may race the first rounds),
    then wait up to `wait_s` until each one killed has ended: a killed PID namespace init is still exiting
    (its namespace's processes are reaped first) after its parent has been reaped."""
    killed: set[int] = set()
    for _ in range(200):
        pids = [pid for pid in pids_of() if pid != os.getpid()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        time.sleep(0.01)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and killed & {process.pid for process in living_processes()}:
        time.sleep(0.01)
    return len(killed)
