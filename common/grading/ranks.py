"""Distributed code under test: a scenario run on N ranks in the worker, every collective seen by the grader.

A hidden test of distributed code runs the student's functions on several processes at once, and often has to
know how they communicated: SyncBatchNorm must make exactly one collective in forward, gradient accumulation
none on the micro-batches that do not step. A count kept inside the student's processes proves nothing (their
code can unwrap any wrapper and reset any counter), so here the count is a by-product of the data itself:

    def normalize(x):                               # a scenario function: runs on every rank
        from dataparallel.sync_batchnorm import SyncBatchNorm
        return SyncBatchNorm(x.shape[1])(x).detach()

    def forward(chunks):                            # the hidden test: submission.run(scenario.forward, chunks)
        return run_ranks(normalize, [(chunk,) for chunk in chunks], package="dataparallel")

    run = RankRun.from_data(seen)                   # in the checker: each rank's value, its collectives, stdout

- The hub. `run_ranks` runs in the worker and forks one process per rank. A rank's only process group is a
  *hub group*: a torch.distributed backend whose every collective is a message to the worker, the hub. The hub
  waits for every member of the group, checks that they called the same collective on the same shapes,
  computes the result itself (reductions in rank order) and sends each member its part. So a rank receives
  another rank's data only from the hub, and the hub's log of who called which collective on which group, in
  which order, is complete. To hide a collective from it, a submission would have to move the data by other
  means, its ranks' own sockets or files: writing a transport, not calling torch.distributed.
- Each rank holds its own arguments and nothing else. Ranks are not forked from the worker, which holds the
  whole call (every rank's arguments, the input a scenario split into shards), but from a *zygote*, a fork
  the worker took before it read its first request; a rank receives its own arguments, as data, on its link.
  The hub checks every payload against the shape and dtype of the tensor it is delivered into, so a
  collective carries what its shapes say (an empty all-to-all cannot stand in for a real one).
- The hub is trusted only because no student code ever ran in its process: `run_ranks` refuses to start if
  the student's package was imported into the worker (a hidden test of a distributed task reaches the
  submission only through ranks). It is non-dumpable, as the worker template it was forked from, so a rank can
  neither ptrace it nor write its memory through /proc; no folder on its sys.path is writable (`sandbox`); and
  each rank closes every socket but its own link (the checker's channel too) before any scenario or student
  code runs.
- Nothing else is shared. In the sandbox (`start_zygote(private=True)`), each rank forked for the hub enters
  namespaces of its own before it runs anything (`isolate_rank`): a private /tmp (its working folder
  recreated there) and /dev/shm, a read-only /dev, no network (not even loopback, nor abstract Unix sockets),
  its own System V and POSIX IPC; and it keeps no capability that could undo that. What remains between ranks
  are signals and the other ranks' /proc entries, channels of a few bits per system call that a submission
  would have to build on purpose, plain in its source; the statement forbids them. Ranks of a real backend
  are not isolated: their rendezvous is a file in the worker's folder, and NCCL needs /dev/shm.
- The schedule is adversarial, so that output which relies on luck fails every time: ranks start one at a
  time, highest rank first, each running until its first collective or its end, and leave one at a time,
  highest first. Text that a rank printed without synchronising, or without flushing, comes out reversed.
- A hang is reported, not waited for: when no rank can move (each waits in a collective that some member will
  never join), the hub names what each waits in and ends the run. `timeout_s` bounds a rank that computes
  forever.
- DTensor. A DeviceMesh can be built over the hub's groups (they answer `group_name`), so DTensors and FSDP2
  run on them, and their c10d calls (`all_gather_into_tensor`, `reduce_scatter_tensor`) are hub collectives
  like any other. DTensor's functional collectives (`full_tensor`, `redistribute`) are not: they dispatch to a
  C++ backend, which a Python process group has none of, and fail.
- Real backends. backend="gloo" or "nccl" gives the ranks a real process group (a FileStore rendezvous in the
  worker's folder) and counts nothing. A GPU task's worker has initialised CUDA, which a forked child cannot
  use, so there the ranks are spawned: fresh interpreters that get the scenario's source from the hub.

What comes back is data for the checker (`RankRun.from_data`): each rank's return value or exception, its
collectives in order (kind, the group's members as global ranks, the root as a global rank, the reduce op),
everything the ranks wrote to stdout in the order it arrived, and a hang report or None.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import functools
import importlib
import linecache
import math
import os
import select
import selectors
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future
from torch.futures import Future

from common.distributed.launch import die_with_parent, join_process_group
from common.grading import wire
from common.grading.client import expect
from common.grading.worker import load_scenario, make_undumpable, summarize_exception

__all__ = ["HUB_BACKEND", "Collective", "RankRun", "run_ranks"]

HUB_BACKEND = "effdl_hub"
STDOUT_BYTES = 1 << 20  # of the ranks' output kept: enough for any test, too little to exhaust the worker
EXIT_WAIT_S = 10.0  # for a rank to exit once told to, or to finish a message it began, before it is killed
_REDUCE_OPS = ("SUM", "AVG", "PRODUCT", "MIN", "MAX", "BAND", "BOR", "BXOR")
_REDUCERS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sum": torch.add, "avg": torch.add, "product": torch.mul, "min": torch.minimum, "max": torch.maximum,
    "band": torch.bitwise_and, "bor": torch.bitwise_or, "bxor": torch.bitwise_xor,
}  # fmt: skip


class Collective(NamedTuple):
    """One collective call of one rank, as the hub saw it."""

    kind: str  # "all_reduce", "broadcast", "reduce", "all_gather", "barrier", "send", "recv", ...
    group: tuple[int, ...]  # the group's members, as global ranks
    root: int | None  # the root (src or dst) as a global rank, where the collective has one
    reduce: str | None  # "sum", "max", ... where the collective reduces


class HubError(RuntimeError):
    """What the hub replies instead of a result: the ranks disagree about a collective, or it is malformed."""


# ====================================================================================================
# The rank's side: a torch.distributed backend whose collectives are messages to the hub
# ====================================================================================================


class _Link:
    """A rank's end of its socket to the hub: one request at a time, answered in order."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        wire.send(self.sock, message)
        reply = wire.receive(self.sock)
        if "error" in reply:
            raise HubError(reply["error"])
        return reply


