"""Run a function on N processes, one rank each: how every distributed example in the course starts.

    def work() -> float:
        x = torch.full((1,), float(dist.get_rank()))
        dist.all_reduce(x)          # 0 + 1 + 2 + 3
        return x.item()

    launch(work, nprocs=4)          # {0: 6.0, 1: 6.0, 2: 6.0, 3: 6.0}

What you will learn here is what a launcher owes its user, because `torchrun` and Slurm do the same:

- Rendezvous. Every rank must find the others. This process opens a TCPStore on a port the kernel picks
  (port 0) and keeps it open while the ranks run, so no other program can take the port in between (a
  port found free and then closed can be taken before the ranks use it). It opens the store after the
  ranks have started and sends them its port: a store's server thread must not be running when a rank is
  forked, since a lock it held would stay locked forever in the child. Each rank joins the store, then
  `init_process_group` builds the communicator (gloo on CPU, NCCL on GPUs, one GPU per rank: rank r
  computes on cuda:r). A barrier ends the join, so no rank starts fn before every peer has its side of the
  communicator (a fast rank that finished fn and left early would break a slow peer's init).
- Failure. A rank's exception is caught in the rank, sent back with its traceback, and raised here as
  RankError naming the rank. The other ranks are then killed: they would wait forever in a collective for
  the rank that died. Ranks of a failed peer usually fail too (gloo: "connection closed by peer"); the
  error names the first rank that failed, by the time it failed.
- Hangs. A rank that has not returned after `timeout_s` is a hung rank: launch asks each hung rank where
  its Python code is (faulthandler), kills every rank and raises RankTimeoutError naming them, with those
  stacks. Ranks
  that wait in a collective for a hung peer are hung too, and are named with it.
- Nothing left running. Each rank leads its own process group, so whatever it started dies with it, and
  the Linux kernel kills the ranks if this process dies first (PR_SET_PDEATHSIG). Every exit path of
  launch, Ctrl-C included, kills and reaps all ranks.
- Threads. Each rank computes with one intra-op thread (torch.set_num_threads(1)), as under torchrun
  (OMP_NUM_THREADS=1): N ranks that each took every core would fight over them, and a forked rank that
  used more than one OpenMP thread after its parent had would hang (GNU OpenMP does not survive fork).

How the ranks start (start_method): "fork" copies this process, so fn can be anything, a function
defined in a notebook cell or a closure, and a rank starts in milliseconds. "spawn" starts a fresh
interpreter, which then imports torch (seconds) and must import fn by name, so fn must live in a module.
The default is fork, except where it cannot work: on a platform without fork, or when this process has
already initialized CUDA (a forked child cannot use it); then spawn, and an fn that spawn cannot import is
a clear error, not a hang. One case fork cannot see coming: on a machine with a GPU, once this process has
run a backward pass, autograd keeps a thread per device, and a forked rank refuses to run autograd. The
rank's error then says so: launch before the first backward, or spawn with fn in a module. Another: on a
machine with a GPU, `torch.cuda.is_available()` starts CUDA's driver in this process, and a forked rank's
first CUDA call then fails with "CUDA error: initialization error"; ranks on CPU make one too, since an
optimizer step asks CUDA whether a graph is being captured. There, spawn.

Under torchrun (or Slurm running torchrun), RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
are set: then launch starts nothing, joins the process group torchrun describes, runs fn as this rank and
returns {rank: result}. The same script runs on a laptop (`python script.py` starts its ranks) and on a
cluster (`torchrun --nnodes 2 --nproc-per-node 8 ... script.py`); README.md in this folder has both, and
the Slurm `srun` version.
"""

from __future__ import annotations

import ctypes
import datetime
import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

from common.errors import EffdlError
from common.hardware import NoGPUError

__all__ = [
    "Backend",
    "RankError",
    "RankTimeoutError",
    "StartMethod",
    "join_process_group",
    "launch",
    "rank_device",
    "under_torchrun",
]

Backend = Literal["gloo", "nccl"]
StartMethod = Literal["fork", "spawn"]
T = TypeVar("T")

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
STACK_DUMP_WAIT_S = 2.0  # how long a hung rank gets to write its stack before it is killed
FAILURE_GRACE_S = 1.0  # after a rank fails, how long the others get to report theirs (see _wait_for_ranks)


class RankError(EffdlError, RuntimeError):
    """A rank raised (or died); the message has its rank and traceback, the attributes the same as data."""

    def __init__(self, rank: int, world_size: int, details: str, also_failed: Sequence[int] = ()) -> None:
        self.rank, self.world_size, self.details, self.also_failed = (
            rank,
            world_size,
            details,
            list(also_failed),
        )
        others = f" (then ranks {', '.join(map(str, also_failed))} failed too)" if also_failed else ""
        super().__init__(f"rank {rank} of {world_size} failed{others}:\n{details}")


