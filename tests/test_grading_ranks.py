"""The grader's hub for distributed code (`common.grading.ranks`): collectives as gloo computes them, a complete
log of who called which, hangs reported at once, output in an order that luck cannot fix, ranks that cannot
reach the hub's memory or the checker's channel.

Each test runs `run_ranks` here, in the test process, as a hidden test's scenario runs it in the worker.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from common.grading import wire
from common.grading.client import WrongTypeError
from common.grading.ranks import Collective, RankRun, run_ranks
from common.grading.sandbox import SandboxSpec
from common.grading.session import Session, WorkerLimits
from common.grading.worker import load_scenario

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the hub forks Linux processes")
PACKAGE = "no_such_submission"


def ranks(fn, world_size: int, *args, **kwargs) -> RankRun:
    return RankRun.from_data(run_ranks(fn, [args] * world_size, package=PACKAGE, **kwargs))


# ------------------------------------------------------------------------------------- collectives
def every_collective() -> dict[str, torch.Tensor]:
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.arange(4.0) + 10 * rank
    seen = {}
    for name, op in [("sum", dist.ReduceOp.SUM), ("max", dist.ReduceOp.MAX), ("avg", dist.ReduceOp.AVG)]:
        y = x.clone()
        dist.all_reduce(y, op=op)
        seen[name] = y
    seen["broadcast"] = x.clone()
    dist.broadcast(seen["broadcast"], src=1)
    seen["reduce"] = x.clone()
    dist.reduce(seen["reduce"], dst=2)
    gathered = [torch.zeros(4) for _ in range(world)]
    dist.all_gather(gathered, x)
    seen["all_gather"] = torch.stack(gathered)
    seen["into_tensor"] = torch.zeros(world * 4)
    dist.all_gather_into_tensor(seen["into_tensor"], x)
    seen["reduce_scatter"] = torch.zeros(2)
    dist.reduce_scatter_tensor(seen["reduce_scatter"], torch.arange(2.0 * world) + rank)
    seen["scatter"] = torch.zeros(2)
    dist.scatter(
        seen["scatter"], [torch.full((2,), float(r)) for r in range(world)] if rank == 0 else None, src=0
    )
    pair = dist.new_group([0, 2])
    if rank in (0, 2):
        seen["subgroup"] = x.clone()
        dist.all_reduce(seen["subgroup"], group=pair)
    dist.barrier()
    if rank == 0:
        dist.send(x * 100, dst=1)
    if rank == 1:
        seen["recv"] = torch.zeros(4)
        dist.recv(seen["recv"], src=0)
    work = dist.all_reduce(x, async_op=True)
    work.wait()
    seen["async"] = x
    return seen


def test_collectives_compute_what_gloo_computes_and_are_logged() -> None:
    run = ranks(every_collective, 3)
    seen = run.returned(dict[str, torch.Tensor])
    x = [torch.arange(4.0) + 10 * r for r in range(3)]
    for rank in range(3):
        torch.testing.assert_close(seen[rank]["sum"], x[0] + x[1] + x[2])
        torch.testing.assert_close(seen[rank]["max"], x[2])
        torch.testing.assert_close(seen[rank]["avg"], (x[0] + x[1] + x[2]) / 3)
        torch.testing.assert_close(seen[rank]["broadcast"], x[1])
        torch.testing.assert_close(seen[rank]["reduce"], x[0] + x[1] + x[2] if rank == 2 else x[rank])
        torch.testing.assert_close(seen[rank]["all_gather"], torch.stack(x))
        torch.testing.assert_close(seen[rank]["into_tensor"], torch.cat(x))
        torch.testing.assert_close(
            seen[rank]["reduce_scatter"], 3 * torch.arange(2.0 * rank, 2.0 * rank + 2) + 3
        )
        torch.testing.assert_close(seen[rank]["scatter"], torch.full((2,), float(rank)))
        torch.testing.assert_close(seen[rank]["async"], x[0] + x[1] + x[2])
    torch.testing.assert_close(seen[0]["subgroup"], x[0] + x[2])
    torch.testing.assert_close(seen[1]["recv"], x[0] * 100)
    world = (0, 1, 2)
    assert run.collectives[0] == [
        Collective("all_reduce", world, None, "sum"),
        Collective("all_reduce", world, None, "max"),
        Collective("all_reduce", world, None, "avg"),
        Collective("broadcast", world, 1, None),
        Collective("reduce", world, 2, "sum"),
        Collective("all_gather", world, None, None),
        Collective("all_gather_into_tensor", world, None, None),
        Collective("reduce_scatter_tensor", world, None, "sum"),
        Collective("scatter", world, 0, None),
        Collective("all_reduce", (0, 2), None, "sum"),
        Collective("barrier", world, None, None),
        Collective("send", world, 1, None),
        Collective("all_reduce", world, None, "sum"),
    ]
    assert Collective("recv", world, 0, None) in run.collectives[1]
    assert run.count(1, ["all_reduce"]) == 4 and run.count(2) == 12


# ---------------------------------------------------------------------------------- failures, hangs
def only_rank_0_reduces_twice() -> None:
    x = torch.ones(1)
    dist.all_reduce(x)
    if dist.get_rank() == 0:
        dist.all_reduce(x)


def test_a_collective_some_ranks_skip_is_reported_at_once() -> None:
    start = time.monotonic()
    run = ranks(only_rank_0_reduces_twice, 2, timeout_s=60)
    assert time.monotonic() - start < 10, "a hang must be found, not waited out"
    assert (
        run.hang is not None and "rank 0 waits in all_reduce on ranks [0, 1] (its collective #2)" in run.hang
    )
    assert "rank 1 has finished" in run.hang
    with pytest.raises(AssertionError, match="can never finish"):
        run.returned(None)


def mismatched() -> None:
    x = torch.ones(2)
    if dist.get_rank() == 0:
        dist.all_reduce(x)
    else:
        dist.broadcast(x, src=0)


def test_ranks_that_call_different_collectives_fail_with_both_named() -> None:
    run = ranks(mismatched, 2)
    assert [error["name"] for error in run.errors] == ["HubError", "HubError"]
    assert "rank 0 all_reduce on ranks [0, 1]" in run.errors[0]["line"]
    assert "different collectives" in run.failure()


def fails_or_dies(how: str) -> int:
    if dist.get_rank() == 1:
        if how == "raise":
            raise KeyError("rank one is broken")
        os._exit(3)
    dist.barrier()
    return 0


@pytest.mark.parametrize(
    ("how", "name", "line"),
    [("raise", "KeyError", "'rank one is broken'"), ("die", "RankDied", "ended without returning")],
)
def test_a_failing_rank_is_named_and_the_others_do_not_hang(how: str, name: str, line: str) -> None:
    run = ranks(fails_or_dies, 3, how, timeout_s=60)
    assert run.errors[1]["name"] == name and line in run.errors[1]["line"]
    assert run.failure().startswith(f"rank 1 of 3 raised {name}")
    assert "rank 0 waits in barrier" in run.hang


def computes_forever() -> None:
    while True:
        pass


def test_a_rank_that_never_returns_is_stopped_at_the_timeout() -> None:
    run = ranks(computes_forever, 2, timeout_s=1)
    assert run.hang is not None and "did not finish within 1 s" in run.hang and "still computing" in run.hang


# ------------------------------------------------------------------------------------------ output
def prints(synchronised: bool, flush: bool) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    for turn in range(world):
        if turn == rank or not synchronised:
            print(f"line of rank {rank}", flush=flush)
            if not synchronised:
                return
        dist.barrier()


@pytest.mark.parametrize(
    ("synchronised", "flush", "order"),
    [(True, True, [0, 1, 2, 3]), (False, True, [3, 2, 1, 0]), (True, False, [3, 2, 1, 0])],
    ids=["barriers and flush", "no barriers", "no flush"],
)
def test_output_that_relies_on_luck_comes_out_reversed(
    synchronised: bool, flush: bool, order: list[int]
) -> None:
    for _ in range(3):  # not by chance: every time
        run = ranks(prints, 4, synchronised, flush)
        assert run.stdout == "".join(f"line of rank {r}\n" for r in order)


# ---------------------------------------------------------------------------------------- isolation
def open_sockets() -> int:
    """How many sockets this rank holds."""
    return sum(_is_socket(int(fd)) for fd in os.listdir("/proc/self/fd"))


def _is_socket(fd: int) -> bool:
    try:
        socket.socket(fileno=os.dup(fd)).close()
        return True
    except OSError:
        return False


def test_a_rank_holds_only_its_own_link_and_the_hub_is_not_dumpable() -> None:
    checker_channel, _ = socket.socketpair()  # stands for the worker's channel to the checker
    try:
        run = ranks(open_sockets, 2)
    finally:
        checker_channel.close()
    assert run.returned(int) == [1, 1], "a rank must hold its link to the hub and nothing else"
    pr_get_dumpable = 3
    assert ctypes.CDLL(None).prctl(pr_get_dumpable, 0, 0, 0, 0) == 0, (
        "the hub must be non-dumpable: no process of the same user may ptrace it or open its /proc/PID/mem"
    )


HUB_PROBE = """
import ctypes, os
from common.grading.ranks import run_ranks