_link: _Link | None = None  # this rank's link, set before the process group is created


class HubGroup(dist.ProcessGroup):
    """A process group whose every collective is carried out by the hub (see the module docstring).

    Each method posts its inputs, waits for the hub's reply and copies the outputs into the caller's tensors:
    every collective completes before it returns, including `async_op=True` ones (their Work is done at once).
    """

    def __init__(self, link: _Link, rank: int, size: int, name: str, members: Sequence[int]) -> None:
        super().__init__(rank, size)
        self.link, self.name, self.members = link, name, list(members)

    def getBackendName(self) -> str:  # noqa: N802 (torch's name)
        return HUB_BACKEND

    @property
    def group_name(self) -> str:
        """The name torch registered the group under. torch reads it from a backend registered in the group,
        which a Python ProcessGroup has none of; DeviceMesh (so DTensor and FSDP2) needs it."""
        return self.name

    def _post(self, kind: str, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
              root: int | None = None, reduce: Any = None, **extra: Any) -> dist.Work:  # fmt: skip
        message = {
            "op": "collective", "kind": kind, "group": self.name, "members": self.members, "root": root,
            "reduce": _reduce_name(reduce), "inputs": [wire.encode(t.detach()) for t in inputs],
            "outputs": [[list(t.shape), str(t.dtype).removeprefix("torch.")] for t in outputs], **extra,
        }  # fmt: skip
        values = [wire.decode(value) for value in self.link.request(message)["outputs"]]
        if len(values) != len(outputs):
            raise HubError(f"{kind}: the hub sent {len(values)} tensors for {len(outputs)} outputs")
        with torch.no_grad():
            for out, value in zip(outputs, values, strict=True):
                if out.numel() != value.numel():
                    raise RuntimeError(
                        f"{kind}: an output tensor of shape {list(out.shape)} cannot hold the result's "
                        f"{value.numel()} elements"
                    )
                out.copy_(value.reshape(out.shape))
        future: Future = Future()
        future.set_result(list(outputs))
        return _create_work_from_future(future)

    def allreduce(self, tensors, opts=None):
        return self._post("all_reduce", tensors, tensors, reduce=_option(opts, "reduceOp"))

    def broadcast(self, tensors, opts):
        return self._post("broadcast", tensors, tensors, root=opts.rootRank)

    def reduce(self, tensors, opts):
        outputs = tensors if self.rank() == opts.rootRank else []
        return self._post("reduce", tensors, outputs, root=opts.rootRank, reduce=opts.reduceOp)

    def allgather(self, output_lists, inputs, opts=None):
        return self._post("all_gather", inputs, output_lists[0])

    def _allgather_base(self, output, input, opts=None):
        return self._post("all_gather_into_tensor", [input], [output])

    def gather(self, output_lists, inputs, opts):
        outputs = output_lists[0] if self.rank() == opts.rootRank else []
        return self._post("gather", inputs, outputs, root=opts.rootRank)

    def scatter(self, outputs, input_lists, opts):
        inputs = input_lists[0] if self.rank() == opts.rootRank else []
        return self._post("scatter", inputs, outputs, root=opts.rootRank)

    def reduce_scatter(self, outputs, input_lists, opts=None):
        return self._post("reduce_scatter", input_lists[0], outputs, reduce=_option(opts, "reduceOp"))

    def _reduce_scatter_base(self, output, input, opts=None):
        return self._post("reduce_scatter_tensor", [input], [output], reduce=_option(opts, "reduceOp"))

    def alltoall(self, outputs, inputs, opts=None):
        return self._post("all_to_all", inputs, outputs)

    def barrier(self, opts=None):
        return self._post("barrier", [], [])

    def send(self, tensors, dst, tag=0):
        return self._post("send", tensors, [], root=dst, tag=tag)

    def recv(self, tensors, src, tag=0):
        return self._post("recv", [], tensors, root=src, tag=tag)

    def recv_anysource(self, tensors, tag=0):
        raise HubError("the grader's process group has no recv from any source: name the source rank")

    def alltoall_base(self, *args, **kwargs):
        raise HubError(
            "the grader's process group has no all_to_all_single: use all_to_all with tensor lists"
        )


