"""common.distributed on gloo with 2, 3 and 4 CPU ranks: launcher, collectives, DDP.

Each reference is independent of the code under test: torch.distributed's own collectives, torch's
DistributedDataParallel, a single process on the full batch. Ranks are forked, so a launch costs a fraction
of a second; checks that need the same ranks share one launch per world size (module-scoped fixtures).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch._dynamo  # noqa: F401  torch's DDP imports it on first use (seconds): once here, forked ranks inherit it
import torch.distributed as dist
from torch import nn

from common.distributed import collectives
from common.distributed.cost_model import halving_doubling_cost, ring_cost
from common.distributed.ddp import UnusedParameterError, apply_ddp
from common.distributed.launch import (
    FORKED_AUTOGRAD,
    RankError,
    RankTimeoutError,
    launch,
    rank_device,
    under_torchrun,
)
from common.errors import EffdlError
from common.hardware import NoGPUError

pytestmark = pytest.mark.distributed
WORLD_SIZES = (2, 3, 4)
REPO_ROOT = Path(__file__).resolve().parents[1]


def live_descendants() -> list[int]:
    """PIDs of this process's living (non-zombie) descendants, read from /proc."""
    parent_of, state_of = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            state_of[int(entry.name)], parent_of[int(entry.name)] = fields[0], int(fields[1])
    found, frontier = [], [os.getpid()]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parent_of.items() if parent == pid]
        found += [child for child in children if state_of[child] != "Z"]
        frontier += children
    return found


def is_resource_tracker(pid: int) -> bool:
    """Python's multiprocessing resource tracker: spawn starts one per parent process, and it exits with it."""
    try:
        return b"multiprocessing.resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.fixture
def no_process_left_behind():
    """The test must not leave a single process running (launch kills and reaps every rank)."""
    before = set(live_descendants())
    yield
    left = [pid for pid in set(live_descendants()) - before if not is_resource_tracker(pid)]
    assert not left, f"processes left running: {sorted(left)}"


# ----------------------------------------------------------------------------------------------------
# launch
# ----------------------------------------------------------------------------------------------------


def sum_of_ranks() -> dict:
    x = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(x)
    return {
        "sum": x.item(),
        "world": dist.get_world_size(),
        "env_rank": int(os.environ["RANK"]),
        "threads": torch.get_num_threads(),
    }


def test_launch_returns_every_ranks_value(no_process_left_behind) -> None:
    results = launch(sum_of_ranks, 3)
    assert results == {r: {"sum": 3.0, "world": 3, "env_rank": r, "threads": 1} for r in range(3)}


def test_launch_runs_a_closure_as_a_notebook_cell_would_define_it(no_process_left_behind) -> None:
    offset = 10  # a closure over a local: spawn could not import it, fork runs it
    assert launch(lambda: dist.get_rank() + offset, 2) == {0: 10, 1: 11}


def test_no_rank_starts_fn_before_every_rank_has_joined(monkeypatch, no_process_left_behind) -> None:
    """A rank that ran fn and left while a peer was still building its side of the group broke the peer's init
    (gloo: "Connection closed by peer"). Rank 1's init is made 1 s slower: rank 0 must wait for it."""
    real_init = dist.init_process_group
    joined_at: list[float] = []  # filled in the rank's own (forked) copy

    def slow_init_on_rank_1(*args, **kwargs) -> None:
        real_init(*args, **kwargs)
        if dist.get_rank() == 1:
            time.sleep(1.0)
        joined_at.append(time.monotonic())

    monkeypatch.setattr(dist, "init_process_group", slow_init_on_rank_1)  # forked ranks inherit the patch
    results = launch(lambda: (joined_at[0], time.monotonic()), 2, start_method="fork")
    rank_1_joined, rank_0_started = results[1][0], results[0][1]
    assert rank_0_started >= rank_1_joined, "rank 0 ran fn while rank 1 was still joining the group"


def test_a_failing_rank_raises_with_its_rank_and_traceback(no_process_left_behind) -> None:
    def fail_on_rank_1() -> None:
        if dist.get_rank() == 1:
            raise ValueError("bad shard 17")
        dist.barrier()  # the other ranks wait for rank 1, which never comes: launch must end them

    with pytest.raises(RankError) as info:
        launch(fail_on_rank_1, 3, timeout_s=60)
    assert info.value.rank == 1
    message = str(info.value)
    assert message.startswith("rank 1 of 3 failed")
    assert "ValueError: bad shard 17" in message and "fail_on_rank_1" in message  # the rank's traceback


