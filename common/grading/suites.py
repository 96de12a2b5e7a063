"""A command run once in a fresh sandbox, on a source tree the grader chose: a student's test suite, a pipeline.

Some tasks grade what a submission's *tests* do (mutation grading: do they pass on a correct program and fail
on one with a bug planted back?) or run a submitted pipeline (`dvc repro`). The trusted checker picks the
source tree (the student's files, or the reference with one bug injected), and `run_isolated` runs a command
on it in a sandbox of its own (`sandbox.wrap`: the same bubblewrap isolation as the worker, the tree read-only
at /submission/src, a fresh /tmp, one writable folder at /outbox) and reports what the harness itself observed:

- whether the command started at all: the launcher reports on a pipe just before it executes the command, so
  a sandbox or launcher that failed is the machine's fault (`CommandDidNotStartError`), never a test failure;
- the command's exit status, read by `waitpid` here (None when it was killed);
- whether it was killed at its time limit, or for starting more processes than allowed (the process tree is
  counted from outside, as `session` does for workers);
- the regular files it left in the outbox (capped), and the tail of its output.

Each run is a new sandbox, so nothing (a file in /tmp, a SysV segment, a process) carries from one run to the
next: a suite cannot tell "the second run" from "the first". What happens *inside* is the submission's to
decide: a suite may exit 0 or 1 as it likes, and may write anything to the outbox (a coverage report
included). The verdict the caller draws from a run is therefore only as strong as "this command, on this
tree, exited with this status": the caller chooses the trees so that such a status means something.

The launcher (`python -m common.grading.launcher ... -- ARGV`, standard library only) applies the per-process
limits inside the sandbox before it executes ARGV, so no code of the submission runs before them.

Runs are cached in the batch's folder by a hash of everything that decides them (the tree's bytes, the
command, its environment, the limits, and `repeat`: a run repeated to see whether its outcome holds must not
come from the cache of the first): the self-test grades several variants that share a test suite and a
program, and a batch may hold identical submissions. A run killed at a limit is never cached, and a cached
run is used only if it finished within the time the caller has left (`budget_s`).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from common.grading.faults import CommandDidNotStartError
from common.grading.sandbox import SRC_MOUNT, SandboxSpec, outbox_path, wrap
from common.grading.session import WATCH_INTERVAL_S, kill_all, live_tree, session_members

OUTPUT_BYTES = 16 * 1024  # of a run's output, for the TA's log and a failure message
# A sandbox and the launcher start in well under a second: one that has not started in this long is the machine's.
LAUNCH_TIMEOUT_S = 30.0


class TreeError(ValueError):
    """A source tree with a path that is not a plain relative path."""


@dataclass(frozen=True)
class IsolatedSettings:
    """How the checker runs isolated commands (from its config); the same for every run of a submission."""

    workdir: Path  # host folder for the runs' trees and outboxes (trusted; emptied after each run)
    sandboxed: bool = True
    threads: int = 1
    max_processes: int = 64
    address_space_bytes: int = 8 * 2**30  # per process: torch alone maps ~3 GB
    max_file_bytes: int = 64 * 2**20
    max_open_files: int = 1024
    outbox_bytes: int = 4 * 2**20  # read back from the outbox, in all
    cache: Path | None = None  # the batch's cache of finished runs


@dataclass(frozen=True)
class IsolatedRun:
    """What the harness observed of one run."""

    returncode: int | None  # the command's exit status; None if it was killed (see `stopped`)
    stopped: str = ""  # "", "time limit" or "process limit"
    duration_s: float = 0.0
    files: dict[str, bytes] = field(default_factory=dict)  # regular files left in the outbox, relative paths
    output: str = ""  # the tail of its stdout and stderr
    cached: bool = False


def _check_tree(tree: dict[str, bytes]) -> None:
    for path in tree:
        parts = PurePosixPath(path).parts
        if not parts or path.startswith("/") or ".." in parts or "\\" in path:
            raise TreeError(f"{path!r} is not a relative path inside the tree")


def _key(
    tree: dict[str, bytes],
    argv: list[str],
    env: dict[str, str],
    limit: float,
    repeat: int,
    s: IsolatedSettings,
) -> str:
    digest = hashlib.sha256()
    for path in sorted(tree):
        digest.update(f"{path}\0{hashlib.sha256(tree[path]).hexdigest()}\0".encode())
    settings = {k: v for k, v in asdict(s).items() if k not in ("workdir", "cache")}
    digest.update(json.dumps([argv, sorted(env.items()), limit, repeat, settings], default=str).encode())
    return digest.hexdigest()


def _from_cache(cache: Path, key: str) -> IsolatedRun | None:
    path = cache / f"{key}.json"
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    files = {name: base64.b64decode(data) for name, data in raw.pop("files").items()}
    return IsolatedRun(**{**raw, "files": files, "cached": True})


def _to_cache(cache: Path, key: str, run: IsolatedRun) -> None:
    if run.stopped:
        return
    raw = {**asdict(run), "files": {n: base64.b64encode(d).decode() for n, d in run.files.items()}}
    partial = cache / f"{key}.{os.getpid()}.part"
    partial.write_text(json.dumps(raw))
    partial.replace(cache / f"{key}.json")


def run_isolated(
    tree: dict[str, bytes],
    argv: list[str],
    time_limit_s: float,
    settings: IsolatedSettings,
    env: dict[str, str] | None = None,
    *,
    budget_s: float | None = None,
    repeat: int = 0,
) -> IsolatedRun:
    """Run `argv` once in a fresh sandbox whose /submission/src is `tree` (path -> bytes); see the module doc.

    `argv` may name the tree as `{src}` and the outbox as `{outbox}` (/submission/src and /outbox in the
    sandbox; host folders without one). It starts in the sandbox's writable folder (/tmp). It is stopped at
    `time_limit_s`, or earlier at `budget_s` (what is left of the caller's own time limit). `repeat` numbers
    identical runs, so that each is a run of its own rather than the first one's cached result."""
    _check_tree(tree)
    env = dict(env or {})
    budget_s = time_limit_s if budget_s is None else budget_s
    limit_now = min(time_limit_s, budget_s)
    if settings.cache is None:
        return _run_fresh(tree, argv, limit_now, settings, env)
    key = _key(tree, argv, env, time_limit_s, repeat, settings)
    settings.cache.mkdir(parents=True, exist_ok=True)
    with open(settings.cache / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a checker running the same run now: wait for its result
        cached = _from_cache(settings.cache, key)
        if cached is not None and cached.duration_s <= budget_s:
            return cached
        run = _run_fresh(tree, argv, limit_now, settings, env)
        _to_cache(settings.cache, key, run)
        return run


def _run_fresh(
    tree: dict[str, bytes],
    argv: list[str],
    time_limit_s: float,
    settings: IsolatedSettings,
    env: dict[str, str],
) -> IsolatedRun:
    settings.workdir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="isolated-", dir=settings.workdir))
    try:
        outbox = folder / "outbox"
        outbox.mkdir()
        launch = sandboxed_command(tree, argv, settings, env, folder, outbox)
        try:
            run = _run(launch.argv, time_limit_s, settings.max_processes + 2, launch.status_write)
            status = read_status(launch.status_read)
        finally:
            os.close(launch.status_read)
        # The sandbox or the launcher failed before the command ran (see launcher): the machine's fault, unless
        # the run was given less time than a sandbox may take to start (what was left of a task's time).
        cut_short = run.stopped == "time limit" and time_limit_s < LAUNCH_TIMEOUT_S
        if status != b"exec\n" and not cut_short:
            raise did_not_start(argv, status, run.output)
        run = IsolatedRun(
            run.returncode, run.stopped, run.duration_s, _read_outbox(outbox, settings), run.output
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return run


@dataclass(frozen=True)
class Launch:
    """A command wrapped in its sandbox and the launcher, with the launcher's status pipe (see `launcher`)."""

    argv: list[str]
    status_read: int  # the harness reads "exec" here once the command has started
    status_write: int  # passed to the launcher; the caller closes it once the sandbox has started


def sandboxed_command(
    tree: dict[str, bytes],
    argv: list[str],
    settings: IsolatedSettings,
    env: dict[str, str],
    folder: Path,
    outbox: Path,
) -> Launch:
    """Write `tree` below `folder` and wrap `argv` (its `{src}` and `{outbox}` filled in) in a sandbox whose
    one writable folder besides /tmp is `outbox`, behind the launcher that applies the per-process limits."""
    _check_tree(tree)
    src, scratch = folder / "src", folder / "scratch"
    for path, data in tree.items():
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_bytes(data)
    src.mkdir(exist_ok=True)
    (scratch / "tmp").mkdir(parents=True)
    spec = SandboxSpec(src=src, scratch=scratch, threads=settings.threads, sandboxed=settings.sandboxed,
                       outbox=outbox)  # fmt: skip
    where = {"{outbox}": outbox_path(spec), "{src}": SRC_MOUNT if spec.sandboxed else str(src)}
    command = [_fill(arg, where) for arg in argv]
    status_read, status_write = os.pipe()
    launcher = [sys.executable, "-P", "-m", "common.grading.launcher",
                f"--address-space={settings.address_space_bytes}", f"--file-size={settings.max_file_bytes}",
                f"--open-files={settings.max_open_files}", f"--status-fd={status_write}",
                "--", *command]  # fmt: skip
    return Launch(wrap(spec, launcher, env), status_read, status_write)


def did_not_start(argv: list[str], status: bytes, output: str) -> CommandDidNotStartError:
    """The machine's fault: the sandbox or the launcher failed before `argv` ran."""
    said = status.decode(errors="replace").strip() or "nothing"
    name = PurePosixPath(argv[0]).name if argv else "the command"
    return CommandDidNotStartError(
        f"{name} did not start in its sandbox (the launcher said {said!r}): {output[-600:]}"
    )


def _fill(arg: str, where: dict[str, str]) -> str:
    for placeholder, path in where.items():
        arg = arg.replace(placeholder, path)
    return arg


def read_status(fd: int) -> bytes:
    """What the launcher wrote to its status pipe (read once the run is over, without waiting for more)."""
    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 4096):
            data += chunk
    return data[:1024]