def _reach(pid):
    try:
        open(f"/proc/{pid}/mem", "rb").close()
        memory = "opened"
    except OSError as error:
        memory = type(error).__name__
    ptrace_attach, ptrace_detach = 16, 17
    libc = ctypes.CDLL(None, use_errno=True)
    attached = libc.ptrace(ptrace_attach, pid, 0, 0) == 0
    if attached:
        os.waitpid(pid, 0)  # it stops on attach; let it go again
        libc.ptrace(ptrace_detach, pid, 0, 0)
    return memory, attached


def _reach_the_hub():
    zygote = os.getppid()  # the process ranks are forked from; its parent is the hub
    hub = int(open(f"/proc/{zygote}/stat").read().rpartition(")")[2].split()[1])
    (memory, attached), (zygote_memory, zygote_attached) = _reach(hub), _reach(zygote)
    return {"memory": memory, "attached": attached, "zygote": [zygote_memory, zygote_attached],
            "uid": os.getuid()}


def reach_the_hub():
    return run_ranks(_reach_the_hub, [(), ()], package="probe")
"""


def in_the_sandbox(tmp_path: Path, source: str, function: str, *args: object) -> RankRun:
    """Call `function` of the scenario `source` (which calls run_ranks) in a sandboxed worker, as a task does."""
    (tmp_path / "src").mkdir()
    session = Session(SandboxSpec(src=tmp_path / "src", scratch=tmp_path / "scratch"))
    try:
        session.spawn(WorkerLimits(address_space_bytes=8 * 2**30), "/tmp/task")
        target = {"scenario": "probe", "source": source, "function": function}
        request = {"op": "call", "id": 1, "target": target, "args": wire.encode(list(args))}
        reply = session.exchange(request, 120)
    finally:
        session.kill()
    assert "value" in reply, f"the scenario raised: {reply}"
    return RankRun.from_data(wire.decode(reply["value"]))


def test_in_the_sandbox_a_rank_can_neither_ptrace_the_hub_nor_read_its_memory(tmp_path: Path) -> None:
    seen = in_the_sandbox(tmp_path, HUB_PROBE, "reach_the_hub").returned(dict)
    expected = {
        "memory": "PermissionError",
        "attached": False,
        "zygote": ["PermissionError", False],
        "uid": 65534,
    }
    assert seen == [expected] * 2


RANK_SPY = """
import gc, sys
import torch
from common.grading.ranks import run_ranks