def _option(opts: Any, name: str) -> Any:
    return getattr(opts, name) if opts is not None else dist.ReduceOp.SUM


def _reduce_name(op: Any) -> str | None:
    if op is None:
        return None
    for name in _REDUCE_OPS:
        if op == getattr(dist.ReduceOp, name):
            return name.lower()
    raise HubError(
        f"the reduce op {op} is not supported here (use SUM, AVG, PRODUCT, MIN, MAX or a bitwise one)"
    )


def _create_hub_group(options: Any, backend_options: Any) -> HubGroup:
    """torch.distributed's constructor hook for the hub backend (extended API: it passes the global ranks)."""
    if _link is None:
        raise RuntimeError(f"the {HUB_BACKEND} backend works only inside common.grading.ranks.run_ranks")
    members = list(options.global_ranks_in_group) or list(range(options.group_size))  # empty: the world
    return HubGroup(_link, options.group_rank, options.group_size, options.group_id, members)


dist.Backend.register_backend(HUB_BACKEND, _create_hub_group, extended_api=True, devices=["cpu"])


# ====================================================================================================
# One rank: the child process
# ====================================================================================================


@dataclass(frozen=True)
class _RankSetup:
    rank: int
    world_size: int
    backend: str
    store: str  # the FileStore's path, for real backends
    timeout_s: float


def _rank_main(setup: _RankSetup, sock: socket.socket, fn: Callable[..., Any], args: tuple) -> None:
    """Wait for the hub's go, join the process group, run fn, report, wait to be let go. Never returns."""
    global _link
    _link = _Link(sock)
    try:
        wire.receive(sock)  # {"op": "go"}
        torch.set_num_threads(1)  # N ranks share the worker's cores, as under torchrun
        _join(setup)
        message = {"op": "result", "value": wire.encode(fn(*args))}
    except wire.NotData as error:
        message = {"op": "raised", "raised": summarize_exception(TypeError(f"returned {error}, not data"))}
    except BaseException as error:  # the rank's answer, whatever the submission raised
        message = {"op": "raised", "raised": summarize_exception(error)}
    with contextlib.suppress(BaseException):
        if dist.is_initialized() and setup.backend != HUB_BACKEND:
            dist.destroy_process_group()
        wire.send(sock, message)
        wire.receive(sock)  # {"op": "exit"}: leave in the hub's order
    with contextlib.suppress(BaseException):
        sys.stdout.flush()
    os._exit(0)


def _join(setup: _RankSetup) -> None:
    if setup.backend == HUB_BACKEND:  # no rendezvous: every collective is a message to the hub
        dist.init_process_group(HUB_BACKEND, store=dist.HashStore(), rank=setup.rank, world_size=setup.world_size,
                                timeout=datetime.timedelta(seconds=setup.timeout_s))  # fmt: skip
    else:
        store = dist.FileStore(setup.store, setup.world_size)
        join_process_group(
            setup.backend, setup.rank, setup.world_size, setup.timeout_s, store, local_rank=setup.rank
        )


def _close_inherited(keep: set[int]) -> None:
    """Close every inherited socket and pipe but `keep`: the checker's channel, the hub's other links."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep:
            continue
        with contextlib.suppress(OSError):
            mode = os.fstat(fd).st_mode
            if stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode):
                os.close(fd)


# ----------------------------------------------------------------------------------------- a rank's own files
_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWUSER, _CLONE_NEWNET = 0x20000, 0x8000000, 0x10000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND = 0x1, 0x2, 0x4, 0x20, 0x1000
PRIVATE_TMP_BYTES = 256 * 2**20  # each of a rank's /tmp and /dev/shm: memory, counted when written


def isolate_rank() -> None:
    """Give this process (a rank just forked, so single-threaded) its own /tmp and /dev/shm, a read-only /dev,
    no network and its own IPC, then give up the power to change any of it.

    unshare() needs no privilege when it also makes a user namespace (the sandbox's uid is mapped onto itself
    there); in it the rank may mount. A second, nested user namespace then drops that power: mounts belong to
    the namespace that made them, so the rank can no longer unmount its /tmp to uncover the sandbox's, and a
    mount namespace it makes later copies them locked. The working folder is made again in the new /tmp.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    cwd = os.getcwd()
    _enter_user_namespace(libc, _CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWIPC)
    private = f"size={PRIVATE_TMP_BYTES},mode=0700".encode()
    for where in (b"/tmp", b"/dev/shm"):
        _mount(libc, b"tmpfs", where, b"tmpfs", _MS_NOSUID | _MS_NODEV, private)
    _mount(libc, b"tmpfs", b"/dev/pts", b"tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV, None)  # no shared ptys
    _mount(libc, None, b"/dev", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, None)
    if cwd == "/tmp" or cwd.startswith("/tmp/"):
        os.makedirs(cwd, exist_ok=True)
    os.chdir(cwd)  # the old one is the sandbox's /tmp, shared: a relative path must not reach it
    _enter_user_namespace(libc, _CLONE_NEWUSER)


def _enter_user_namespace(libc: ctypes.CDLL, flags: int) -> None:
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(flags) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"a rank could not get namespaces of its own: unshare: {os.strerror(error)}")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as file:
            file.write(text)


