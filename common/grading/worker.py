"""The untrusted side: the process that runs a submission's code, inside the sandbox, and returns data.

`python -m common.grading.worker serve --channel-fd=N` is a *template*: it imports torch, the course library
and the assignment's `worker_preload` modules once, says "ready" on the channel (a socket the trusted
checker holds the other end of) and then, for each task,
forks a worker. Forking a process that has imported torch costs milliseconds; importing torch costs seconds.
No CUDA call happens in the template, so a worker may still start CUDA after the fork.

A worker applies its limits to itself, says "ready", and serves requests until told to exit:

    {"op": "call", "id": 1, "target": {...}, "args": [...], "kwargs": {...}, "keep": false}
        target: {"import": "pkg.module:qualname"}            a function or class of the submission
                {"handle": 3, "method": "set_epoch"}           a method of an object kept earlier
                {"scenario": "name", "source": "...", "function": "train"}   code that drives the submission
    replies:    {"id": 1, "value": <data>}                     the result, encoded by `wire`
                {"id": 1, "handle": 4}                         with "keep": the result stays here, as handle 4
                {"id": 1, "raised": {"kinds": ["ValueError", ...], "name": "...", "line": "..."}}
                {"id": 1, "not_data": "an object of type ..."}
    {"op": "exit"}

An exception is reported as the built-in classes it derives from, its own class name and the first line of
its message, each cut short: the trusted side never needs more, and nothing longer can ride out on it.

When a worker ends, the template kills every other process left in the sandbox (a PID namespace: `kill(-1)`
reaches exactly the sandbox's processes), reports the worker's exit status, and waits for the next task.
Everything here runs the submission's code or shares its sandbox: the trusted side believes none of it.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import importlib
import linecache
import os
import signal
import socket
import sys
import time
import types
from typing import Any

from common.grading import wire
from common.grading.launcher import apply_limits

LINE_CHARS = 160  # of an exception's first line
NAME_CHARS = 60  # of an exception's class name


def summarize_exception(error: BaseException) -> dict[str, Any]:
    """The built-in classes it is an instance of (nearest first), its class name and its message's first
    line, each capped."""
    kinds = [k.__name__ for k in type(error).__mro__ if getattr(builtins, k.__name__, None) is k]
    try:
        text = str(error)
    except Exception:  # a hostile __str__
        text = "<the message could not be read>"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return {"kinds": kinds[:8], "name": type(error).__name__[:NAME_CHARS], "line": first[:LINE_CHARS]}


class Worker:
    """Serves requests for one task: imports, calls, objects kept by handle, scenario modules."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.objects: dict[int, Any] = {}
        self.scenarios: dict[str, types.ModuleType] = {}

    def serve(self) -> None:
        while True:
            request = wire.receive(self.channel)
            if request.get("op") == "exit":
                return
            wire.send(self.channel, {"id": request.get("id"), **self.answer(request)})

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            function = self.resolve(request["target"])
            args = wire.decode(request.get("args", []), self.objects.__getitem__)
            kwargs = wire.decode(request.get("kwargs", {"$dict": []}), self.objects.__getitem__)
            result = function(*args, **kwargs)
        except BaseException as error:  # the submission's exceptions, SystemExit included, are its answer
            return {"raised": summarize_exception(error)}
        if request.get("keep"):
            handle = len(self.objects) + 1
            self.objects[handle] = result
            return {"handle": handle}
        try:
            return {"value": wire.encode(result)}
        except wire.NotData as error:
            return {"not_data": str(error)}
        except BaseException as error:  # e.g. MemoryError while encoding a huge result
            return {"raised": summarize_exception(error)}

    def resolve(self, target: dict[str, Any]) -> Any:
        if "import" in target:
            module_name, _, qualname = target["import"].partition(":")
            value: Any = importlib.import_module(module_name)
        elif "handle" in target:
            value, qualname = self.objects[target["handle"]], target["method"]
        else:
            value, qualname = self.scenario(target["scenario"], target["source"]), target["function"]
        for part in qualname.split("."):
            value = getattr(value, part)
        return value

    def scenario(self, name: str, source: str) -> types.ModuleType:
        """A scenario module from its source (sent by the trusted side), executed once per worker."""
        if name not in self.scenarios:
            self.scenarios[name] = load_scenario(name, source)
        return self.scenarios[name]