def _markers_in(value, depth=0):
    if isinstance(value, torch.Tensor):
        return {int(v) for v in value.reshape(-1)[:1].tolist() if 1000 <= v < 1100}
    if depth < 4 and isinstance(value, (list, tuple, dict)):
        items = value.values() if isinstance(value, dict) else value
        return set().union(*(_markers_in(item, depth + 1) for item in items))
    return set()


def _spy(own):
    seen = set()
    for obj in gc.get_objects():  # every object the rank inherited, from any frame or container
        seen |= _markers_in(obj, 3)
    frame = sys._getframe()
    while frame is not None:
        seen |= _markers_in(list(frame.f_locals.values()))
        frame = frame.f_back
    return sorted(seen - {int(own[0])})


def spy(secrets):
    return run_ranks(_spy, [(secret,) for secret in secrets], package="probe")
"""


def test_in_the_sandbox_a_rank_holds_its_own_arguments_and_no_other_ranks(tmp_path: Path) -> None:
    """Ranks forked from the worker would inherit every rank's arguments (a Ulysses submission once computed
    from the other ranks' shards and sent empty all-to-alls); forked from the zygote, each holds only its own."""
    secrets = [torch.full((64,), 1000.0 + r) for r in range(3)]
    assert in_the_sandbox(tmp_path, RANK_SPY, "spy", secrets).returned(list) == [[], [], []], (
        "a rank found another rank's arguments in its memory"
    )