def _mount(libc: ctypes.CDLL, source: bytes | None, target: bytes, kind: bytes | None, flags: int,
           options: bytes | None) -> None:  # fmt: skip
    if libc.mount(source, target, kind, flags, options) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"a rank could not mount {target.decode()}: {os.strerror(error)}")


def check_rank_isolation() -> None:
    """Raise RuntimeError, with the reason, unless a fork of this process can `isolate_rank()` (the sandbox's
    template calls this before it says ready: a kernel that refuses is the machine's fault, never a rank's)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(read)
            isolate_rank()
        except BaseException as error:
            os.write(write, str(error).encode()[:500])
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        reason = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError(f"the ranks cannot be isolated in this sandbox: {reason or f'status {status}'}")


def _rank_spec(setup: _RankSetup, fn: Callable[..., Any], args: tuple, *, by_source: bool) -> dict[str, Any]:
    """What a rank process is told: its setup, where fn lives, and its own arguments only (as data)."""
    module = sys.modules[fn.__module__]
    spec: dict[str, Any] = {
        "rank": setup.rank, "world_size": setup.world_size, "backend": setup.backend, "store": setup.store,
        "timeout_s": setup.timeout_s, "module": module.__name__, "function": fn.__qualname__,
        "args": wire.encode(list(args)),
    }  # fmt: skip
    if module.__name__.startswith("scenarios."):  # loaded from the checker's text after the zygote was forked
        spec["source"] = "".join(linecache.getlines(module.__file__ or ""))
    elif by_source:
        raise RuntimeError(f"spawned ranks run functions of scenario modules only, not {fn.__qualname__}")
    return spec


def _spawn_rank(
    setup: _RankSetup, fn: Callable[..., Any], args: tuple, stdout_fd: int
) -> tuple[int, socket.socket]:
    """A fresh interpreter as the rank (for CUDA after the worker initialised it); it gets fn by source."""
    spec = _rank_spec(setup, fn, args, by_source=True)
    ours, theirs = socket.socketpair()
    command = [
        sys.executable,
        "-P",  # no current directory (writable) on sys.path
        "-c",
        f"from common.grading.ranks import spawned_main; spawned_main({theirs.fileno()})",
    ]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stdout_fd,
                               pass_fds=(theirs.fileno(),), start_new_session=True)  # fmt: skip
    theirs.close()
    wire.send(ours, spec)
    return process.pid, ours


def spawned_main(link_fd: int) -> None:
    """The body of a spawned rank (its link to the hub is `link_fd`): get the setup, then run as a forked one."""
    sock = socket.socket(fileno=link_fd)
    die_with_parent()
    _run_spec(sock)


def _run_spec(sock: socket.socket) -> None:
    """Receive this rank's spec on `sock` (`_rank_spec`) and run its function as the rank. Never returns.

    The function is looked up when the rank runs it, so a module that fails to load is the rank's exception."""
    spec = wire.receive(sock)
    if spec.get("isolate"):
        isolate_rank()  # before anything of the scenario's or the student's runs

    def fn(*args: Any) -> Any:
        if "source" in spec:
            module = load_scenario(spec["module"].removeprefix("scenarios."), spec["source"])
        else:
            module = importlib.import_module(spec["module"])
        return functools.reduce(getattr, spec["function"].split("."), module)(*args)

    setup = _RankSetup(spec["rank"], spec["world_size"], spec["backend"], spec["store"], spec["timeout_s"])
    _rank_main(setup, sock, fn, tuple(wire.decode(spec["args"])))


# ----------------------------------------------------------------------------------------- the zygote
# A forked rank is a copy of the process it was forked from. Forked from the worker, it would hold everything
# the worker holds: every rank's arguments, the whole input a scenario split into shards (a red-team
# submission computed Ulysses attention from the other ranks' shards and sent empty all-to-alls). So ranks are
# forked from a *zygote*: a fork of the worker taken before the worker reads its first request, which never
# receives a call's data. It only forks; each child then receives its own spec, and nothing else, on its link.
class _Zygote(NamedTuple):
    pid: int
    sock: socket.socket  # SOCK_SEQPACKET: a request is b"fork" + the ranks' stdout pipe; a reply, pid + link
    private: bool  # whether its hub ranks get namespaces of their own (`isolate_rank`)


_zygote: _Zygote | None = None


def start_zygote(private: bool = False) -> None:
    """Fork the process that ranks are forked from, now (once per process; later calls do nothing).

    The sandbox's worker calls this before it reads its first request, while it holds no call's data, with
    `private`: each rank forked for the hub then gets its own /tmp, /dev/shm, network and IPC (`isolate_rank`).
    Outside the worker (the repository's tests, public tests) `run_ranks` starts it on first use, without.
    """
    global _zygote
    if _zygote is not None:
        return
    sys.stdout.flush()  # a fork copies what is still buffered
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        try:
            ours.close()
            die_with_parent()
            _close_inherited({0, 1, 2, theirs.fileno()})
            # The kernel reaps its ranks; the hub waits on pidfds.
            signal.signal(signal.SIGCHLD, signal.SIG_IGN)
            _zygote_main(theirs)
        finally:
            os._exit(0)
    theirs.close()
    _zygote = _Zygote(pid, ours, private)