def test_a_forked_rank_that_cannot_run_autograd_is_told_why(no_process_left_behind) -> None:
    """On a GPU machine, a rank forked after the parent ran backward gets autograd's RuntimeError (seen on an
    H200). Without a GPU the real error cannot happen here, so the rank raises autograd's own words."""

    def backward_in_a_forked_rank() -> None:
        raise RuntimeError(
            f"{FORKED_AUTOGRAD}. See https://github.com/pytorch/pytorch/wiki/Autograd-and-Fork"
        )

    with pytest.raises(RankError) as info:
        launch(backward_in_a_forked_rank, 2, timeout_s=60)
    message = str(info.value)
    assert FORKED_AUTOGRAD in message, "the rank's own traceback stays"
    assert "already run a backward pass" in message and "start_method='spawn'" in message


def test_a_rank_that_dies_without_an_exception_is_reported(no_process_left_behind) -> None:
    def die() -> None:
        if dist.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        dist.barrier()

    with pytest.raises(RankError, match=r"(?s)rank 0 of 2 failed.*signal SIGKILL"):
        launch(die, 2, timeout_s=60)


def test_a_hung_rank_is_named_killed_and_takes_its_children_with_it(tmp_path, no_process_left_behind) -> None:
    pid_file = tmp_path / "grandchild.pid"

    def hang_on_rank_2() -> None:
        if dist.get_rank() == 2:
            pid_file.write_text(str(subprocess.Popen(["sleep", "600"]).pid))  # something the rank started
            time.sleep(600)

    start = time.monotonic()
    with pytest.raises(RankTimeoutError) as info:
        launch(hang_on_rank_2, 3, timeout_s=5)
    assert time.monotonic() - start < 30
    assert info.value.ranks == [2]
    assert "rank 2 of 3 did not finish within 5 s" in str(info.value)
    assert "hang_on_rank_2" in str(info.value)  # where it hung, from its stack
    grandchild = Path(f"/proc/{pid_file.read_text()}/stat")
    assert not grandchild.exists() or grandchild.read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_nccl_without_a_gpu_is_an_error_not_gloo() -> None:
    with pytest.raises(NoGPUError, match="backend='nccl' needs one CUDA GPU per rank"):
        launch(sum_of_ranks, 2, backend="nccl")


def test_spawn_imports_a_module_function_and_explains_one_it_cannot(no_process_left_behind) -> None:
    # One rank: a spawned rank imports torch afresh (seconds), and one shows that fn was imported by name.
    assert launch(sum_of_ranks, 1, start_method="spawn") == {
        0: {"sum": 0.0, "world": 1, "env_rank": 0, "threads": 1}
    }
    with pytest.raises(EffdlError, match="cannot be imported.*Move fn"):
        launch(lambda: 0, 2, start_method="spawn")


def test_under_torchrun_launch_runs_this_process_as_its_rank(tmp_path) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os
            from pathlib import Path
            from common.distributed.launch import launch
            from tests.test_distributed import sum_of_ranks
            lines = [repr(launch(sum_of_ranks))]
            try:
                launch(sum_of_ranks, 4)
            except Exception as error:
                lines.append(str(error))
            # One file per rank: the ranks share torchrun's stdout, where their lines can interleave.
            Path({str(tmp_path)!r}, "rank" + os.environ["RANK"]).write_text("\\n".join(lines))
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        capture_output=True, text=True, env=env, timeout=300, cwd=REPO_ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):
        result, error = (tmp_path / f"rank{rank}").read_text().split("\n")
        assert result == repr({rank: {"sum": 1.0, "world": 2, "env_rank": rank, "threads": 1}})
        assert error.startswith("launch(nprocs=4) under torchrun, which started WORLD_SIZE=2 ranks")
    assert not under_torchrun()


# ----------------------------------------------------------------------------------------------------
# collectives: each against torch.distributed's own, on every rank
# ----------------------------------------------------------------------------------------------------

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64)
OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.AVG, "max": dist.ReduceOp.MAX}
SIZES = (1, 2, 5, 12, 1000, 65_537)  # fewer elements than ranks, odd, and more than one pipelining segment
SEGMENT_BYTES = 4096  # small segments, so the pipeline has many stages even at these sizes
ALL_REDUCES = {
    "ring": lambda t, op: collectives.ring_all_reduce(t, op, segment_bytes=SEGMENT_BYTES),
    "halving_doubling": collectives.halving_doubling_all_reduce,
}