RANK_FILES = """
import os, socket
import torch.distributed as dist
from common.grading.ranks import run_ranks


def _folders():  # where a rank might leave a file for another: its own view, and through another's /proc
    pids = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
    seen_through = [f"/proc/{p}/{where}" for p in pids for where in ("root/tmp", "root/dev/shm", "cwd")]
    return ["/tmp", os.getcwd(), "/dev/shm", "/dev", *seen_through]


def _leave_and_look(rank):
    mine, wrote, found, reached = f"rank-{rank}", [], [], []
    for folder in _folders():
        try:
            open(os.path.join(folder, mine), "w").close()
            wrote.append(folder)
        except OSError:
            pass
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(f"\\0effdl-{mine}")  # abstract Unix sockets belong to a network namespace
    listener.listen()
    dist.barrier()  # every rank has written and listens
    for folder in _folders():
        try:
            found += [f"{folder}/{n}" for n in os.listdir(folder) if n.startswith("rank-") and n != mine]
        except OSError:
            pass
    for other in range(dist.get_world_size()):
        try:
            socket.socket(socket.AF_UNIX).connect(f"\\0effdl-rank-{other}")
            reached.append(other)
        except OSError:
            pass
    dist.barrier()  # no rank stops listening before every rank has tried
    return {"wrote": wrote, "found": found, "reached": reached}


def leave_and_look():
    return run_ranks(_leave_and_look, [(r,) for r in range(3)], package="probe")
"""


def test_in_the_sandbox_a_rank_sees_no_file_or_socket_of_another(tmp_path: Path) -> None:
    """Each rank has its own /tmp (its working folder in it) and /dev/shm, a read-only /dev and its own network
    namespace: the hub stays the only way between ranks. No rank finds another's file, through /proc either,
    or reaches another's abstract socket."""
    seen = in_the_sandbox(tmp_path, RANK_FILES, "leave_and_look").returned(dict)
    for rank, rank_seen in enumerate(seen):
        assert rank_seen["found"] == [], f"rank {rank} found another rank's files: {rank_seen['found']}"
        assert rank_seen["reached"] == [rank], f"rank {rank} reached ranks {rank_seen['reached']}' sockets"
        assert rank_seen["wrote"] == ["/tmp", "/tmp/task", "/dev/shm"], (
            f"rank {rank} could write {rank_seen['wrote']}: its own /tmp, working folder and /dev/shm only"
        )


def all_to_all_into_smaller_tensors() -> None:
    received = [torch.empty(0), torch.empty(0)]
    dist.all_to_all(received, [torch.ones(3), torch.ones(3)])


def test_a_collective_must_deliver_into_tensors_of_the_payloads_shape() -> None:
    run = ranks(all_to_all_into_smaller_tensors, 2)
    assert run.failure() is not None and "payload is a float32 tensor of shape [3]" in run.failure()


def test_the_hub_refuses_a_process_that_imported_the_submission(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, PACKAGE, sys)
    with pytest.raises(RuntimeError, match="must never run the submission's code"):
        run_ranks(open_sockets, [()], package=PACKAGE)