class RankTimeoutError(EffdlError, TimeoutError):
    """Some ranks did not return within the timeout; all ranks were killed. `ranks` lists the hung ones."""

    def __init__(self, ranks: Sequence[int], world_size: int, timeout_s: float, stacks: str) -> None:
        self.ranks, self.world_size, self.timeout_s = list(ranks), world_size, timeout_s
        which = ", ".join(map(str, ranks))
        super().__init__(
            f"rank{'s' if len(ranks) > 1 else ''} {which} of {world_size} did not finish within {timeout_s:g} s "
            "and all ranks were killed. A rank waiting in a collective for a hung peer hangs too; "
            "a collective that only some ranks call is the usual cause. Where the hung ranks were:\n"
            f"{stacks}"
        )


def under_torchrun() -> bool:
    """Whether an external launcher (torchrun, or Slurm running torchrun) made this process one rank."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def rank_device() -> torch.device:
    """The device this rank computes on: cuda:LOCAL_RANK under NCCL (one GPU per rank), else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return torch.device("cpu")


def _resolve_backend(backend: Backend | None, nprocs_on_this_node: int) -> Backend:
    """gloo on CPU, NCCL where there are GPUs; NCCL without enough GPUs is an error, never gloo instead."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (one GPU per rank), got {backend!r}")
    if backend == "nccl":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus == 0:
            raise NoGPUError(
                "backend='nccl' needs one CUDA GPU per rank, but torch.cuda.is_available() is False here; "
                "pass backend='gloo' to run the ranks on the CPU"
            )
        if nprocs_on_this_node > gpus:
            raise EffdlError(
                f"backend='nccl' runs one rank per GPU, but {nprocs_on_this_node} ranks on this node and "
                f"only {gpus} GPU(s) are visible; pass nprocs <= {gpus}, or backend='gloo'"
            )
    return backend


def _resolve_start_method(start_method: StartMethod | None) -> StartMethod:
    can_fork = "fork" in multiprocessing.get_all_start_methods()
    if start_method is None:
        return "fork" if can_fork and not torch.cuda.is_initialized() else "spawn"
    if start_method == "fork" and torch.cuda.is_initialized():
        raise EffdlError(
            "start_method='fork': this process has already initialized CUDA, which a forked rank cannot "
            "use. Call launch before the first CUDA operation, or use start_method='spawn'"
        )
    if start_method not in ("fork", "spawn") or (start_method == "fork" and not can_fork):
        raise ValueError(
            f"start_method must be 'fork' (where the platform has it) or 'spawn', got {start_method!r}"
        )
    return start_method


# ----------------------------------------------------------------------------------------------------
# One rank: what runs in each child process
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RankSetup:
    """Everything a rank needs to join the others (picklable, for spawn)."""

    rank: int
    world_size: int
    backend: Backend
    timeout_s: float
    stack_file: str


def die_with_parent() -> None:
    """Ask the Linux kernel to kill this process when its parent dies (a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def join_process_group(
    backend: str,
    rank: int,
    world_size: int,
    timeout_s: float,
    store: dist.Store | None = None,
    local_rank: int | None = None,
) -> None:
    """Build the communicator, then wait until every rank has built it.

    init_process_group is not a synchronization point: a rank can finish building its side, run a short
    fn and tear the group down while a peer is still inside its own init, which then fails with gloo's
    "Connection closed by peer". The barrier makes "joined" mean "all ranks joined". With NCCL, rank
    computes on cuda:local_rank (by default LOCAL_RANK, else rank).
    """
    device_ids = None
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", rank)) if local_rank is None else local_rank
        torch.cuda.set_device(local_rank)  # one GPU per rank
        device_ids = [local_rank]
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
    )
    dist.barrier(device_ids=device_ids)


# What autograd says in a forked process whose parent had started its per-device threads.
FORKED_AUTOGRAD = "Unable to handle autograd's threading in combination with fork-based multiprocessing"
FORKED_AUTOGRAD_HINT = (
    "This rank was forked from a process that had already run a backward pass on a machine with a GPU: "
    "autograd then keeps a worker thread per device, which a forked copy does not have, so the rank cannot "
    "run autograd. Call launch before the first backward, or pass start_method='spawn' with fn defined in "
    "a module that the fresh interpreters can import.\n"
)