def _run(argv: list[str], time_limit_s: float, max_processes: int, status_fd: int) -> IsolatedRun:
    """Start `argv` in a session of its own; kill its whole tree at the deadline or above `max_processes`.

    `status_fd` (the write end of the launcher's status pipe) is passed to the command and closed here."""
    output = bytearray()
    start = time.monotonic()
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True, env={},
                                   pass_fds=(status_fd,))  # fmt: skip
    except OSError as error:
        raise CommandDidNotStartError(f"the sandbox could not be started: {error}") from None
    finally:
        os.close(status_fd)

    def drain() -> None:
        while chunk := process.stdout.read1(65536):
            output.extend(chunk)
            del output[: max(0, len(output) - OUTPUT_BYTES)]

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stopped = ""
    while process.poll() is None:
        if time.monotonic() - start > time_limit_s:
            stopped = "time limit"
        elif len(live_tree(process)) > max_processes:
            stopped = "process limit"
        if stopped:
            kill_all(lambda: live_tree(process))
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=WATCH_INTERVAL_S)
    kill_all(lambda: session_members(process.pid))  # what the command left running in its session
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
    reader.join(timeout=5)
    code = None if stopped else process.returncode
    return IsolatedRun(code, stopped, time.monotonic() - start, {}, output.decode(errors="replace"))


def _read_outbox(outbox: Path, settings: IsolatedSettings) -> dict[str, bytes]:
    """The regular files the run left in its outbox (no links, nothing past the byte budget)."""
    files: dict[str, bytes] = {}
    left = settings.outbox_bytes
    for dirpath, _, filenames in os.walk(outbox, followlinks=False):
        for name in sorted(filenames):
            path = Path(dirpath) / name
            info = path.lstat()
            if not path.is_file() or path.is_symlink() or info.st_size > left:
                continue
            with open(path, "rb") as handle:
                data = handle.read(left + 1)
            if len(data) <= left:
                files[path.relative_to(outbox).as_posix()] = data
                left -= len(data)
    return files