def test_what_comes_back_is_type_checked() -> None:
    data = run_ranks(open_sockets, [()], package=PACKAGE)
    data["collectives"] = [[("all_reduce", [0], None, 7)]]
    with pytest.raises(WrongTypeError, match="log"):
        RankRun.from_data(data)


def dtensor_over_a_mesh() -> dict[str, torch.Tensor]:
    """A DTensor sharded on dim 0 over a DeviceMesh of the hub's ranks, gathered whole through the mesh's
    group with the c10d call FSDP2 makes (DeviceMesh needs the group's registered name)."""
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    local = torch.arange(2.0 * 3).reshape(2, 3) + 100 * rank
    sharded = DTensor.from_local(local, mesh, [Shard(0)])
    whole = torch.empty(2 * world, 3)
    dist.all_gather_into_tensor(whole, sharded.to_local(), group=mesh.get_group())
    return {
        "whole": whole,
        "shape": torch.tensor(sharded.shape),
        "placement": torch.tensor(sharded.placements[0].dim),
    }


def test_dtensors_over_a_device_mesh_of_the_hubs_ranks() -> None:
    run = ranks(dtensor_over_a_mesh, 3)
    seen = run.returned(dict[str, torch.Tensor])
    whole = torch.cat([torch.arange(6.0).reshape(2, 3) + 100 * r for r in range(3)])
    for rank in range(3):
        torch.testing.assert_close(seen[rank]["whole"], whole, rtol=0, atol=0)  # copies, no arithmetic
        assert seen[rank]["shape"].tolist() == [6, 3] and seen[rank]["placement"].item() == 0
        assert run.collectives[rank] == [Collective("all_gather_into_tensor", (0, 1, 2), None, None)]


def import_after_refusal() -> list[str]:
    """Refuse json (imported already) and email.mime; return what importing each, and a neighbour, gives."""
    from common.grading.off_limits import refuse_imports

    refuse_imports(("json", "email.mime"), "use your own")
    seen = []
    for name in ("json", "json.decoder", "email.mime.text", "email.utils"):
        try:
            importlib.import_module(name)
            seen.append(f"{name}: imported")
        except ModuleNotFoundError as error:
            seen.append(str(error))
    return seen


def test_a_rank_that_refuses_imports_says_why_and_the_hubs_process_is_unchanged() -> None:
    import json  # noqa: F401 (imported before the rank is forked: the refusal must drop it)

    seen = ranks(import_after_refusal, 1).returned(list[str])[0]
    assert seen == [
        "json is off limits in this task: use your own",
        "json is off limits in this task: use your own",  # json.decoder: its package is refused first
        "email.mime is off limits in this task: use your own",  # email.mime.text: likewise
        "email.utils: imported",
    ]
    assert importlib.import_module("json.decoder") is sys.modules["json.decoder"]  # here, nothing refused


# -------------------------------------------------------------------------------- real backends
SCENARIO = """
import torch
import torch.distributed as dist


def gloo_sum(value: float) -> list:
    x = torch.full((3,), value)
    dist.all_reduce(x)
    return [dist.get_backend(), x.tolist()]
"""


def test_spawned_ranks_on_a_real_backend_run_a_scenario_from_its_source() -> None:
    """As in a GPU task (whose worker has initialised CUDA): fresh interpreters, gloo here instead of NCCL."""
    scenario = load_scenario("spawn_check", textwrap.dedent(SCENARIO))
    data = run_ranks(scenario.gloo_sum, [(1.0,), (2.0,)], package=PACKAGE, backend="gloo", spawn=True)
    run = RankRun.from_data(data)
    assert run.returned(list) == [["gloo", [3.0, 3.0, 3.0]]] * 2
    assert run.collectives == [[], []], "nothing is counted on a real backend"


def all_to_all_single() -> None:
    dist.all_to_all_single(torch.zeros(2), torch.ones(2))


def test_an_unsupported_operation_says_what_to_use_instead() -> None:
    run = ranks(all_to_all_single, 2)
    assert run.failure() == (
        "rank 0 of 2 raised HubError: the grader's process group has no all_to_all_single: use all_to_all with "
        "tensor lists"
    )