def _zygote_main(sock: socket.socket) -> None:
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(sock, 16, 1)
        except OSError:
            return
        if not fds:  # the hub's end closed
            return
        stdout_fd = fds[0]
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the rank
            try:
                ours.close()
                sock.close()
                os.setsid()
                die_with_parent()
                os.dup2(stdout_fd, 1)
                # A fresh sys.stdout on the pipe, buffered as a process's stdout into a pipe is.
                sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115 (lives as long as the rank)
                _close_inherited({0, 1, 2, theirs.fileno()})
                _run_spec(theirs)
            finally:  # never back into the zygote's loop
                os._exit(70)
        os.close(stdout_fd)
        theirs.close()
        with contextlib.suppress(OSError):
            socket.send_fds(sock, [pid.to_bytes(8, "little")], [ours.fileno()])
        ours.close()


def _fork_rank(
    setup: _RankSetup, fn: Callable[..., Any], args: tuple, stdout_fd: int
) -> tuple[int, socket.socket]:
    """A fork of the zygote as the rank; it receives its own arguments, and no other rank's, on its link."""
    start_zygote()
    assert _zygote is not None
    spec = _rank_spec(setup, fn, args, by_source=False)
    spec["isolate"] = _zygote.private and setup.backend == HUB_BACKEND  # a real backend's store is a file
    try:
        socket.send_fds(_zygote.sock, [b"fork"], [stdout_fd])
        data, fds, _, _ = socket.recv_fds(_zygote.sock, 16, 1)
    except OSError as error:
        raise RuntimeError(f"the process ranks are forked from is gone ({error}): a rank of an earlier run "
                           "killed it") from None  # fmt: skip
    if len(data) != 8 or len(fds) != 1:
        raise RuntimeError("the process ranks are forked from is gone: a rank of an earlier run killed it")
    ours = socket.socket(fileno=fds[0])
    wire.send(ours, spec)
    return int.from_bytes(data, "little"), ours


# ====================================================================================================
# The hub: the worker's side
# ====================================================================================================


@dataclass
class _Post:
    """A collective one rank called and waits in."""

    rank: int
    kind: str
    group: tuple[str, tuple[int, ...]]  # (name, members)
    root: int | None  # a global rank
    reduce: str | None
    inputs: list[torch.Tensor]
    outputs: list[tuple[tuple[int, ...], str]]  # the shape and dtype of each tensor the rank receives into
    tag: int = 0

    @property
    def members(self) -> tuple[int, ...]:
        return self.group[1]

    def record(self) -> tuple:
        return (self.kind, list(self.members), self.root, self.reduce)

    def describe(self) -> str:
        root = "" if self.root is None else f", root {self.root}"
        return f"{self.kind} on ranks {list(self.members)}{root}"


@dataclass
class _Rank:
    pid: int
    sock: socket.socket
    state: str = "waiting"  # waiting (for go) -> running <-> blocked -> done -> gone
    post: _Post | None = None
    result: Any = None
    error: dict | None = None
    log: list[tuple] = field(default_factory=list)


