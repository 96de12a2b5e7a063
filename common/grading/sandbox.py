"""Run one untrusted command with limits, and always get control back.

Three processes take part:

    grader thread ──spawns──> supervisor (`python -m common.grading.sandbox supervise`, trusted)
                                 └──spawns──> jail (`... sandbox jail`): applies the limits to itself, then
                                              exec()s the untrusted command (pytest on student code)

The supervisor is a *child subreaper*: every process the submission starts, even one that detaches with
`setsid()` and double-forks, stays its descendant, so on exit or timeout it can kill them all. Where the grader
runs as root it also puts the jail in a fresh `pids` cgroup, which caps the number of processes (a fork bomb
stops at the cap) and lists every member for the final kill. Elsewhere (no cgroup v1 `pids`, or not root) a
watchdog counts the supervisor's descendants a few times a second and stops the run when there are too many:
`RLIMIT_NPROC` is no use here, as root ignores it and for other users it counts all their processes.

The jail limits itself before it runs any student code: address space (`RLIMIT_AS`, CPU tasks only: CUDA
reserves huge address ranges, so GPU tasks get a GPU-memory fraction instead, set by the pytest plugin),
file size, core dumps, open files, and a Landlock ruleset (read only what the tests need, write only in the
work tree, signal no process outside the sandbox). Results come back through a pipe the supervisor created;
each line must carry a random token the jail received through another pipe, so text a submission writes to
stdout, or to files, is never mistaken for a result.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.grading import landlock

OUTPUT_TAIL_BYTES = 64 * 1024  # the TA's log keeps the end of the submission's output, not gigabytes of it
MAX_CHANNEL_BYTES = 8 * 1024 * 1024  # results of a few hundred tests fit easily; more is an attack
_PR_SET_CHILD_SUBREAPER = 36
RESULT_FD_ENV, TOKEN_FD_ENV = "EFFDL_GRADER_RESULT_FD", "EFFDL_GRADER_TOKEN_FD"
GPU_MEMORY_ENV = "EFFDL_GRADER_GPU_MEMORY_BYTES"  # the GPU-memory budget the plugin applies before any test
_COURSE_ROOT = str(Path(__file__).resolve().parents[2])  # so the supervisor and the jail can import `common`


@dataclass
class Limits:
    """What one sandboxed run may use."""

    time_limit_s: float
    address_space_bytes: int | None = None  # None: no RLIMIT_AS (GPU tasks)
    max_processes: int = 256  # processes and threads together
    max_file_bytes: int = 256 * 1024 * 1024
    max_open_files: int = 1024


@dataclass
class JailSpec:
    """Everything the supervisor needs to run a command in the jail."""

    argv: list[str]
    cwd: str
    env: dict[str, str]
    limits: Limits
    read_paths: list[str]
    write_paths: list[str]
    token: str


@dataclass
class RunResult:
    """What happened to a sandboxed run, as seen by the supervisor."""

    returncode: int | None  # negative: killed by that signal (-9 after a timeout); None: never started
    timed_out: bool
    duration_s: float
    process_limit_hit: bool = False  # stopped because it tried to run more than max_processes at once
    messages: list[dict] = field(default_factory=list)  # channel lines that carried the token
    forged_messages: int = 0  # channel lines without the token: a submission writing to the channel
    output_tail: str = ""
    leftovers_killed: int = 0
    isolation: dict[str, str] = field(default_factory=dict)
    supervisor_error: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> RunResult:
        return cls(**data)


# ----------------------------------------------------------------------------------------------- grader side
def run_in_sandbox(spec: JailSpec) -> RunResult:
    """Run `spec` under a supervisor process and return its report (called from the grader's threads)."""
    repo_root = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])),
    }
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "common.grading.sandbox", "supervise"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    payload = json.dumps(asdict(spec)).encode()
    try:
        out, err = supervisor.communicate(payload, timeout=spec.limits.time_limit_s + 120)
    except subprocess.TimeoutExpired:
        os.killpg(supervisor.pid, signal.SIGKILL)
        out, err = supervisor.communicate()
    _remove_cgroup(_cgroup_dir(supervisor.pid), kill=True)  # only does work if the supervisor itself died
    try:
        return RunResult.from_dict(json.loads(out.decode().strip().splitlines()[-1]))
    except (ValueError, IndexError, TypeError):
        detail = err.decode(errors="replace").strip().splitlines()[-3:]
        return RunResult(
            returncode=supervisor.returncode,
            timed_out=False,
            duration_s=0.0,
            supervisor_error=f"the sandbox supervisor failed (exit {supervisor.returncode}): {' | '.join(detail)}",
        )