def _run_rank(setup: _RankSetup, fn: Callable[..., Any], args: tuple, conn) -> None:
    """The body of one child: join the group, run fn, send back ("ok", result) or ("error", traceback)."""
    os.setpgrp()  # lead a process group of our own: killing it kills whatever fn started, too
    die_with_parent()
    stack_file = open(setup.stack_file, "w")  # open for the life of the rank
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    store_port = conn.recv()  # the launcher opens the store once every rank has started
    os.environ.update(
        RANK=str(setup.rank),
        LOCAL_RANK=str(setup.rank),
        WORLD_SIZE=str(setup.world_size),
        LOCAL_WORLD_SIZE=str(setup.world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(store_port),
    )
    torch.set_num_threads(1)
    try:
        store = dist.TCPStore(
            "127.0.0.1",
            store_port,
            setup.world_size,
            is_master=False,
            timeout=datetime.timedelta(seconds=setup.timeout_s),
        )
        join_process_group(setup.backend, setup.rank, setup.world_size, setup.timeout_s, store)
        message = ("ok", pickle.dumps(fn(*args)))
        if dist.is_initialized():  # fn may have ended the group itself
            dist.destroy_process_group()
    except BaseException as error:
        report = traceback.format_exc()
        if FORKED_AUTOGRAD in str(error):
            report += FORKED_AUTOGRAD_HINT
        message = ("error", report, time.time())
    conn.send(message)
    conn.close()


# ----------------------------------------------------------------------------------------------------
# The launcher: start the ranks, wait for their answers, and clean up on every path
# ----------------------------------------------------------------------------------------------------


def _kill(processes: Sequence[multiprocessing.process.BaseProcess]) -> None:
    """SIGKILL each rank's process group (the rank leads it), then the rank itself; reap them all."""
    for process in processes:
        if process.pid is None:
            continue
        try:
            os.killpg(process.pid, signal.SIGKILL)  # ESRCH if the rank had not made its group yet
        except (ProcessLookupError, PermissionError):
            pass
        if process.is_alive():
            process.kill()
    for process in processes:
        if process.pid is not None:
            process.join()


def _stacks_of(ranks: Sequence[int], processes, stack_files: Sequence[Path]) -> str:
    """Ask each hung rank for its Python stack (faulthandler on SIGUSR1) and return what they wrote."""
    for rank in ranks:
        try:
            os.kill(processes[rank].pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STACK_DUMP_WAIT_S
    while time.monotonic() < deadline and not all(_read(stack_files[r]) for r in ranks):
        time.sleep(0.05)
    return "\n".join(
        f"--- rank {r} ---\n{_read(stack_files[r]) or '(no stack: the rank did not answer)'}" for r in ranks
    )


def _read(path: Path) -> str:
    """The stack a rank wrote, or "" (a rank that never got going has not created its file)."""
    return path.read_text().strip() if path.exists() else ""


def _wait_for_ranks(processes, connections, timeout_s: float, stack_files: Sequence[Path]) -> dict[int, Any]:
    """Collect every rank's answer; raise RankError for the failure that came first, RankTimeoutError for hangs.

    After the first failure the others get FAILURE_GRACE_S to report theirs, and a rank that died without
    answering (killed, crashed) is named before ranks that raised: when one rank dies, its peers' collectives
    fail too ("connection reset by peer"), often before the launcher has even seen the death.
    """
    world_size = len(processes)
    results: dict[int, Any] = {}
    failures: dict[int, tuple[bool, float, str]] = {}  # rank -> (raised, when it failed, what happened)
    deadline = time.monotonic() + timeout_s
    grace_ends: float | None = None  # set at the first failure
    readers = {conn: rank for rank, conn in enumerate(connections)}
    sentinels = {process.sentinel: rank for rank, process in enumerate(processes)}
    while len(results) + len(failures) < world_size:
        until = deadline if grace_ends is None else min(deadline, grace_ends)
        ready = multiprocessing.connection.wait(
            [*readers, *sentinels], timeout=max(until - time.monotonic(), 0)
        )
        if not ready and failures:
            break  # the grace period is over: report what failed
        if not ready:
            hung = [rank for rank in range(world_size) if rank not in results]
            raise RankTimeoutError(hung, world_size, timeout_s, _stacks_of(hung, processes, stack_files))
        # Read every answer before judging an exit: a rank sends its answer before it exits.
        for conn in [c for c in ready if c in readers]:
            rank = readers.pop(conn)
            try:
                status, *payload = conn.recv()
            except EOFError:  # the rank died without answering; its sentinel tells how, below
                continue
            if status == "ok":
                results[rank] = pickle.loads(payload[0])
            else:
                failures[rank] = (True, payload[1], payload[0])
        for sentinel in [s for s in ready if s in sentinels]:
            rank = sentinels.pop(sentinel)
            if rank not in results and rank not in failures:
                processes[rank].join()  # it has exited: this only collects its exit code
                code = processes[rank].exitcode
                how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                failures[rank] = (
                    False,
                    time.time(),
                    f"the process died ({how}) without returning or raising",
                )
        if failures and grace_ends is None:
            grace_ends = time.monotonic() + FAILURE_GRACE_S
    if failures:
        first, *others = sorted(failures, key=lambda rank: failures[rank][:2])  # deaths first, then by time
        raise RankError(first, world_size, failures[first][2], also_failed=others)
    return dict(sorted(results.items()))


def launch(
    fn: Callable[..., T],
    nprocs: int | None = None,
    *,
    args: tuple = (),
    backend: Backend | None = None,
    timeout_s: float = 300.0,
    start_method: StartMethod | None = None,
) -> dict[int, T]:
    """Run fn(*args) on nprocs ranks (processes) and return {rank: fn's return value}.

    backend: "gloo" (CPU) or "nccl" (one GPU per rank); default NCCL where CUDA is available, else gloo.
    timeout_s: a rank that has not returned by then is hung: every rank is killed, RankTimeoutError.
    start_method: "fork" or "spawn"; default fork where it works (see the module docstring).
    Under torchrun, nothing is started: this process runs fn as its rank and gets {rank: result}.
    Return values travel by pickle: return numbers or CPU tensors, not CUDA tensors.
    """
    if under_torchrun():
        return _run_as_torchrun_rank(fn, nprocs, args, backend, timeout_s)
    if nprocs is None or nprocs < 1:
        raise ValueError(f"nprocs must be the number of ranks to start (>= 1), got {nprocs!r}")
    backend = _resolve_backend(backend, nprocs)
    method = _resolve_start_method(start_method)
    context = multiprocessing.get_context(method)
    processes, connections, store = [], [], None
    with tempfile.TemporaryDirectory(prefix="effdl-launch-") as tmp:
        stack_files = [Path(tmp) / f"rank{rank}.stack" for rank in range(nprocs)]
        try:
            for rank in range(nprocs):
                setup = _RankSetup(rank, nprocs, backend, timeout_s, str(stack_files[rank]))
                ours, theirs = context.Pipe()
                process = context.Process(target=_run_rank, args=(setup, fn, args, theirs))
                processes.append(process)
                _start(process, fn, method)
                theirs.close()  # the child holds its end; EOF on ours means the child is gone
                connections.append(ours)
            # Port 0: the kernel picks a free port, and this process holds it until the ranks are done.
            store = dist.TCPStore("127.0.0.1", 0, nprocs, is_master=True, wait_for_workers=False)
            for conn in connections:
                try:
                    conn.send(store.port)
                except OSError:  # the rank died already; waiting for it below says how
                    pass
            return _wait_for_ranks(processes, connections, timeout_s, stack_files)
        finally:
            _kill(processes)  # on success they have exited already; on any failure this ends them
            del store


def _start(process: multiprocessing.process.BaseProcess, fn: Callable[..., Any], method: StartMethod) -> None:
    """process.start(), with spawn's pickling failure (fn defined in a notebook or a closure) explained."""
    try:
        process.start()
    except (pickle.PicklingError, AttributeError, TypeError) as error:
        if method != "spawn":
            raise
        raise EffdlError(
            f"start_method='spawn' starts fresh interpreters, which must import fn by name, but "
            f"{getattr(fn, '__qualname__', fn)!r} cannot be imported ({type(error).__name__}: {error}). "
            "Move fn (and its arguments' classes) into a module, or launch before this process uses CUDA "
            "so that the ranks can be forked"
        ) from error


def _run_as_torchrun_rank(
    fn: Callable[..., T], nprocs: int | None, args: tuple, backend: Backend | None, timeout_s: float
) -> dict[int, T]:
    """Under torchrun: this process is one rank; join the group torchrun describes and run fn."""
    world_size = int(os.environ["WORLD_SIZE"])
    if nprocs is not None and nprocs != world_size:
        raise EffdlError(
            f"launch(nprocs={nprocs}) under torchrun, which started WORLD_SIZE={world_size} ranks: torchrun "
            "decides the world size (--nnodes x --nproc-per-node); pass nprocs=None"
        )
    backend = _resolve_backend(backend, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    joined_here = not dist.is_initialized()
    if joined_here:  # env:// rendezvous: MASTER_ADDR and MASTER_PORT come from torchrun
        join_process_group(backend, int(os.environ["RANK"]), world_size, timeout_s)
    try:
        return {dist.get_rank(): fn(*args)}
    finally:
        if joined_here:
            dist.destroy_process_group()