class _Hub:
    """Starts the ranks in order, carries out their collectives, collects what they return."""

    def __init__(self, ranks: list[_Rank], stdout_fd: int, timeout_s: float, ordered_start: bool) -> None:
        self.ranks, self.stdout_fd, self.ordered_start = ranks, stdout_fd, ordered_start
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.stdout = bytearray()
        self.mailbox: list[_Post] = []  # sends not yet received
        self.hang: str | None = None
        self.selector = selectors.DefaultSelector()
        for number, rank in enumerate(ranks):
            rank.sock.settimeout(EXIT_WAIT_S)  # a rank that sends half a message must not stall the hub
            self.selector.register(rank.sock, selectors.EVENT_READ, number)
        os.set_blocking(stdout_fd, False)
        self.selector.register(stdout_fd, selectors.EVENT_READ, "stdout")

    # ------------------------------------------------------------------------------------------- the loop
    def run(self) -> None:
        try:
            self._start_next()
            while any(rank.state in ("running", "blocked", "waiting") for rank in self.ranks):
                if self._stuck():
                    return
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    self.hang = f"the ranks did not finish within {self.timeout_s:g} s: {self._where()}"
                    return
                for key, _ in self.selector.select(remaining):
                    if key.data == "stdout":
                        self._read_stdout()
                    else:
                        self._receive(key.data)
                self._start_next()
            self._let_go()
        finally:
            self._kill_all()
            self._read_stdout()
            self.selector.close()

    def _start_next(self) -> None:
        """Send go to the next rank, highest first, once no started rank is still running (or all at once)."""
        waiting = [r for r in self.ranks if r.state == "waiting"]
        while waiting and (not self.ordered_start or all(r.state != "running" for r in self.ranks)):
            rank = waiting.pop()
            rank.state = "running"
            self._send(rank, {"op": "go"})

    def _let_go(self) -> None:
        """Let the ranks exit one at a time, highest first: output they never flushed comes out in that order."""
        for rank in reversed(self.ranks):
            if rank.state != "done":
                continue
            self._send(rank, {"op": "exit"})
            _reap(rank.pid, EXIT_WAIT_S, while_waiting=self._read_stdout)  # it flushes as it exits

    # ------------------------------------------------------------------------------------------ messages
    def _receive(self, number: int) -> None:
        rank = self.ranks[number]
        try:
            message = wire.receive(rank.sock)
            self._handle(number, rank, message)
        except (EOFError, OSError):
            self._gone(rank, "the rank's process ended without returning or raising")
        except Exception as error:  # the rank's code wrote on its link: malformed data is its failure
            self._gone(rank, f"the rank sent a malformed message ({error})")

    def _handle(self, number: int, rank: _Rank, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "result":
            rank.result, rank.state = wire.decode(message["value"]), "done"
        elif op == "raised":
            raised = message["raised"]
            rank.error, rank.state = expect(raised, dict[str, Any], "a rank's exception"), "done"
        elif op == "collective" and rank.state == "running":
            post = self._parse(number, message)
            rank.post, rank.state = post, "blocked"
            rank.log.append(post.record())
            self._progress(post)
        else:
            raise ValueError(f"unexpected {op!r} from a rank that is {rank.state}")

    def _parse(self, number: int, message: dict[str, Any]) -> _Post:
        members = tuple(expect(message["members"], list[int], "members"))
        if (
            number not in members
            or len(set(members)) != len(members)
            or not set(members) <= set(range(len(self.ranks)))
        ):
            raise ValueError(f"rank {number} posted to a group of ranks {list(members)}")
        root = expect(message["root"], int | None, "root")
        if root is not None and not 0 <= root < len(members):
            raise ValueError(f"root {root} is not a rank of a group of {len(members)}")
        inputs = [wire.decode(t) for t in expect(message["inputs"], list[Any], "inputs")]
        outputs = expect(message["outputs"], list[list[Any]], "outputs")
        if not all(len(o) == 2 and type(o[1]) is str and all(type(n) is int for n in o[0]) for o in outputs):
            raise TypeError("a collective's outputs must be [shape, dtype] pairs")
        if not all(type(t) is torch.Tensor for t in inputs):
            raise TypeError("a collective's inputs must be tensors")
        return _Post(
            rank=number,
            kind=expect(message["kind"], str, "kind"),
            group=(expect(message["group"], str, "group"), members),
            root=None if root is None else members[root],
            reduce=expect(message["reduce"], str | None, "reduce"),
            inputs=inputs,
            outputs=[(tuple(shape), dtype) for shape, dtype in outputs],
            tag=expect(message.get("tag", 0), int, "tag"),
        )

    def _send(self, rank: _Rank, message: dict[str, Any]) -> None:
        try:
            wire.send(rank.sock, message)
        except OSError:
            self._gone(rank, "the rank's process ended without returning or raising")

    def _gone(self, rank: _Rank, why: str) -> None:
        if rank.state != "done":
            rank.error = {"kinds": [], "name": "RankDied", "line": why}
        rank.state, rank.post = "gone", None
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(rank.sock)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(rank.pid, signal.SIGKILL)

    # ------------------------------------------------------------------------------------- collectives
    def _progress(self, post: _Post) -> None:
        """Complete what `post` makes complete: a collective all members have joined, or a send's receive."""
        if post.kind == "send":
            self.mailbox.append(post)
            self._reply(post, [])
            receiver = self.ranks[post.root]
            if receiver.post is not None and receiver.post.kind == "recv":
                self._progress(receiver.post)
            return
        if post.kind == "recv":
            match = next((s for s in self.mailbox if _matches(s, post)), None)
            if match is not None:
                self.mailbox.remove(match)
                self._reply(post, [match.inputs[0]] if match.inputs else [])
            return
        posts = [self.ranks[m].post for m in post.members]
        if any(p is None or p.group != post.group for p in posts):
            return
        try:
            outputs = _carry_out(posts)
        except Exception as error:  # what the ranks posted cannot be carried out: every member is told why
            for p in posts:
                self._reply(p, None, f"{post.describe()}: {error}")
            return
        for p, out in zip(posts, outputs, strict=True):
            self._reply(p, out)

    def _reply(self, post: _Post, outputs: list[torch.Tensor] | None, error: str | None = None) -> None:
        rank = self.ranks[post.rank]
        if error is None and outputs is not None:
            error = _payload_mismatch(post, outputs)
        if rank.post is post:
            rank.post, rank.state = None, "running"
        message = {"error": error} if error else {"outputs": [wire.encode(t) for t in outputs]}
        self._send(rank, message)

    def _stuck(self) -> bool:
        """True (and a hang report) when nothing can move: no rank runs or waits to start, some wait in vain."""
        if any(r.state in ("running", "waiting") for r in self.ranks):
            return False
        if not any(r.state == "blocked" for r in self.ranks):
            return False
        self.hang = f"the ranks can never finish: {self._where()}"
        return True

    def _where(self) -> str:
        parts = []
        for number, rank in enumerate(self.ranks):
            if rank.state == "blocked":
                parts.append(
                    f"rank {number} waits in {rank.post.describe()} (its collective #{len(rank.log)})"
                )
            elif rank.state == "running":
                parts.append(f"rank {number} is still computing")
            else:
                parts.append(f"rank {number} has {'finished' if rank.error is None else 'failed'}")
        return "; ".join(parts)

    # ------------------------------------------------------------------------------------------ clean-up
    def _read_stdout(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(self.stdout_fd, 65536):
                self.stdout += chunk[: max(0, STDOUT_BYTES - len(self.stdout))]

    def _kill_all(self) -> None:
        for rank in self.ranks:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(rank.pid, signal.SIGKILL)
            _reap(rank.pid, EXIT_WAIT_S)
            rank.sock.close()


def _matches(send: _Post, recv: _Post) -> bool:
    return (
        send.group == recv.group
        and send.root == recv.rank
        and recv.root == send.rank
        and send.tag == recv.tag
    )


def _reap(pid: int, timeout_s: float, while_waiting: Callable[[], None] = lambda: None) -> None:
    """Wait for the rank `pid` to exit (calling `while_waiting` meanwhile), at most `timeout_s`.

    A forked rank is the zygote's child, not ours: its exit is seen through a pidfd, and the kernel reaps it.
    A spawned rank is our child: it is reaped here."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            while_waiting()
            if select.select([pidfd], [], [], 0.002)[0]:
                break
    finally:
        os.close(pidfd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


# ----------------------------------------------------------------------------------------- arithmetic
def _carry_out(posts: list[_Post]) -> list[list[torch.Tensor]]:
    """Each member's outputs of one collective that every member of its group has joined, in group order."""
    first = posts[0]
    for post in posts[1:]:
        if (post.kind, post.root, post.reduce) != (first.kind, first.root, first.reduce):
            raise HubError(
                f"the ranks of one group called different collectives: rank {first.rank} {first.describe()} "
                f"(reduce {first.reduce}), rank {post.rank} {post.describe()} (reduce {post.reduce})"
            )
    size = len(posts)
    root = first.members.index(first.root) if first.root is not None else None
    kind = first.kind
    if kind == "barrier":
        return [[] for _ in posts]
    if kind == "all_reduce":
        return [_reduce_lists([p.inputs for p in posts], first.reduce)] * size
    if kind == "broadcast":
        _same_shapes([p.inputs for p in posts])
        return [posts[root].inputs] * size
    if kind == "reduce":
        reduced = _reduce_lists([p.inputs for p in posts], first.reduce)
        return [reduced if i == root else [] for i in range(size)]
    if kind == "all_gather":
        gathered = [_single(p) for p in posts]
        _same_shapes([[t] for t in gathered])
        return [gathered] * size
    if kind == "all_gather_into_tensor":
        gathered = [_single(p) for p in posts]
        _same_shapes([[t] for t in gathered])
        return [[torch.cat([t.reshape(-1) for t in gathered])]] * size
    if kind == "gather":
        gathered = [_single(p) for p in posts]
        return [gathered if i == root else [] for i in range(size)]
    if kind == "scatter":
        pieces = posts[root].inputs
        if len(pieces) != size:
            raise HubError(f"scatter needs {size} tensors on the root, got {len(pieces)}")
        return [[piece] for piece in pieces]
    if kind == "reduce_scatter":
        return [[piece] for piece in _reduce_lists([p.inputs for p in posts], first.reduce)]
    if kind == "reduce_scatter_tensor":
        reduced = _reduce_lists([[_single(p).reshape(-1)] for p in posts], first.reduce)[0]
        if reduced.numel() % size:
            raise HubError(
                f"reduce_scatter_tensor: {reduced.numel()} elements do not split into {size} ranks"
            )
        return [[chunk] for chunk in reduced.chunk(size)]
    if kind == "all_to_all":
        if any(len(p.inputs) != size for p in posts):
            raise HubError(f"all_to_all needs {size} input tensors on every rank")
        return [[p.inputs[i] for p in posts] for i in range(size)]
    raise HubError(f"the grader's process group does not support {kind}")


_FLAT_OUTPUTS = ("all_gather_into_tensor", "reduce_scatter_tensor")  # outputs a flat result is copied into


def _payload_mismatch(post: _Post, outputs: list[torch.Tensor]) -> str | None:
    """Why `outputs` cannot go into the tensors `post`'s rank receives into, or None: the same number of
    tensors, each of the same dtype and shape (the same size, for the flat `*_tensor` collectives). A rank
    cannot make a collective carry less than its shapes say (an empty all_to_all, say) and fill in the rest."""
    if len(outputs) != len(post.outputs):
        return f"{post.describe()}: rank {post.rank} receives into {len(post.outputs)} tensors, the result has {len(outputs)}"
    for out, (shape, dtype) in zip(outputs, post.outputs, strict=True):
        fits = out.numel() == math.prod(shape) if post.kind in _FLAT_OUTPUTS else tuple(out.shape) == shape
        if not fits or str(out.dtype).removeprefix("torch.") != dtype:
            return (
                f"{post.describe()}: rank {post.rank} receives into a {dtype} tensor of shape {list(shape)}, "
                f"the payload is a {str(out.dtype).removeprefix('torch.')} tensor of shape {list(out.shape)}"
            )
    return None


def _single(post: _Post) -> torch.Tensor:
    if len(post.inputs) != 1:
        raise HubError(
            f"{post.kind} takes one input tensor per rank, rank {post.rank} gave {len(post.inputs)}"
        )
    return post.inputs[0]


def _same_shapes(lists: list[list[torch.Tensor]]) -> None:
    shapes = [[(tuple(t.shape), t.dtype) for t in tensors] for tensors in lists]
    if any(s != shapes[0] for s in shapes):
        raise HubError(f"the ranks' tensors differ in shape or dtype: {shapes}")


def _reduce_lists(lists: list[list[torch.Tensor]], op: str | None) -> list[torch.Tensor]:
    """Element-wise reduction of each position over the ranks, folded in rank order."""
    _same_shapes(lists)
    if op not in _REDUCERS:
        raise HubError(f"unknown reduce op {op!r}")
    reduced = [functools.reduce(_REDUCERS[op], column) for column in zip(*lists, strict=True)]
    if op == "avg":
        if any(not t.is_floating_point() for t in reduced):
            raise HubError("ReduceOp.AVG needs floating-point tensors")
        reduced = [t / len(lists) for t in reduced]
    return reduced


# ====================================================================================================
# The entry point, and what the checker reads
# ====================================================================================================


def run_ranks(
    fn: Callable[..., Any],
    rank_args: Sequence[tuple],
    *,
    package: str,
    backend: str = HUB_BACKEND,
    timeout_s: float = 60.0,
    spawn: bool | None = None,
) -> dict[str, Any]:
    """Run `fn(*rank_args[r])` as rank r of len(rank_args) ranks; what happened, as data (see RankRun).

    `fn` is a function of a scenario module, or of a module the ranks can import by name (it may import
    `package`, the submission, inside); `package` must not have been imported into this process. Each rank
    receives its own arguments only, as data (`wire`): they must be data. backend: the hub (counted
    collectives, CPU) or a real one, "gloo" or "nccl" (nothing counted). spawn: start the ranks as fresh
    interpreters (fn from a scenario module only) instead of forks of the zygote (`start_zygote`); by default
    only where this process has initialised CUDA.
    """
    if package in sys.modules or any(name.startswith(package + ".") for name in sys.modules):
        raise RuntimeError(
            f"run_ranks: {package} was imported into the process that hosts the hub, which must never run "
            "the submission's code; reach a distributed task's submission through run_ranks only"
        )
    world_size = len(rank_args)
    if world_size < 1:
        raise ValueError("run_ranks needs at least one rank")
    make_undumpable()  # the template already is; a hub outside the sandbox (tests) must be too
    sys.stdout.flush()  # a fork copies what is still buffered: it must not reach the ranks' output
    store = os.path.join(os.getcwd(), f".ranks-store-{os.getpid()}-{time.monotonic_ns()}")
    start = _spawn_rank if (torch.cuda.is_initialized() if spawn is None else spawn) else _fork_rank
    stdout_read, stdout_write = os.pipe()
    ranks = []
    try:
        for rank, args in enumerate(rank_args):
            setup = _RankSetup(rank, world_size, backend, store, timeout_s)
            ranks.append(_Rank(*start(setup, fn, tuple(args), stdout_write)))
        os.close(stdout_write)
        hub = _Hub(ranks, stdout_read, timeout_s, ordered_start=backend == HUB_BACKEND)
        hub.run()
    finally:
        for fd in (stdout_read, stdout_write):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.remove(store)
    return {
        "values": [rank.result for rank in ranks],
        "errors": [rank.error for rank in ranks],
        "collectives": [[tuple(entry) for entry in rank.log] for rank in ranks],
        "stdout": hub.stdout.decode(errors="replace"),
        "hang": hub.hang,
    }


@dataclass(frozen=True)
class RankRun:
    """A run of `run_ranks` as the checker reads it, its types checked (it came from the worker)."""

    values: list[Any]
    errors: list[dict[str, Any] | None]
    collectives: list[list[Collective]]
    stdout: str
    hang: str | None

    @classmethod
    def from_data(cls, data: Any) -> RankRun:
        data = expect(data, dict[str, Any], "run_ranks")
        errors = expect(data["errors"], list[dict[str, Any] | None], "run_ranks errors")
        logs = expect(data["collectives"], list[list[tuple[str, list[int], int | None, str | None]]], "log")
        return cls(
            values=expect(data["values"], list[Any], "run_ranks values"),
            errors=errors,
            collectives=[[Collective(k, tuple(g), root, op) for k, g, root, op in log] for log in logs],
            stdout=expect(data["stdout"], str, "run_ranks stdout"),
            hang=expect(data["hang"], str | None, "run_ranks hang"),
        )

    @property
    def world_size(self) -> int:
        return len(self.values)

    def failure(self) -> str | None:
        """What went wrong, for a test's message: the first rank that raised or died, or the hang; else None."""
        for rank, error in enumerate(self.errors):
            if error is not None:
                name, line = str(error.get("name", "?"))[:60], str(error.get("line", ""))[:160]
                return f"rank {rank} of {self.world_size} raised {name}: {line}"
        return self.hang

    def returned(self, returns: Any) -> list[Any]:
        """Every rank's value, each checked against `returns`; AssertionError if a rank failed or hung."""
        problem = self.failure()
        if problem is not None:
            raise AssertionError(problem)
        return [expect(value, returns, f"rank {rank}") for rank, value in enumerate(self.values)]

    def count(self, rank: int, kinds: Sequence[str] | None = None) -> int:
        """How many collectives `rank` called (of `kinds`, or of any kind)."""
        return sum(kinds is None or c.kind in kinds for c in self.collectives[rank])