# ------------------------------------------------------------------------------------------ process limits
def _pids_cgroup_base() -> Path | None:
    """This process's cgroup-v1 `pids` folder, if this process may create cgroups in it (root).

    `EFFDL_GRADER_CGROUPS=0` turns cgroups off (the user-namespace limit below is then used)."""
    if (
        os.geteuid() != 0
        or not Path("/proc/self/cgroup").exists()
        or os.environ.get("EFFDL_GRADER_CGROUPS") == "0"
    ):
        return None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            base = Path("/sys/fs/cgroup/pids") / path.lstrip("/")
            return base if os.access(base, os.W_OK) else None
    return None


def _cgroup_dir(supervisor_pid: int) -> Path | None:
    base = _pids_cgroup_base()
    return base / f"effdl-grade-{supervisor_pid}" if base else None


def _descendants(root_pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = [], [root_pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _kill_all(pids_of: Callable[[], list[int]]) -> int:
    """SIGKILL every process `pids_of()` lists until none is left (a fork bomb may race the first rounds)."""
    killed: set[int] = set()
    for _ in range(200):
        pids = [p for p in pids_of() if p != os.getpid()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        _reap()
        time.sleep(0.01)
    return len(killed)


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _remove_cgroup(cgroup: Path | None, kill: bool = False) -> None:
    if cgroup is None or not cgroup.exists():
        return
    procs = cgroup / "cgroup.procs"
    if kill:
        _kill_all(lambda: [int(p) for p in procs.read_text().split()] if procs.exists() else [])
    for _ in range(100):
        try:
            cgroup.rmdir()
            return
        except OSError:
            time.sleep(0.02)


# ------------------------------------------------------------------------------------------------ supervisor
def _supervise(spec: JailSpec) -> RunResult:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    isolation = {}
    abi = landlock.abi_version()
    isolation["filesystem"] = f"Landlock ABI {abi}" if abi else "none: this kernel has no Landlock"
    cgroup = _cgroup_dir(os.getpid())
    if cgroup is not None:
        cgroup.mkdir()
        (cgroup / "pids.max").write_text(str(spec.limits.max_processes))
        isolation["processes"] = f"pids cgroup, at most {spec.limits.max_processes}"
    else:
        isolation["processes"] = f"watchdog, stops the run above {spec.limits.max_processes} processes"

    result_r, result_w = os.pipe()
    token_r, token_w = os.pipe()
    os.write(token_w, spec.token.encode())
    os.close(token_w)
    jail_config = {
        "env": {**spec.env, RESULT_FD_ENV: str(result_w), TOKEN_FD_ENV: str(token_r)},
        "limits": asdict(spec.limits),
        "cgroup": str(cgroup) if cgroup else None,
        "landlock": bool(abi),
        "read": spec.read_paths,
        "write": spec.write_paths,
    }
    start = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, "-m", "common.grading.sandbox", "jail", json.dumps(jail_config), "--", *spec.argv],
        cwd=spec.cwd,
        env={"PYTHONPATH": _COURSE_ROOT, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        pass_fds=(result_w, token_r),
        start_new_session=True,
    )
    os.close(result_w)
    os.close(token_r)
    if cgroup:
        hit_limit = lambda: _process_limit_hit(cgroup)  # noqa: E731
    else:
        hit_limit = lambda: len(_descendants(os.getpid())) > spec.limits.max_processes  # noqa: E731
    output, channel, timed_out, fork_bomb = _drain(
        child, result_r, start + spec.limits.time_limit_s, hit_limit
    )
    duration = time.monotonic() - start
    returncode = child.poll()  # None while it still runs (timeout, fork bomb): it is killed next
    killed = _kill_all(lambda: _descendants(os.getpid()))
    if cgroup is not None:
        killed += _kill_all(lambda: [int(p) for p in (cgroup / "cgroup.procs").read_text().split()])
        _remove_cgroup(cgroup)
    if returncode is None:
        returncode = -signal.SIGKILL
    messages, forged = [], 0
    for line in channel.decode(errors="replace").splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            forged += 1
            continue
        if isinstance(message, dict) and message.pop("token", None) == spec.token:
            messages.append(message)
        else:
            forged += 1
    return RunResult(
        returncode=returncode,
        timed_out=timed_out,
        process_limit_hit=fork_bomb,
        duration_s=duration,
        messages=messages,
        forged_messages=forged,
        output_tail=output[-OUTPUT_TAIL_BYTES:].decode(errors="replace"),
        leftovers_killed=killed,
        isolation=isolation,
    )


def _process_limit_hit(cgroup: Path) -> bool:
    """Whether the cgroup refused a fork: a fork bomb, stopped at once rather than left to burn its time limit."""
    with contextlib.suppress(OSError, ValueError):
        return int((cgroup / "pids.events").read_text().split()[1]) > 0
    return False


def _drain(
    child: subprocess.Popen, result_r: int, deadline: float, hit_limit: Callable[[], bool]
) -> tuple[bytes, bytes, bool, bool]:
    """Read the child's output and the result channel until it exits (plus a grace second) or the deadline.

    Returns (output, channel, timed_out, process_limit_hit)."""
    selector = selectors.DefaultSelector()
    selector.register(child.stdout, selectors.EVENT_READ, "output")
    selector.register(result_r, selectors.EVENT_READ, "channel")
    output, channel = bytearray(), bytearray()
    exited_at = None
    next_limit_check = 0.0
    while selector.get_map():
        now = time.monotonic()
        if now >= deadline:
            return bytes(output), bytes(channel), True, False
        if now >= next_limit_check:
            next_limit_check = now + 0.1
            if hit_limit():
                return bytes(output), bytes(channel), False, True
        if exited_at is None and child.poll() is not None:
            exited_at = now
        if exited_at is not None and now - exited_at > 1.0:  # a leftover grandchild holds the pipes open
            break
        for key, _ in selector.select(timeout=min(0.2, deadline - now)):
            fd = key.fileobj if isinstance(key.fileobj, int) else key.fileobj.fileno()
            data = os.read(fd, 65536)
            if not data:
                selector.unregister(key.fileobj)
            elif key.data == "output":
                output += data
                del output[: max(0, len(output) - OUTPUT_TAIL_BYTES)]
            elif len(channel) < MAX_CHANNEL_BYTES:
                channel += data
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return bytes(output), bytes(channel), child.poll() is None, False


# ---------------------------------------------------------------------------------------------------- jail
def _enter_jail(config: dict, argv: list[str]) -> None:
    """Apply the limits to this process, then become the untrusted command with its own environment."""
    if config["cgroup"]:
        Path(config["cgroup"], "cgroup.procs").write_text(str(os.getpid()))
    limits = config["limits"]
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["max_file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["max_open_files"],) * 2)
    if limits["address_space_bytes"]:
        resource.setrlimit(resource.RLIMIT_AS, (limits["address_space_bytes"],) * 2)
    if config["landlock"]:
        landlock.restrict(read=config["read"], write=config["write"])
    os.execve(argv[0], argv, config["env"])


def main(argv: list[str]) -> int:
    if argv[:1] == ["supervise"]:
        raw = json.loads(sys.stdin.read())
        spec = JailSpec(**{**raw, "limits": Limits(**raw["limits"])})
        try:
            result = _supervise(spec)
        except Exception as error:  # report, never hang the grader: the grader turns this into an infra error
            result = RunResult(None, False, 0.0, supervisor_error=f"{type(error).__name__}: {error}")
        print(json.dumps(asdict(result)), flush=True)
        return 0
    if argv[:1] == ["jail"] and "--" in argv:
        split = argv.index("--")
        _enter_jail(json.loads(argv[1]), argv[split + 1 :])
    print("usage: python -m common.grading.sandbox supervise < spec.json", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