def load_scenario(name: str, source: str) -> types.ModuleType:
    """Execute a scenario's source as the module `scenarios.<name>`.

    The source is registered with linecache, so tracebacks show its lines and a spawned rank
    (`common.grading.ranks`) can be sent the same source."""
    module = types.ModuleType(f"scenarios.{name}")
    module.__file__ = f"<scenario {name}>"
    linecache.cache[module.__file__] = (len(source), None, source.splitlines(keepends=True), module.__file__)
    sys.modules[module.__name__] = module  # dataclasses and pickling look modules up here
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def _apply_limits(spawn: dict[str, Any]) -> None:
    """Limits and settings of one task, applied by the worker to itself before any submission code runs."""
    limits = spawn["limits"]
    apply_limits(
        limits["address_space_bytes"], limits["max_file_bytes"], limits["max_open_files"], spawn["cwd"]
    )
    import torch

    torch.set_num_threads(spawn["threads"])
    if spawn["gpu_memory_bytes"]:
        for index in range(torch.cuda.device_count()):  # the first CUDA call: after the fork, never before
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, spawn["gpu_memory_bytes"] / total), index)


def _run_worker(channel: socket.socket, spawn: dict[str, Any], sandboxed: bool) -> None:
    os.setsid()  # its own process group: outside a PID namespace, the template cleans up by group
    _apply_limits(spawn)
    from common.grading.ranks import start_zygote

    # Before the first request: ranks forked from it never hold another rank's arguments. In the sandbox each
    # also gets its own /tmp, /dev/shm, network and IPC, so the hub stays the ranks' only channel.
    start_zygote(private=sandboxed)
    wire.send(channel, {"event": "worker ready", "pid": os.getpid()})
    Worker(channel).serve()


def _kill_leftovers(worker_pid: int, pid_namespace: bool) -> None:
    """Kill whatever the last worker left behind, then reap it."""
    if pid_namespace:
        for _ in range(100):  # a process forking right now may survive one round
            with contextlib.suppress(ProcessLookupError):
                os.kill(-1, signal.SIGKILL)  # every process of the namespace but this one and its init
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            if not [p for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, os.getpid())]:
                return
            time.sleep(0.01)
    else:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(worker_pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass


def _exit_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def make_undumpable() -> None:
    """PR_SET_DUMPABLE 0, inherited by forks: processes of the same user can no longer ptrace this one or open
    its /proc/PID/mem. The template is shared by the tasks of a submission, so code that one task's worker
    started must not be able to rewrite it (and every later task's worker with it)."""
    pr_set_dumpable = 4
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_dumpable, 0, 0, 0, 0)


def serve_template(channel: socket.socket, pid_namespace: bool, preload: list[str]) -> None:
    """The template's loop: fork a worker per "spawn", wait for it, clean up, report."""
    make_undumpable()
    for module in ["torch", *preload]:  # the point of the template: imported once, shared by every fork
        importlib.import_module(module)
    if pid_namespace:  # sandboxed: a kernel that refuses ranks their namespaces fails here, not in a task
        from common.grading.ranks import check_rank_isolation

        check_rank_isolation()
    wire.send(channel, {"event": "template ready"})
    while True:
        try:
            request = wire.receive(channel)
        except EOFError:
            return
        if request.get("op") != "spawn":
            return
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _run_worker(channel, request, sandboxed=pid_namespace)
            except BaseException:  # the channel broke, or a limit could not be applied: the status says so
                code = 70
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        _kill_leftovers(pid, pid_namespace)
        wire.send(channel, {"event": "worker ended", "status": _exit_status(status)})


def main(argv: list[str]) -> int:
    fds = [int(arg.split("=", 1)[1]) for arg in argv if arg.startswith("--channel-fd=")]
    preload = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--preload=")]
    if argv[:1] != ["serve"] or len(fds) != 1:
        usage = "usage: python -m common.grading.worker serve --channel-fd=N [--preload=MODULE]... [--pid-namespace]"
        print(usage, file=sys.stderr)
        return 2
    serve_template(socket.socket(fileno=fds[0]), "--pid-namespace" in argv, preload)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