def all_ranks_equal(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return all(torch.equal(g, t) for g in gathered)


def check_collectives() -> list[str]:
    """Every collective against torch.distributed's; returns a description of each mismatch."""
    rank, world, device = dist.get_rank(), dist.get_world_size(), rank_device()  # CPU on gloo, GPU on NCCL
    problems = []
    for dtype in DTYPES:
        for n in SIZES:
            g = torch.Generator().manual_seed(1000 * rank + n)
            # Small integers: every partial sum is exact in every dtype (|sum| <= 4 x 8 < 256, bf16's limit of
            # exact integers), so any order of additions gives the same bits and equality is the right test.
            x = torch.randint(-8, 9, (n,), generator=g).to(device, dtype)
            for op_name, op in OPS.items():
                if op_name == "avg" and not dtype.is_floating_point:
                    continue
                expected = x.clone()
                dist.all_reduce(expected, op=op)
                for name, all_reduce in ALL_REDUCES.items():
                    got = all_reduce(x.clone(), op)
                    if not torch.equal(got, expected):
                        problems.append(
                            f"{name} {op_name} {dtype} n={n}: max diff {(got.double() - expected.double()).abs().max()}"
                        )
            if (
                n % world == 0
            ):  # torch's tensor versions need equal chunks; the round-trip test covers uneven ones
                expected = torch.empty(n // world, dtype=dtype, device=device)
                dist.reduce_scatter_tensor(expected, x.clone())
                if not torch.equal(
                    collectives.ring_reduce_scatter(x.clone(), segment_bytes=SEGMENT_BYTES), expected
                ):
                    problems.append(f"reduce_scatter {dtype} n={n}")
                own = x.tensor_split(world)[rank]
                expected = torch.empty(n, dtype=dtype, device=device)
                dist.all_gather_into_tensor(expected, own.contiguous())
                mine = torch.zeros_like(x)
                mine.tensor_split(world)[rank].copy_(own)
                if not torch.equal(collectives.ring_all_gather(mine, segment_bytes=SEGMENT_BYTES), expected):
                    problems.append(f"all_gather {dtype} n={n}")
            for src in range(world):
                expected, got = x.clone(), x.clone()
                dist.broadcast(expected, src=src)
                if not torch.equal(collectives.binomial_broadcast(got, src=src), expected):
                    problems.append(f"broadcast from {src} {dtype} n={n}")
    # Random floats: the order of additions differs from gloo's, so sums agree to rounding only. Each of the
    # p-1 additions of a sum rounds by at most eps relative to the running |sum| <= sum|x_i|, on both sides:
    # |ours - gloo's| <= 2 (p-1) eps sum_i |x_i|, elementwise.
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(10_007, generator=torch.Generator().manual_seed(rank), dtype=dtype).to(device)
        expected, magnitude = x.clone(), x.abs()
        dist.all_reduce(expected)
        dist.all_reduce(magnitude)
        bound = 2 * (world - 1) * torch.finfo(dtype).eps * magnitude
        for name, all_reduce in ALL_REDUCES.items():
            got = all_reduce(x.clone(), dist.ReduceOp.SUM)
            if not ((got - expected).abs() <= bound).all():
                problems.append(f"{name} random {dtype}: beyond the rounding bound")
            if not all_ranks_equal(got):
                problems.append(f"{name} random {dtype}: ranks hold different bits")
    return problems


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"{w}ranks")
def collective_problems(request) -> dict[int, list[str]]:
    return launch(check_collectives, request.param, timeout_s=300)


def test_collectives_equal_torch_distributed(collective_problems) -> None:
    assert collective_problems == dict.fromkeys(collective_problems, [])


@pytest.mark.gpu
def test_collectives_equal_nccls_on_every_gpu() -> None:
    problems = launch(check_collectives, min(torch.cuda.device_count(), 4), backend="nccl", timeout_s=300)
    assert problems == dict.fromkeys(problems, [])


def test_uneven_reduce_scatter_and_all_gather_round_trip(no_process_left_behind) -> None:
    def round_trip() -> bool:
        rank, world = dist.get_rank(), dist.get_world_size()
        x = torch.arange(11, dtype=torch.float32) * (rank + 1)  # 11 elements over 3 ranks: chunks of 4, 4, 3
        expected = x.clone()
        dist.all_reduce(expected)
        chunk = collectives.ring_reduce_scatter(x, segment_bytes=8)
        ok = torch.equal(chunk, expected.tensor_split(world)[rank])
        return ok and torch.equal(collectives.ring_all_gather(x, segment_bytes=8), expected)

    assert launch(round_trip, 3) == {0: True, 1: True, 2: True}


def sent_per_rank() -> dict[str, tuple[int, int]]:
    """Messages and bytes each all-reduce sends from this rank, counted where they are posted."""
    counts = {}
    batch_isend_irecv = dist.batch_isend_irecv
    for name, all_reduce in ALL_REDUCES.items():
        sent = [0, 0]

        def counting(ops, _sent=sent):
            for op in ops:
                if op.op is dist.isend:
                    _sent[0] += 1
                    _sent[1] += op.tensor.numel() * op.tensor.element_size()
            return batch_isend_irecv(ops)

        dist.batch_isend_irecv = counting
        try:
            all_reduce(torch.zeros(1024), dist.ReduceOp.SUM)  # 4 KiB: one segment per ring chunk
        finally:
            dist.batch_isend_irecv = batch_isend_irecv
        counts[name] = tuple(sent)
    return counts


def test_collectives_send_what_the_cost_model_counts(no_process_left_behind) -> None:
    nbytes, p = 4096, 4
    for counts in launch(sent_per_rank, p).values():
        assert counts["ring"] == (ring_cost(nbytes, p).steps, ring_cost(nbytes, p).bytes)
        hd = halving_doubling_cost(nbytes, p)
        assert counts["halving_doubling"] == (hd.steps, hd.bytes)


def test_collectives_refuse_what_they_would_get_wrong() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        collectives._flat(torch.zeros(4, 4).t())
    with pytest.raises(TypeError, match="AVG needs a floating-point tensor"):
        collectives._reducer(dist.ReduceOp.AVG, torch.zeros(3, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------------
# DDP: against torch DDP (bit for bit) and against one process on the full batch
# ----------------------------------------------------------------------------------------------------


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5))


def steps_against_torch_ddp(bucket_mb: float | None) -> dict:
    """Four steps of apply_ddp and torch DDP on equal models (step 2 accumulates with no_sync)."""
    rank = dist.get_rank()
    torch.manual_seed(rank)  # every rank starts different: apply_ddp must broadcast rank 0's weights
    ours, theirs = small_model(), small_model()
    theirs.load_state_dict(ours.state_dict())
    if bucket_mb is None:  # the defaults of both
        reducer, torch_ddp = apply_ddp(ours), nn.parallel.DistributedDataParallel(theirs)
    else:
        reducer = apply_ddp(ours, bucket_cap_mb=bucket_mb, first_bucket_mb=bucket_mb)
        torch_ddp = nn.parallel.DistributedDataParallel(theirs, bucket_cap_mb=bucket_mb)
    start_equal = all(all_ranks_equal(p.detach()) for p in ours.parameters())
    launches = []  # how many gradients were ready when each of our all-reduces was launched
    all_reduce = dist.all_reduce  # torch's DDP calls the process group directly, not this

    def recording_all_reduce(*args, **kwargs):
        launches.append(len(reducer._fired))
        return all_reduce(*args, **kwargs)

    g = torch.Generator().manual_seed(100 + rank)
    equal = []
    dist.all_reduce = recording_all_reduce
    try:
        for step in range(4):
            x, y = torch.randn(8, 16, generator=g), torch.randn(8, 5, generator=g)
            for model, no_sync in ((ours, reducer.no_sync), (torch_ddp, torch_ddp.no_sync)):
                if step == 2:  # gradient accumulation: one local backward, then one that syncs
                    with no_sync():
                        nn.functional.mse_loss(model(x * 2), y).backward()
                nn.functional.mse_loss(model(x), y).backward()
            pairs = list(zip(ours.parameters(), theirs.parameters(), strict=True))
            equal.append(all(torch.equal(a.grad, b.grad) for a, b in pairs))
            with torch.no_grad():
                for a, b in pairs:
                    a -= 0.1 * a.grad
                    b -= 0.1 * b.grad
                    a.grad = b.grad = None
    finally:
        dist.all_reduce = all_reduce
    reducer.remove()
    return {
        "start_equal": start_equal,
        "bit_equal": equal,
        "buckets": len(reducer.buckets),
        "last_step_launches": launches[-len(reducer.buckets) :],
        "n_params": len(reducer.params),
    }


def check_ddp() -> dict:
    """apply_ddp against torch DDP and against one process on the full batch; the unused-parameter error."""
    rank, world = dist.get_rank(), dist.get_world_size()
    # 1 KiB buckets: several buckets, launched as they fill, for this 26 KiB model; and the default buckets.
    report: dict = {
        "small_buckets": steps_against_torch_ddp(2**-10),
        "default_buckets": steps_against_torch_ddp(None),
    }

    # The single-process reference: the whole batch on one model, against the shards on the ranks.
    torch.manual_seed(0)
    single, parallel = small_model(), small_model()
    parallel.load_state_dict(single.state_dict())
    apply_ddp(parallel, bucket_cap_mb=2**-10, first_bucket_mb=2**-10)
    g = torch.Generator().manual_seed(7)  # the same data on every rank; each takes its shard
    worst = 0.0
    for _ in range(3):
        x, y = torch.randn(8 * world, 16, generator=g), torch.randn(8 * world, 5, generator=g)
        nn.functional.mse_loss(single(x), y).backward()
        nn.functional.mse_loss(parallel(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
        with torch.no_grad():
            for a, b in zip(single.parameters(), parallel.parameters(), strict=True):
                a -= 0.1 * a.grad
                b -= 0.1 * b.grad
                a.grad = b.grad = None
                worst = max(worst, (a - b).abs().max().item())
    report["single_process_max_diff"] = worst

    unused = nn.ModuleDict({"used": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})
    apply_ddp(unused)
    try:
        unused["used"](torch.randn(2, 4)).sum().backward()
        report["unused_error"] = None
    except UnusedParameterError as error:
        report["unused_error"] = str(error)
    return report


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"{w}ranks")
def ddp_reports(request) -> dict[int, dict]:
    return launch(check_ddp, request.param, timeout_s=300)


def test_ddp_starts_every_rank_from_rank_0s_weights(ddp_reports) -> None:
    for report in ddp_reports.values():
        assert report["small_buckets"]["start_equal"] and report["default_buckets"]["start_equal"]


def test_ddp_gradients_are_bit_equal_to_torch_ddp(ddp_reports) -> None:
    for rank, report in ddp_reports.items():
        assert report["small_buckets"]["bit_equal"] == [True] * 4, rank  # several buckets; no_sync at step 2
        assert report["default_buckets"]["bit_equal"] == [True] * 4, rank


def test_ddp_launches_each_bucket_as_it_fills(ddp_reports) -> None:
    report = ddp_reports[0]["small_buckets"]
    launches = report["last_step_launches"]
    assert report["buckets"] >= 3
    # The first bucket's all-reduce starts while later gradients are still being computed: overlap.
    assert launches == sorted(launches) and launches[0] < report["n_params"]


def test_ddp_matches_one_process_on_the_full_batch(ddp_reports) -> None:
    # The mean over shards of per-shard mean losses is the full-batch mean, up to the order of float32 additions:
    # after 3 SGD steps the weights (of order 0.1-1) may differ by a few ulps, far below 1e-5.
    for report in ddp_reports.values():
        assert report["single_process_max_diff"] < 1e-5


def test_ddp_names_unused_parameters(ddp_reports) -> None:
    for report in ddp_reports.values():
        assert report["unused_error"].startswith(
            "2 parameter(s) got no gradient in this backward: unused.weight, unused.bias"
        )


def test_benchmarks_run_and_save_their_results(tmp_path, no_process_left_behind) -> None:
    """`effdl bench allreduce` and `effdl bench ddp`, quick: they run and save what the READMEs quote.

    Their numbers are not judged here: timings on a shared CI machine are noise. The committed results are.
    """
    import json

    from common.distributed.benchmark import run_all_reduce_benchmark, run_ddp_benchmark

    json_path, png_path = run_all_reduce_benchmark(tmp_path, quick=True)
    record = json.loads(json_path.read_text())
    assert png_path.stat().st_size > 0
    assert set(record["measured_s"]["4"]) == {"gloo", "ring (ours)", "halving-doubling (ours)"}
    assert record["fit"]["2"]["alpha_s"] > 0 and len(record["relative_error"]["4"]) == len(
        record["sizes_bytes"]
    )
    (ddp_path,) = run_ddp_benchmark(tmp_path, quick=True, world=2)
    record = json.loads(ddp_path.read_text())
    assert record["ratio"] > 0 and len(record["speedup_per_rank"]) == 2 and "environment" in record
