# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Week 4 seminar: data parallelism, from messages to DDP
#
# Data-parallel training runs one copy of the model per process, gives each copy a different slice of the
# batch, and averages the gradients before every optimizer step, so that all copies take the same step. This
# seminar builds that up from the bottom and measures every layer of it:
#
# 1. **Processes, ranks and rendezvous**: how N processes find each other and become ranks 0..N-1.
# 2. **Point-to-point messages**: `send`/`recv`, and sending and receiving at once.
# 3. **Collectives**: what broadcast, scatter, gather, reduce, all-gather, reduce-scatter, all-reduce and
#    all-to-all leave on each rank, drawn, and checked against their definitions.
# 4. **The ring all-reduce, step by step**: reduce-scatter then all-gather, and why each rank sends less
#    than twice the tensor however many ranks there are.
# 5. **Bandwidth against message size**: all-reduce measured on gloo, against the α-β cost model fitted
#    to the same measurements, on the same plot.
# 6. **DDP from scratch**: `common.distributed.ddp.apply_ddp` against torch's `DistributedDataParallel` (the
#    same gradients, bit for bit), a profiler trace of the all-reduces running beside backward, and
#    what that overlap buys on this machine.
# 7. **Gradient accumulation**: `no_sync()`, one all-reduce per optimizer step instead of one per
#    micro-batch.
# 8. **At cluster scale**: what the cost model says about 1024 GPUs, ring against hierarchical.
#
# Everything runs on N processes started by `common.distributed.launch`, which forks them from this notebook,
# so a function defined in a cell can run on every rank. The ranks are CPU processes that talk through
# **gloo**, PyTorch's CPU backend, on any machine: 2 of them at small size (CI, a laptop), 4 at full size.
# The committed `seminar.ipynb` holds a full run on a 2-core CPU (its metadata says so); the multi-GPU
# version, with NCCL, comes later. Four ranks on two cores take turns on the cores, which shapes several of
# the numbers below, and the text says where. Cells that state a fact check it with `assert`; claims about
# timings are checked in the full run, since a CI machine running other tests beside this one cannot hold
# them.

# %% tags=["parameters"]
import os

import torch

# SMALL: 2 ranks and small sizes (a laptop, CI); full: 4 ranks. `effdl seminar --small/--full` and CI set
# EFFDL_SMALL; the default is full on a GPU machine and small on a CPU.
SMALL = os.environ.get("EFFDL_SMALL", "0" if torch.cuda.is_available() else "1") == "1"
# The ranks compute on the CPU and talk through gloo on every machine: the seminar's GPU version is to come.
DEVICE = "cpu"

# %%
import contextlib
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch._dynamo  # noqa: F401  torch's DDP imports it on first use (seconds): here once, for every rank
import torch.distributed as dist
from matplotlib.colors import to_rgb
from matplotlib.patches import Rectangle
from torch import nn

from common.bench import bench
from common.distributed import collectives, cost_model
from common.distributed.benchmark import mlp, time_all_reduces
from common.distributed.ddp import Reducer, apply_ddp
from common.distributed.launch import RankError, launch
from common.environment import environment
from common.profiling import profile_steps
from common.tables import show_table
from common.weeks import REPO_ROOT

BACKEND = "gloo"
ALL_REDUCE = f"{BACKEND}:all_reduce"  # what the profiler calls an all-reduce
NPROCS = 2 if SMALL else 4  # ranks of every launch below
CORES = os.cpu_count() or 1
CROWDED = CORES <= NPROCS  # no core to spare beside the ranks' main threads: some timings depend on it
KiB, MiB = 2**10, 2**20
RESULTS: dict[str, str] = {}  # one line per key result; the summary cell at the end prints them
# Profiler traces go to build/ (ignored by git), printed relative to the repository.
WORK = REPO_ROOT / "build" / "week04_data_parallel"
WORK.mkdir(parents=True, exist_ok=True)
machine = environment("cpu")
print(
    f"{NPROCS} ranks on {BACKEND}, sizes: {'small' if SMALL else 'full'}; "
    f"CPU: {machine['cpu']}, {CORES} cores{' (no core to spare)' if CROWDED else ''}; "
    f"torch {torch.__version__}; scratch: {WORK.relative_to(REPO_ROOT)}"
)

# %% [markdown]
# ## 1. Processes, ranks and rendezvous
#
# A distributed job is N ordinary processes. Each gets a **rank** (0..N-1) and knows the **world size** N;
# together they form a process group, and every collective call is matched across the group by order: the
# k-th collective of rank 0 meets the k-th collective of every other rank.
#
# Before they can exchange tensors, the processes must find each other: the **rendezvous**. One process runs
# a small key-value store (PyTorch's `TCPStore`) at an address everyone knows, `MASTER_ADDR:MASTER_PORT`;
# each rank connects to it, writes where it can be reached, and reads where the others are. Then the backend
# (gloo here, NCCL between GPUs) opens its own connections between the ranks. `torchrun` and Slurm do the same
# across machines; `launch` does it on one: it opens the store on a port the kernel picks (port 0, so nothing
# is hard-coded and two notebooks never collide), forks the ranks and joins each to the group.


# %%
def whoami() -> dict[str, object]:
    """What one rank knows about itself once launch has joined it to the group."""
    return {
        "rank": dist.get_rank(),
        "world size": dist.get_world_size(),
        "pid": os.getpid(),
        "backend": dist.get_backend(),
        "rendezvous": f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        "threads": torch.get_num_threads(),
    }


start = time.perf_counter()
ranks = launch(whoami, NPROCS, backend=BACKEND)
launch_s = time.perf_counter() - start
show_table(list(ranks[0]), [list(info.values()) for info in ranks.values()])
print(f"this notebook's process: pid {os.getpid()}; the launch took {launch_s:.2f} s")
assert list(ranks) == list(range(NPROCS)) and all(r["world size"] == NPROCS for r in ranks.values())
assert len({r["pid"] for r in ranks.values()} | {os.getpid()}) == NPROCS + 1, "every rank is a process"
assert len({r["rendezvous"] for r in ranks.values()}) == 1, "...and they all met at one address"
assert all(r["threads"] == 1 for r in ranks.values()), "one compute thread per rank, as under torchrun"

# %% [markdown]
# Each rank computes with one thread (`torchrun` sets `OMP_NUM_THREADS=1` for the same reason): N ranks
# that each took every core would fight over them.
#
# What happens when a rank fails? A collective waits for every rank of the group, so one dead rank leaves
# the others waiting for it. `launch` catches the failing rank's exception, kills the others and raises
# `RankError` naming the rank, with its traceback. (A rank that hangs, say one that skips a collective the
# others call, is killed after `timeout_s` and named by `RankTimeoutError`, with the line where it waited.)


# %%
def fail_on_rank_1() -> None:
    """Rank 1 raises before the all-reduce that the other ranks wait in."""
    if dist.get_rank() == 1:
        raise ValueError("rank 1 found a NaN in its batch")
    dist.all_reduce(torch.ones(1))


failure = None
try:
    launch(fail_on_rank_1, NPROCS, backend=BACKEND)
except RankError as error:
    failure = error
assert failure is not None and failure.rank == 1, "launch names the rank that failed"
print(str(failure).splitlines()[0])
print("...", failure.details.strip().splitlines()[-1])
assert "rank 1 found a NaN" in failure.details, "...and carries its traceback"

# %% [markdown]
# ## 2. Point-to-point messages
#
# The simplest exchange: rank 0 sends a tensor, rank 1 receives it into a tensor of the same shape and dtype
# (a message carries no shape: the receiver must know it). `dist.send` and `dist.recv` block until their
# side of the transfer is done.
#
# Now every rank sends its tensor to its right neighbour and receives from its left: the building block of
# the ring. With blocking calls, every rank would first sit in `send`, waiting for a neighbour that is itself
# sitting in `send`; whether that deadlocks depends on how much the backend buffers. Posting the send and
# the receive together (`isend`/`irecv`, batched with `batch_isend_irecv`) lets both proceed, and every
# collective in `common.distributed.collectives` is built from that one exchange.


# %%
def point_to_point() -> dict[str, list[float]]:
    """Rank 0 sends [1, 2, 3] to rank 1; then every rank passes a tensor of its rank to the right."""
    rank, world = dist.get_rank(), dist.get_world_size()
    message = torch.zeros(3)
    if rank == 0:
        dist.send(torch.tensor([1.0, 2.0, 3.0]), dst=1)
    elif rank == 1:
        dist.recv(message, src=0)
    mine, from_left = torch.full((3,), float(rank)), torch.empty(3)
    exchange = [
        dist.P2POp(dist.isend, mine, (rank + 1) % world),
        dist.P2POp(dist.irecv, from_left, (rank - 1) % world),
    ]
    for work in dist.batch_isend_irecv(exchange):
        work.wait()
    return {"message": message.tolist(), "from the left": from_left.tolist()}


p2p = launch(point_to_point, NPROCS, backend=BACKEND)
show_table(["rank", "recv from rank 0", "received from the left"], [[r, *v.values()] for r, v in p2p.items()])
assert p2p[1]["message"] == [1.0, 2.0, 3.0] and all(p2p[r]["message"] == [0.0] * 3 for r in p2p if r != 1)
assert all(p2p[r]["from the left"] == [float((r - 1) % NPROCS)] * 3 for r in p2p), "one step of a ring"

# %% [markdown]
# ## 3. Collectives: what each one leaves on each rank
#
# A collective is called by every rank of the group. To see what each one does, give rank r a buffer of N
# chunks (one number each) holding 10·r + c in chunk c, run the collective, and look at every rank's buffer
# afterwards. Below, each pair of grids is one collective: ranks are rows, chunks are columns, the colour is
# the rank a value came from, and dark cells hold a **sum over all ranks**. Blank cells hold nothing the
# collective defines.
#
# - **broadcast** (from rank 0): everyone gets rank 0's buffer. **scatter**: rank r gets chunk r of rank
#   0's buffer. **gather** (to rank 0): rank 0 gets every rank's chunk. **reduce** (to rank 0): rank 0 gets
#   the sum; the other ranks' buffers are scratch afterwards, not to be read.
# - **all-gather**: everyone gets every rank's chunk. **reduce-scatter**: rank r gets chunk r of the sum.
#   **all-reduce**: everyone gets the whole sum; in section 4 it is a reduce-scatter followed by an
#   all-gather. **all-to-all**: rank r gets chunk r of every rank, a transpose (expert parallelism
#   exchanges tokens this way).
#
# The definitions, written as array operations on the N×N grid of inputs, are in `semantics` below; the
# cell checks that gloo's collectives leave exactly that on every rank.

# %%
COLLECTIVES = (
    "broadcast", "scatter", "gather", "reduce", "all_gather", "reduce_scatter", "all_reduce", "all_to_all",
)  # fmt: skip


def run_collectives() -> dict[str, list[float]]:
    """Every collective once, on this rank's buffer [10 r + c for c in chunks]; this rank's buffer after each.

    NaN marks a chunk the collective gives this rank nothing for.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    nothing = [float("nan")] * world

    def buffer() -> torch.Tensor:
        return torch.arange(world, dtype=torch.float32) + 10 * rank

    def only(chunk: torch.Tensor) -> list[float]:  # a buffer holding just chunk `rank`
        return [chunk.item() if c == rank else float("nan") for c in range(world)]

    own = buffer()[rank : rank + 1]  # the one chunk a rank contributes to scatter's and gather's pictures
    after: dict[str, list[float]] = {}
    x = buffer()
    dist.broadcast(x, src=0)
    after["broadcast"] = x.tolist()
    x = torch.empty(1)
    dist.scatter(x, list(buffer().split(1)) if rank == 0 else None, src=0)
    after["scatter"] = only(x)
    gathered = [torch.empty(1) for _ in range(world)] if rank == 0 else None
    dist.gather(own, gathered, dst=0)
    after["gather"] = torch.cat(gathered).tolist() if rank == 0 else nothing
    x = buffer()
    dist.reduce(x, dst=0)
    after["reduce"] = x.tolist() if rank == 0 else nothing
    x = torch.empty(world)
    dist.all_gather_into_tensor(x, own)
    after["all_gather"] = x.tolist()
    x = torch.empty(1)
    dist.reduce_scatter_tensor(x, buffer())
    after["reduce_scatter"] = only(x)
    x = buffer()
    dist.all_reduce(x)
    after["all_reduce"] = x.tolist()
    x = torch.empty(world)
    dist.all_to_all_single(x, buffer())
    after["all_to_all"] = x.tolist()
    return after


def semantics(name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The definition of a collective on the inputs x[rank, chunk]: (input, its source, output, its source).

    Grids are ranks x chunks; NaN: nothing there. A source is the rank a value came from, or -1 for a sum.
    """
    p = len(x)
    ranks = np.arange(p)
    rows = np.repeat(ranks[:, None], p, axis=1).astype(float)  # x[r, c] comes from rank r
    total, diagonal = x.sum(axis=0), (ranks, ranks)
    nothing = np.full((p, p), np.nan)
    value_in, source_in = x.astype(float), rows.copy()
    value, source = nothing.copy(), nothing.copy()
    if name == "scatter":  # only the root's buffer is an input
        value_in[1:], source_in[1:] = np.nan, np.nan
    if name in ("gather", "all_gather"):  # each rank contributes its own chunk
        value_in, source_in = nothing.copy(), nothing.copy()
        value_in[diagonal], source_in[diagonal] = x[diagonal], ranks
    if name == "broadcast":
        value[:], source[:] = x[0], 0
    elif name == "scatter":
        value[diagonal], source[diagonal] = x[0], 0
    elif name == "gather":
        value[0], source[0] = x[diagonal], ranks
    elif name == "reduce":
        value[0], source[0] = total, -1
    elif name == "all_gather":
        value[:], source[:] = x[diagonal], ranks
    elif name == "reduce_scatter":
        value[diagonal], source[diagonal] = total, -1
    elif name == "all_reduce":
        value[:], source[:] = total, -1
    elif name == "all_to_all":
        value, source = x.T.astype(float), rows.T.copy()
    return value_in, source_in, value, source


SUM_COLOR, PARTIAL_COLOR = "0.25", "0.6"  # a sum over every rank; a sum over some of them (section 4)


def rank_color(rank: int) -> tuple[float, float, float, float]:
    """The colour of data that came from one rank."""
    return plt.cm.Pastel1(rank)


def draw_grid(ax, labels: list[list[str | None]], colors: list[list[object]], title: str) -> None:
    """Ranks (rows) x chunks (columns): each cell its label on its colour; a None label is an empty cell."""
    n_ranks, n_chunks = len(labels), len(labels[0])
    for r in range(n_ranks):
        for c in range(n_chunks):
            if labels[r][c] is None:
                ax.add_patch(Rectangle((c, r), 1, 1, facecolor="white", edgecolor="0.85"))
                continue
            ax.add_patch(Rectangle((c, r), 1, 1, facecolor=colors[r][c], edgecolor="white"))
            dark = np.mean(to_rgb(colors[r][c])) < 0.5
            ax.text(
                c + 0.5,
                r + 0.5,
                labels[r][c],
                ha="center",
                va="center",
                fontsize=8,
                color="w" if dark else "k",
            )
    ax.set(xlim=(0, n_chunks), ylim=(n_ranks, 0), title=title)
    ax.set_xticks(np.arange(n_chunks) + 0.5, [f"c{c}" for c in range(n_chunks)], fontsize=7)
    ax.set_yticks(np.arange(n_ranks) + 0.5, [f"rank {r}" for r in range(n_ranks)], fontsize=7)
    ax.tick_params(length=0)
    ax.set_aspect("equal")


def draw_values(ax, value: np.ndarray, source: np.ndarray, title: str) -> None:
    """A grid of numbers, each in the colour of the rank it came from (a sum over ranks: dark grey)."""
    labels = [[None if np.isnan(v) else f"{v:g}" for v in row] for row in value]
    colors = [[SUM_COLOR if s < 0 else rank_color(int(s)) if s >= 0 else None for s in row] for row in source]
    draw_grid(ax, labels, colors, title)


inputs = 10 * np.arange(NPROCS)[:, None] + np.arange(NPROCS)[None, :]
outputs = launch(run_collectives, NPROCS, backend=BACKEND)
fig, axes = plt.subplots(4, 4, figsize=(12, 12 if NPROCS > 2 else 7))
for k, name in enumerate(COLLECTIVES):
    value_in, source_in, value, source = semantics(name, inputs)
    measured = np.array([outputs[r][name] for r in range(NPROCS)])
    assert np.array_equal(measured, value, equal_nan=True), (name, measured, value)
    ax_in, ax_out = axes[k // 2, 2 * (k % 2)], axes[k // 2, 2 * (k % 2) + 1]
    draw_values(ax_in, value_in, source_in, f"{name}: before")
    draw_values(ax_out, measured, source, f"{name}: after")
fig.suptitle(f"Collectives on {NPROCS} ranks: rank r's chunk c holds 10r + c before (dark: a sum over ranks)")
plt.tight_layout()
plt.show()
print(f"all {len(COLLECTIVES)} collectives left exactly their definition on every rank")

# %% [markdown]
# ## 4. The ring all-reduce, step by step
#
# How does an all-reduce move its data? The obvious way, everyone sends the whole tensor to rank 0 which adds
# them up and sends the sum back, makes rank 0 receive and send (N-1) whole tensors: its link carries
# 2(N-1)·n bytes while the others idle. The **ring** spreads the work: the tensor is cut into N chunks and
# the ranks stand in a circle.
#
# - **Reduce-scatter**, N-1 steps: in each, every rank sends one chunk to its right neighbour, which adds it
#   to its own copy of that chunk. Each chunk travels round the ring collecting one more rank's share per
#   step, and after N-1 steps rank r holds chunk r summed over all ranks.
# - **All-gather**, N-1 more steps: the finished chunks travel round the ring once more, overwriting.
#
# Each rank sends one chunk, n/N bytes, per step: 2(N-1)/N·n bytes in all, less than 2n however many ranks
# there are, and every link is busy in every step. That is why NCCL uses a ring for large messages. But it
# takes 2(N-1) steps, each paying the link's latency, which will matter at scale (section 8).
#
# To watch it, give rank r the value 2^r: a partial sum is then a bit mask of the ranks it contains (5 =
# 0b101 = ranks 0 and 2, labelled "02" in the drawing). `ring_states` plays the schedule of
# `common.distributed.collectives` step by step on such masks; the cell then runs the library's real
# `ring_reduce_scatter` and `ring_all_gather` on N ranks and checks that they leave exactly what the drawing
# shows, halfway and at the end.


# %%
def ring_states(p: int) -> list[tuple[np.ndarray, str]]:
    """What each rank holds after each step of a ring all-reduce: holds[r, c] = mask of the ranks summed in.

    The schedule of common.distributed.collectives: at reduce-scatter step s, rank r sends chunk (r - s - 1)
    mod p to rank r + 1, which adds it to its own; at all-gather step s it sends chunk (r - s) mod p, which
    overwrites.
    """
    holds = np.repeat(1 << np.arange(p), p).reshape(p, p)  # rank r starts with its own data: bit r
    states = [(holds.copy(), "start")]
    for phase, shift in (("reduce-scatter", 1), ("all-gather", 0)):
        for step in range(p - 1):
            before = holds.copy()
            for r in range(p):
                chunk, right = (r - step - shift) % p, (r + 1) % p
                received = before[r, chunk]
                holds[right, chunk] = (
                    before[right, chunk] | received if phase == "reduce-scatter" else received
                )
            states.append((holds.copy(), f"{phase} step {step + 1}"))
    return states


def ring_on_masks() -> tuple[list[int], list[int]]:
    """The library's ring on inputs 2**rank (one element per chunk): the buffer halfway and at the end."""
    x = torch.full((dist.get_world_size(),), float(2 ** dist.get_rank()))
    collectives.ring_reduce_scatter(x)  # rank r: chunk r summed over all ranks; the others partial sums
    halfway = x.int().tolist()
    collectives.ring_all_gather(x)
    return halfway, x.int().tolist()


states = ring_states(NPROCS)
ring = launch(ring_on_masks, NPROCS, backend=BACKEND)
halfway, final = (np.array([ring[r][k] for r in range(NPROCS)]) for k in (0, 1))
assert np.array_equal(states[NPROCS - 1][0], halfway), "the library's reduce-scatter leaves what is drawn"
assert np.array_equal(states[-1][0], final) and (final == 2**NPROCS - 1).all(), (
    "...and so does its all-gather"
)

fig, axes = plt.subplots(1, len(states), figsize=(2.2 * len(states), 2.7))
for step, (ax, (holds, title)) in enumerate(zip(axes, states, strict=True)):
    ranks_in = [[[r for r in range(NPROCS) if mask >> r & 1] for mask in row] for row in holds]
    labels = [["".join(map(str, cell)) for cell in row] for row in ranks_in]
    colors = [
        [
            rank_color(cell[0]) if len(cell) == 1 else SUM_COLOR if len(cell) == NPROCS else PARTIAL_COLOR
            for cell in row
        ]
        for row in ranks_in
    ]
    draw_grid(ax, labels, colors, title)
    if step:  # outline what arrived in this step
        for r, c in zip(*np.nonzero(holds != states[step - 1][0]), strict=True):
            ax.add_patch(Rectangle((c, r), 1, 1, fill=False, edgecolor="C3", linewidth=2))
fig.suptitle(
    "Ring all-reduce: the ranks summed into each chunk (light grey: some, dark: all; red: just received)",
    y=1.02,
)
plt.tight_layout()
plt.show()

n = 256 * MiB
sends = len(states) - 1  # steps drawn, each rank sending one chunk of n / N bytes in each
assert sends == 2 * (NPROCS - 1) and cost_model.ring_cost(n, NPROCS).bytes == sends * n / NPROCS
costs = {p: (cost_model.ring_cost(n, p), cost_model.halving_doubling_cost(n, p)) for p in (2, 4, 8, 64, 1024)}
show_table(
    [
        "ranks",
        "ring: steps",
        "ring: bytes/n",
        "halving-doubling: steps",
        "h-d: bytes/n",
        "via rank 0: bytes/n",
    ],
    [
        (p, ring_c.steps, f"{ring_c.bytes / n:.3f}", hd.steps, f"{hd.bytes / n:.3f}", 2 * (p - 1))
        for p, (ring_c, hd) in costs.items()
    ],
)
assert all(ring_c.bytes < 2 * n for ring_c, _ in costs.values()), "the ring's bytes per rank stay below 2n"
assert costs[1024][0].steps == 2046 and costs[1024][1].steps == 20
RESULTS["ring"] = "each rank sends 2(N-1)/N of the tensor, in 2(N-1) steps: 2046 steps on 1024 ranks"

# %% [markdown]
# The drawing has 2(N-1) steps, and in each every rank sends one chunk (the red cells are what arrived). The
# table counts the same for more ranks, from `common.distributed.cost_model`: the ring's bytes per rank
# approach 2n and never reach it, while its steps grow with N. Recursive halving and doubling (also in
# `collectives`) moves the same bytes in 2·log2 N steps; through one root, the root's link carries 2(N-1)·n.
#
# ## 5. Bandwidth against message size, and the α-β model
#
# Sending n bytes costs α + n·β: α is the latency, what a message costs however small; β = 1/bandwidth.
# The ring's 2(N-1) steps each pay α, and each rank sends 2(N-1)/N·n bytes, so
#
# t(n) = 2(N-1)·α + 2(N-1)/N · n·β.
#
# Small messages are **latency-bound** (the first term), large ones **bandwidth-bound** (the second).
# nccl-tests, the tool everyone quotes for GPUs, reports two rates: the algorithm bandwidth algbw = n / t,
# and the **bus bandwidth** busbw = algbw · 2(N-1)/N, the rate at which each rank's link runs, which does
# not depend on N and can be compared with the link's datasheet. In the model, busbw approaches 1/β for
# large messages.
#
# Below we time gloo's `dist.all_reduce` from 4 KiB upwards (`time_all_reduces`: the sizes take turns over
# several rounds, so a burst of other work on the machine hits every size a little rather than one size a
# lot; each time is the slowest rank's), then fit α and β with `cost_model.fit_link` (the fit that makes the
# largest relative miss smallest) and draw the model over the measurements. At full size we do it for 2 and
# for 4 ranks.

# %%
SIZES = tuple(4 * KiB * 4**k for k in range(6 if SMALL else 8))  # 4 KiB .. 4 MiB, or .. 64 MiB
SWEEP_ROUNDS = 3 if SMALL else 9
WORLDS = (2,) if SMALL else (2, 4)
FIT_BOUND = 0.5  # the largest relative miss of the fitted model that the text below claims (full run)
sweep, links = {}, {}
for world in WORLDS:
    timings = launch(
        time_all_reduces, world, args=(SIZES, SWEEP_ROUNDS, {BACKEND: dist.all_reduce}), backend=BACKEND
    )
    sweep[world] = np.array(timings[0]["typical"][BACKEND])
    links[world] = cost_model.fit_link(
        [cost_model.Measurement(n, world, t) for n, t in zip(SIZES, sweep[world], strict=True)], "ring"
    )


def ring_model(world: int) -> np.ndarray:
    """Predicted seconds of a ring all-reduce of each size on `world` ranks, with that world's fitted link."""
    topology = cost_model.Topology.single(world, links[world])
    return np.array([cost_model.predict("ring", n, topology).time_s for n in SIZES])


def busbw(times: np.ndarray, world: int) -> np.ndarray:
    """nccl-tests' bus bandwidth in GB/s: algbw = n / t, times 2(N-1)/N."""
    return np.array(SIZES) / times * cost_model.bus_bandwidth_factor("all_reduce", world) / 1e9


rows = []
for i, n in enumerate(SIZES):
    row = [f"{n // KiB} KiB" if n < MiB else f"{n // MiB} MiB"]
    for world in WORLDS:
        t, model = sweep[world][i], ring_model(world)[i]
        row += [
            f"{t * 1e3:.3f}",
            f"{model * 1e3:.3f}",
            f"{model / t - 1:+.0%}",
            f"{busbw(sweep[world], world)[i]:.2f}",
        ]
    rows.append(row)
show_table(
    ["size", *(f"{w} ranks: {col}" for w in WORLDS for col in ("ms", "model ms", "miss", "busbw GB/s"))], rows
)
for world, link in links.items():
    print(f"fitted on {world} ranks: {link}")

fig, (ax_t, ax_bw) = plt.subplots(1, 2, figsize=(12, 4.2))
mib = np.array(SIZES) / MiB
for color, world in zip(("C0", "C1"), WORLDS, strict=False):
    ax_t.plot(mib, sweep[world] * 1e3, "o", color=color, label=f"gloo, {world} ranks (measured)")
    ax_t.plot(mib, ring_model(world) * 1e3, "-", color=color, label=f"ring model, {world} ranks")
    ax_bw.plot(mib, busbw(sweep[world], world), "o", color=color, label=f"gloo, {world} ranks (measured)")
    ax_bw.plot(mib, busbw(ring_model(world), world), "-", color=color, label=f"ring model, {world} ranks")
    ax_bw.axhline(links[world].bandwidth / 1e9, color=color, linestyle=":", linewidth=1)
ax_t.set(xscale="log", yscale="log", xlabel="message (MiB)", ylabel="all-reduce time (ms)")
ax_t.set_title("time: flat while latency-bound, then proportional to size", fontsize=10)
ax_bw.set(xscale="log", xlabel="message (MiB)", ylabel="bus bandwidth (GB/s)")
ax_bw.set_title("bus bandwidth = n/t · 2(N-1)/N; dotted: the fitted 1/β", fontsize=10)
for ax in (ax_t, ax_bw):
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

worst = {world: np.abs(ring_model(world) / sweep[world] - 1).max() for world in WORLDS}
# 64 KiB against 4 KiB (16x the bytes), and the largest size against a quarter of it
flat = {world: sweep[world][2] / sweep[world][0] for world in WORLDS}
steep = {world: sweep[world][-1] / sweep[world][-2] for world in WORLDS}
for world in WORLDS:
    print(
        f"{world} ranks: 16x the bytes (4 -> 64 KiB) take {flat[world]:.2f}x the time; 4x the bytes at the "
        f"top take {steep[world]:.2f}x; the model misses by at most {worst[world]:.0%}"
    )
if not SMALL:
    assert all(f < 2 for f in flat.values()), f"small messages are latency-bound: {flat}"
    assert all(s > 2.5 for s in steep.values()), f"large messages are bandwidth-bound: {steep}"
    assert all(w <= FIT_BOUND for w in worst.values()), f"the fitted model within {FIT_BOUND:.0%}: {worst}"
    latency_ratio = links[4].alpha_s / links[2].alpha_s
    print(f"the fitted latency on 4 ranks is {latency_ratio:.1f}x that on 2 ranks")
    if CORES < 4:
        assert latency_ratio > 2, "4 ranks on fewer cores wait for the scheduler"
RESULTS["all-reduce"] = "; ".join(
    f"{w} ranks: alpha {links[w].alpha_s * 1e6:.0f} us, 1/beta {links[w].bandwidth / 1e9:.2f} GB/s, "
    f"fit within {worst[w]:.0%}"
    for w in WORLDS
)

# %% [markdown]
# Reading the plot:
#
# - From 4 to 64 KiB the time hardly moves: 16 times the bytes cost less than twice the time (the printed
#   ratios). That is the latency term. At the top of the range, 4 times the bytes cost more than 2.5 times
#   the time: bandwidth-bound, and the bus bandwidth levels off towards the fitted 1/β (dotted).
# - The fitted model misses no measurement by more than 50% (the largest miss is printed for each world
#   size): two numbers, α and β, describe the whole curve from 4 KiB to 64 MiB. What they leave out: on a
#   CPU, a message that fits in the caches moves faster than one that doesn't, which no single β captures
#   (the docstring of `cost_model` lists what else the model ignores).
# - On this 2-core machine, the fitted latency on 4 ranks is more than twice that on 2 ranks (checked where
#   4 ranks have fewer than 4 cores). A ring over 4 ranks has 6 steps instead of 2, but α is per step, so
#   that is not it: 4 ranks on 2 cores take turns on the cores, and a rank that waits for a message often
#   waits for the sender to be scheduled. On one machine, the "link" is the kernel's loopback plus the
#   cores that copy and add. Between GPUs, each rank has its own device and its own links, and α is a few
#   microseconds (section 8).
#
# `effdl bench allreduce` runs the same measurement up to 256 MiB, with our own ring and halving-doubling
# beside gloo's; its results for this machine are in `benchmarks/results/` and
# `common/distributed/README.md`.
#
# ## 6. DDP from scratch, against torch's
#
# Data parallelism needs three things: every replica starts from the same weights, each rank computes
# gradients on its own shard of the batch, and the gradients are averaged before the optimizer step, so
# every replica takes the same step and they stay equal. `common.distributed.ddp.apply_ddp(model)` does it
# the way `torch.nn.parallel.DistributedDataParallel` does (read `ddp.py`, one file):
#
# - It broadcasts rank 0's parameters and buffers.
# - It registers a hook on every parameter that fires when its gradient is final, and copies the gradient,
#   divided by N, into a flat **bucket**. When a bucket is full, its all-reduce is launched asynchronously,
#   while autograd goes on with the gradients of earlier layers: communication **overlaps** backward.
#   Buckets (25 MiB by default) exist because one all-reduce per parameter would pay the latency α hundreds
#   of times per step, and one all-reduce of everything could only start when backward ends.
# - The first backward learns the order in which gradients arrive (roughly the reverse of the forward) and
#   builds the buckets in that order; at the end of every backward, it waits for the all-reduces and writes
#   the averages into `param.grad`.
#
# The model is an MLP (`common.distributed.benchmark.mlp`), with buckets of one hidden layer each (the first
# also holds the small output layer), so that the overlap has something to show. First the check that
# matters most: three SGD steps with `apply_ddp` and with torch's DDP, from the same weights on the same
# shards, and one process on the whole batch.

# %%
WIDTH, DEPTH, BATCH = (256, 4, 16) if SMALL else (1024, 8, 64)  # BATCH: examples per rank and micro-batch
# One hidden layer per bucket: its weight, WIDTH^2 fp32 numbers, is BUCKET_MB MiB; with its bias it fills one.
BUCKET_MB = 0.25 if SMALL else 4.0
STEPS, LR = 3, 0.1


def make_model() -> nn.Sequential:
    """The same initial weights every time it is called, in any process."""
    torch.manual_seed(0)
    return mlp(WIDTH, DEPTH)


def global_batch(step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch of a step (or its micro-batch `micro`): NPROCS x BATCH examples, in any process."""
    generator = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randn(NPROCS * BATCH, WIDTH, generator=generator)
    return x, torch.randint(0, 10, (NPROCS * BATCH,), generator=generator)


def my_shard(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of a global batch."""
    return tuple(t.chunk(dist.get_world_size())[dist.get_rank()] for t in batch)


def flat_grads(model: nn.Module) -> torch.Tensor:
    """Every parameter's gradient, in one vector."""
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def flat_params(model: nn.Module) -> torch.Tensor:
    """Every parameter, in one vector."""
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def train_both() -> dict[str, object]:
    """STEPS SGD steps of apply_ddp and of torch's DDP on this rank's shards, from the same weights."""
    ours, theirs = make_model(), make_model()
    reducer = apply_ddp(ours, bucket_cap_mb=BUCKET_MB, first_bucket_mb=BUCKET_MB)
    theirs_ddp = nn.parallel.DistributedDataParallel(theirs, bucket_cap_mb=BUCKET_MB)
    optimizers = [torch.optim.SGD(m.parameters(), lr=LR) for m in (ours, theirs)]
    difference = 0.0  # the largest |ours - torch's| of any gradient at any step
    for step in range(STEPS):
        x, y = my_shard(global_batch(step))
        for forward, optimizer in zip((ours, theirs_ddp), optimizers, strict=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(forward(x), y).backward()
            optimizer.step()
        difference = max(difference, (flat_grads(ours) - flat_grads(theirs)).abs().max().item())
    weights = flat_params(ours)
    rank_0_weights = weights.clone()
    dist.broadcast(rank_0_weights, src=0)
    return {
        "difference": difference,
        "equal to rank 0": torch.equal(weights, rank_0_weights),
        "weights": weights if dist.get_rank() == 0 else None,
        "buckets": [([reducer.names[i] for i in b.params], b.buffer.numel() * 4) for b in reducer.buckets],
    }


trained = launch(train_both, NPROCS, backend=BACKEND)
reference = make_model()  # one process, the whole batch, the same steps
optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
for step in range(STEPS):
    optimizer.zero_grad()
    x, y = global_batch(step)
    nn.functional.cross_entropy(reference(x), y).backward()
    optimizer.step()
single = (trained[0]["weights"] - flat_params(reference)).abs().max().item()
buckets = trained[0]["buckets"]

n_params = sum(p.numel() for p in reference.parameters())
print(
    f"MLP {WIDTH} wide, {DEPTH} hidden layers: {n_params / 1e6:.2f} M parameters, "
    f"{n_params * 4 / 1e6:.1f} MB of fp32 gradients per step"
)
show_table(
    ["bucket", "parameters, in the order their gradients arrive", "MiB"],
    [(i, ", ".join(names), f"{nbytes / MiB:.2f}") for i, (names, nbytes) in enumerate(buckets)],
)
show_table(
    ["rank", "max |ours - torch's gradient|", "weights equal to rank 0's"],
    [(r, f"{t['difference']:.1e}", t["equal to rank 0"]) for r, t in trained.items()],
)
print(f"after {STEPS} steps, max |rank 0's weights - one process's on the whole batch| = {single:.1e}")
assert all(t["difference"] == 0 for t in trained.values()), "bit for bit torch's gradients"
assert all(t["equal to rank 0"] for t in trained.values()), "the replicas stay identical"
assert single < 1e-5, "data parallel = one process on the whole batch, up to the order of additions"
assert buckets[0][0][0].startswith(f"{2 * DEPTH}.") and buckets[-1][0][-1].startswith("0."), "reverse order"
RESULTS["DDP"] = f"apply_ddp = torch DDP bit for bit on {NPROCS} ranks; = one process to {single:.0e}"

# %% [markdown]
# The first bucket holds the last layer's parameters, whose gradients backward computes first, and the last
# bucket the first layer's. Our gradients are torch's bit for bit, on every rank and every step: the same
# buckets make gloo add the same numbers in the same order. Against one process on the whole batch they
# agree to rounding (the printed difference): the mean of the shards' mean losses is the mean loss of the
# batch, but the additions happen in another order.
#
# ### A profiler trace of one step
#
# Now one training step of `apply_ddp` under `torch.profiler` on every rank, after two steps that build the
# buckets. Each rank writes a Chrome trace (open it in <https://ui.perfetto.dev> to see every op); the cell
# reads the traces back and draws the ranks on one timeline, which it can do because they share this
# machine's clock. Backward's ops run on each rank's main thread. Gloo runs the all-reduces on worker threads
# of its own, and the profiler records each as a `gloo:all_reduce` span on its thread, from when the thread
# starts it until it completes.

# %%
COMPUTE = "autograd::engine::evaluate_function"  # the profiler's name for one op of backward
KINDS = {"forward": "forward", "backward": "backward", ALL_REDUCE: "all-reduces"}


def profile_one_step(trace_dir: str) -> str:
    """On every rank: one apply_ddp training step under the profiler; returns the path of its Chrome trace."""
    model = make_model()
    apply_ddp(model, bucket_cap_mb=BUCKET_MB, first_bucket_mb=BUCKET_MB)
    x, y = my_shard(global_batch(0))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.profiler.record_function("forward"):
            out = model(x)
        with torch.profiler.record_function("backward"):
            nn.functional.cross_entropy(out, y).backward()
        # Gloo's thread ends an all-reduce's profiler span just after it lets backward go on, which can be after
        # the profiler has stopped; a barrier waits for every pending operation, so the profile holds them all.
        dist.barrier()

    for _ in range(2):  # the first backward learns the buckets; the second runs with them
        step()
    trace = Path(trace_dir) / f"ddp_step_rank{dist.get_rank()}.json"
    profile_steps(step, wait=0, warmup=1, active=1, trace_path=trace)
    return str(trace)


def read_trace(path: str) -> dict[str, list[tuple[float, float, int]]]:
    """A Chrome trace's spans by kind (forward, backward, ops, all-reduces): (start ms, end ms, thread id).

    Times are on the machine's clock (the trace's base time plus each event's offset), so that the traces of
    ranks on one machine line up.
    """
    trace = json.loads(Path(path).read_text())
    base_us = trace.get("baseTimeNanoseconds", 0) / 1e3
    spans: dict[str, list[tuple[float, float, int]]] = {
        k: [] for k in ("forward", "backward", "ops", "all-reduces")
    }
    for event in trace["traceEvents"]:
        kind = "ops" if event.get("name", "").startswith(COMPUTE) else KINDS.get(event.get("name"))
        if event.get("ph") == "X" and kind is not None:
            start = (base_us + event["ts"]) / 1e3
            spans[kind].append((start, start + event["dur"] / 1e3, event["tid"]))
    return spans


def busy(spans: list[tuple[float, float, int]], until: float = np.inf) -> float:
    """The length of the union of the spans, counting only what lies before `until` (ms)."""
    total, covered_to = 0.0, -np.inf
    for start, end, _ in sorted(spans):
        start, end = max(start, covered_to), min(end, until)  # skip what an earlier span covered already
        if end > start:
            total += end - start
            covered_to = end
    return total


def draw_step(ax, rank: int, spans: dict[str, list[tuple[float, float, int]]], t0: float) -> float:
    """One rank's step on two rows: ops, and all-reduces (a sub-row per gloo thread). Returns the ops' end."""
    y = 2 * rank

    def bar(items: list[tuple[float, float, int]]) -> list[tuple[float, float]]:
        return [(start - t0, end - start) for start, end, _ in items]

    ax.broken_barh(bar(spans["forward"]), (y, 0.8), color="0.7")
    ax.broken_barh(bar(spans["ops"]), (y, 0.8), color="C0")
    threads = sorted({tid for *_, tid in spans["all-reduces"]})
    height = 0.8 / len(threads)
    for k, span in enumerate(sorted(spans["all-reduces"])):  # buckets in turn, alternating shades
        lane = threads.index(span[2])
        ax.broken_barh(
            bar([span]),
            (y + 1 + lane * height, height),
            color=("C1", "#fdd0a2")[k % 2],
            edgecolor="k",
            linewidth=0.4,
        )
    ops_end = max(end for _, end, _ in spans["ops"])
    ax.plot([ops_end - t0] * 2, [y - 0.1, y + 1.9], color="C3", linewidth=1.5)
    return ops_end


traces = {
    r: read_trace(path)
    for r, path in launch(profile_one_step, NPROCS, args=(str(WORK),), backend=BACKEND).items()
}
t0 = min(start for spans in traces.values() for start, *_ in spans["forward"])  # the first rank's forward
fig, ax = plt.subplots(figsize=(12, 1 + 0.8 * NPROCS))
rows, overlap, last_end = [], {}, {}
for r, spans in traces.items():
    ops_end = draw_step(ax, r, spans, t0)
    reduces = sorted(spans["all-reduces"])
    overlap[r] = busy(reduces, until=ops_end) / busy(reduces)
    last_end[r] = max(end for _, end, _ in reduces)
    rows.append((
        r, len(reduces), f"{spans['backward'][0][0] - t0:.1f}", f"{reduces[0][0] - t0:.1f}",
        f"{ops_end - t0:.1f}", f"{last_end[r] - t0:.1f}", f"{overlap[r]:.0%}",
    ))  # fmt: skip
ax.set_yticks(
    [y + 0.4 for y in range(2 * NPROCS)],
    [f"rank {r}: {row}" for r in traces for row in ("forward, backward ops", "all-reduces")],
    fontsize=8,
)
ax.invert_yaxis()
ax.set_xlabel("ms since the first rank's forward began (one clock for all ranks)")
ax.set_title(
    "One apply_ddp step: forward (grey), backward's ops (blue), bucket all-reduces (orange, one row per gloo "
    "thread); red: backward's last op ends",
    fontsize=9,
)
plt.tight_layout()
plt.show()
show_table(
    ["rank", "all-reduces", "backward starts", "first all-reduce starts", "backward's ops end (red)",
     "last all-reduce ends", "all-reduce time before the red line"],
    rows,
)  # fmt: skip
end_spread = max(last_end.values()) - min(last_end.values())
print(f"ms since the first forward began; the last all-reduces end within {end_spread:.1f} ms of each other")
print(f"Chrome traces for Perfetto: {WORK.relative_to(REPO_ROOT)}/ddp_step_rank*.json")
assert all(len(spans["all-reduces"]) == len(buckets) for spans in traces.values()), "one per bucket"
if not SMALL:  # at small size, backward can be over before a gloo thread gets to the first bucket
    assert all(f > 0 for f in overlap.values()), "on every rank, all-reduces run while backward computes"
    assert end_spread < 50, "a collective ends when the last rank has joined it: on every rank at once"
RESULTS["overlap"] = (
    f"{min(overlap.values()):.0%}-{max(overlap.values()):.0%} of all-reduce time runs beside backward's ops"
)

# %% [markdown]
# The trace shows the mechanism: one all-reduce per bucket (the count is checked), the first ones starting
# while backward still computes the earlier layers (checked on every rank in the full run), the last ones
# running on after backward's last op (the red line), which `backward()` waits for. The last column gives the
# share of the all-reduces' busy time that ran while backward's ops were still going.
#
# On one clock the trace shows one more thing: on every rank the step's last all-reduce ends at nearly the
# same moment (less than 50 ms apart in the full run; the spread is printed), whenever that rank's backward
# ops ended. A collective is done only when every rank has joined it, so a rank that finished backward early
# waits for the slowest one: a data-parallel step runs at the pace of its slowest rank.
#
# Running at the same time is not the same as being free, though. Here the all-reduces need the CPU: gloo's
# threads copy and add the buckets, and the kernel copies the messages through the loopback. With every
# rank's main thread computing and no idle core, they can only take turns with backward on the same cores.
# Whether overlap makes a step faster, only a timing says. Four ways of taking the same step, each timed on
# every rank, in rounds that interleave them:
#
# - **no communication**: each rank trains alone (not data parallel; the floor);
# - **one bucket**: `apply_ddp` with one bucket for the whole model, whose all-reduce can only start when
#   the last gradient is ready, so after backward: no overlap;
# - **one bucket per layer**: the buckets of the trace, overlapping;
# - **torch DDP** with the same buckets.

# %%
STEP_ROUNDS, STEP_REPS = (
    (2, 1) if SMALL else (12, 2)
)  # rounds in which the variants take turns; calls per turn
ONE_BUCKET_MB = 1e6  # larger than the model


def time_in_rounds(runs: dict[str, Callable[[], object]]) -> dict[str, list[float]]:
    """On every rank: ms per call of each run in each round (the runs take turns), as the slowest rank saw it.

    Every rank makes the same calls, so the ranks' collectives match; a burst of other work on the machine
    lands on a few rounds of every run rather than on all the calls of one.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(STEP_ROUNDS):
        for name, run in runs.items():
            result = bench(run, warmup_ms=0, rep_ms=0, min_reps=STEP_REPS, max_reps=STEP_REPS, device="cpu")
            slowest = torch.tensor([result.median_ms], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            times[name].append(slowest.item())
    return times


def paired(times: dict[str, np.ndarray], a: str, b: str) -> tuple[float, float, float]:
    """time(a) / time(b) within each round: the median and p20, p80 over rounds."""
    ratios = times[a] / times[b]
    return float(np.median(ratios)), float(np.percentile(ratios, 20)), float(np.percentile(ratios, 80))


def time_steps() -> dict[str, list[float]]:
    """On every rank: ms per training step of each variant, per round."""
    variants = {
        name: make_model() for name in ("no communication", "one bucket", "one bucket per layer", "torch DDP")
    }
    apply_ddp(variants["one bucket"], bucket_cap_mb=ONE_BUCKET_MB, first_bucket_mb=ONE_BUCKET_MB)
    apply_ddp(variants["one bucket per layer"], bucket_cap_mb=BUCKET_MB, first_bucket_mb=BUCKET_MB)
    variants["torch DDP"] = nn.parallel.DistributedDataParallel(
        variants["torch DDP"], bucket_cap_mb=BUCKET_MB
    )
    x, y = my_shard(global_batch(0))

    def step(model: nn.Module) -> None:  # forward and backward with its all-reduces: the part DDP changes
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()

    for model in variants.values():  # builds the buckets
        step(model)
        step(model)
    return time_in_rounds({name: partial(step, model) for name, model in variants.items()})


step_ms = {name: np.array(t) for name, t in launch(time_steps, NPROCS, backend=BACKEND)[0].items()}
show_table(
    ["step", "median ms", "/ no communication: median of rounds", "p20-p80"],
    [
        (name, f"{np.median(t):.1f}", f"{r:.2f}", f"{lo:.2f}-{hi:.2f}")
        for name, t in step_ms.items()
        for r, lo, hi in [paired(step_ms, name, "no communication")]
    ],
)
communication = paired(step_ms, "one bucket per layer", "no communication")[0]
overlap_gain = paired(step_ms, "one bucket", "one bucket per layer")[0]
ours_vs_torch = paired(step_ms, "one bucket per layer", "torch DDP")[0]
print(
    f"medians of the per-round ratios: communication makes the step {communication:.2f}x longer; "
    f"one bucket / one per layer = {overlap_gain:.2f}; ours / torch's = {ours_vs_torch:.2f}"
)
if not SMALL:
    assert communication > 1.2, "the all-reduces cost a large part of a step"
    assert 1 / 1.15 < ours_vs_torch < 1.15, "apply_ddp's step takes torch DDP's time"
    if CROWDED:
        assert 1 / 1.15 < overlap_gain < 1.15, "with no core to spare, overlap buys no measurable time"
RESULTS["DDP step"] = (
    f"{NPROCS} ranks: all-reduces make the step {communication:.2f}x longer; overlap gains "
    f"{overlap_gain:.2f}x; ours/torch {ours_vs_torch:.2f}"
)

# %% [markdown]
# In the full run on this machine (4 ranks, 2 cores), comparing the variants round by round (medians of the
# per-round ratios, which need not equal the quotients of the median times; the p20-p80 column says how much
# the rounds disagree):
#
# - The all-reduces make a step more than 1.2 times as long as training alone: every step all-reduces 33.6 MB
#   of gradients through the loopback, at the bus bandwidth of section 5.
# - **Overlap buys nothing measurable**: one bucket after backward and one bucket per layer overlapping it
#   take the same time, within 15% (checked where the ranks have no core to spare). The communication does
#   run beside backward, as the trace showed, but on the same two cores, so what it hides from the timeline
#   it takes from backward's ops. Overlap pays when communication uses hardware that compute does not: on a
#   GPU server, NCCL moves the data with the NICs' and NVLink's DMA engines and a few of the GPU's SMs, while
#   backward's kernels keep the other SMs busy.
# - `apply_ddp` takes torch DDP's time, within 15%: the same buckets, the same all-reduces.
#
# (`effdl bench ddp` times `apply_ddp` against torch's DDP in more rounds; its result for this machine is
# in `common/distributed/README.md`.)
#
# ## 7. Gradient accumulation with `no_sync()`
#
# When the batch you want does not fit in memory, you accumulate: K micro-batches, each loss divided by K,
# their gradients summed in `param.grad`, then one optimizer step. Under DDP every backward would all-reduce,
# K times per step, although only the sum matters. `with ddp.no_sync():` turns the hooks off, so those
# backwards only accumulate locally, and the first backward outside it all-reduces the sum: one all-reduce
# per bucket per step instead of K. torch's DDP has the same `model.no_sync()`.
#
# The check: K micro-batches on each of N ranks, with `no_sync` (ours and torch's), and with an all-reduce
# after every micro-batch, against one process on all N·K micro-batches at once. Then the all-reduces each
# variant makes, counted in a profile, and the time of a step of each.

# %%
ACCUMULATE = 4  # micro-batches per optimizer step


def accumulate(model: nn.Module, sync: Reducer | nn.parallel.DistributedDataParallel | None) -> None:
    """Accumulate K micro-batches in param.grad; with `sync` (a DDP), all but the last run in no_sync()."""
    model.zero_grad(set_to_none=True)
    for micro in range(ACCUMULATE):
        x, y = my_shard(global_batch(0, micro))
        quiet = sync.no_sync() if sync is not None and micro < ACCUMULATE - 1 else contextlib.nullcontext()
        with quiet:
            (nn.functional.cross_entropy(model(x), y) / ACCUMULATE).backward()


def all_reduces_in(run: Callable[[], object]) -> int:
    """How many all-reduces one call of run makes, counted in a profile of it (after one unprofiled call)."""

    def step() -> None:
        run()
        dist.barrier()  # as in profile_one_step: so that the profile holds every all-reduce's span

    prof = profile_steps(step, wait=0, warmup=1, active=1)
    return sum(event.name == ALL_REDUCE for event in prof.events())


def accumulation() -> dict[str, object]:
    """On every rank: gradients, all-reduce counts and step times of accumulation with and without no_sync."""
    every, ours, theirs = make_model(), make_model(), make_model()
    apply_ddp(every, bucket_cap_mb=BUCKET_MB, first_bucket_mb=BUCKET_MB)
    reducer = apply_ddp(ours, bucket_cap_mb=BUCKET_MB, first_bucket_mb=BUCKET_MB)
    theirs_ddp = nn.parallel.DistributedDataParallel(theirs, bucket_cap_mb=BUCKET_MB)
    runs = {
        "all-reduce every micro-batch": lambda: accumulate(every, None),
        "no_sync (ours)": lambda: accumulate(ours, reducer),
        "no_sync (torch DDP)": lambda: accumulate(theirs_ddp, theirs_ddp),
    }
    for run in runs.values():  # twice: the first backward learns the buckets
        run()
        run()
    grads = {name: flat_grads(model) for name, model in zip(runs, (every, ours, theirs), strict=True)}
    counts = {name: all_reduces_in(run) for name, run in runs.items()}
    times = time_in_rounds(runs)
    return {"grads": grads if dist.get_rank() == 0 else None, "counts": counts, "times": times}


accumulated = launch(accumulation, NPROCS, backend=BACKEND)
reference = make_model()
micro_batches = [global_batch(0, micro) for micro in range(ACCUMULATE)]
x, y = (torch.cat(parts) for parts in zip(*micro_batches, strict=True))
nn.functional.cross_entropy(reference(x), y).backward()  # one process, all N x K micro-batches at once
expected = flat_grads(reference)
grads, counts = accumulated[0]["grads"], accumulated[0]["counts"]
times = {name: np.array(t) for name, t in accumulated[0]["times"].items()}
show_table(["accumulation of 4 micro-batches", "all-reduces", "median ms", "max |grad - one process's|"], [
    (name, counts[name], f"{np.median(times[name]):.1f}", f"{(g - expected).abs().max():.1e}")
    for name, g in grads.items()
])  # fmt: skip
speedup, low, high = paired(times, "all-reduce every micro-batch", "no_sync (ours)")
print(
    f"no_sync makes the accumulation {speedup:.2f}x faster (median of the per-round ratios; p20-p80 {low:.2f}-{high:.2f})"
)
for name, g in grads.items():
    torch.testing.assert_close(g, expected, msg=f"{name}: not one process's gradient on the whole batch")
assert torch.equal(grads["no_sync (ours)"], grads["no_sync (torch DDP)"]), "ours = torch's, bit for bit"
assert counts["no_sync (ours)"] == counts["no_sync (torch DDP)"] == len(buckets), "one all-reduce per bucket"
assert counts["all-reduce every micro-batch"] == ACCUMULATE * len(buckets), "...instead of K per bucket"
if not SMALL:
    assert speedup > 1.2, "accumulating locally saves most of the communication"
RESULTS["no_sync"] = (
    f"{ACCUMULATE} micro-batches: {counts['no_sync (ours)']} all-reduces instead of "
    f"{counts['all-reduce every micro-batch']}, {speedup:.2f}x faster"
)

# %% [markdown]
# All three give one process's gradient on the whole batch, to rounding; ours and torch's `no_sync` agree
# bit for bit. Without `no_sync`, each of the K backwards all-reduces every bucket; with it, only the last
# does, and in the full run the accumulation is more than 1.2 times faster. The sum of the K gradients is
# all-reduced once, so K micro-batches cost the communication of one: accumulation is also how to make
# communication a smaller share of a step when the network is slow.
#
# ## 8. At cluster scale: what the cost model says
#
# We cannot measure 1024 GPUs here, but the α-β model that fitted gloo above can predict them, given the
# links' parameters. A typical GPU cluster today: nodes of 8 GPUs joined by **NVLink**, and one InfiniBand
# NIC per GPU between nodes.
#
# - **NVLink 4** (H100, H200): 18 links of 25 GB/s each way, quoted as **900 GB/s**, but that counts both
#   directions together: **450 GB/s each way**. A ring step sends to one neighbour and receives from another
#   at the same time, each in its own direction, so the rate a step runs at is the per-direction 450 GB/s.
#   The model uses α = 3 µs.
# - **InfiniBand NDR**: 400 Gb/s per NIC and direction, 50 GB/s; α = 6 µs.
#
# A **flat ring** over all 1024 GPUs has some network hop in every one of its 2·1023 steps, so it goes at the
# network's pace and pays 2046 network latencies. A **tree** (NCCL uses double binary trees across nodes)
# has 2·log2(1024) = 20 steps but moves 2n per rank. The **hierarchical** all-reduce reduce-scatters inside
# each node over NVLink, all-reduces 1/8 of the data across the 128 nodes (the 8 GPUs of a node in
# parallel, each over its own NIC), and all-gathers inside the node.
# `cost_model.compare_at_scale()` compares them for 128 nodes of 8 GPUs.

# %%
NVLINK, INFINIBAND = cost_model.NVLINK_H100, cost_model.INFINIBAND_NDR
assert NVLINK.bandwidth == 900e9 / 2 and INFINIBAND.bandwidth == 400e9 / 8, "per direction, in bytes/s"
NODES, PER_NODE = 128, 8
scale = cost_model.compare_at_scale(nodes=NODES, gpus_per_node=PER_NODE, intra=NVLINK, inter=INFINIBAND)
ALGORITHMS = ("ring", "tree", "hierarchical")
show_table(
    ["message", *(f"{a} ms" for a in ALGORITHMS), *(f"{a} busbw GB/s" for a in ALGORITHMS)],
    [
        [f"{row['nbytes'] / KiB:g} KiB" if row["nbytes"] < MiB else f"{row['nbytes'] / MiB:g} MiB"]
        + [f"{row[f'{a}_s'] * 1e3:.2f}" for a in ALGORITHMS]
        + [f"{row[f'{a}_busbw'] / 1e9:.1f}" for a in ALGORITHMS]
        for row in scale
    ],
)
curves = cost_model.compare_at_scale(  # the same, at every power of two, for the plot
    sizes=[2**k for k in range(10, 31)], nodes=NODES, gpus_per_node=PER_NODE, intra=NVLINK, inter=INFINIBAND
)
sizes = np.array([row["nbytes"] for row in curves])
fig, ax = plt.subplots(figsize=(8, 4))
for a in ALGORITHMS:
    ax.plot(sizes / MiB, [row[f"{a}_busbw"] / 1e9 for row in curves], "-", label=a)
ax.axhline(
    INFINIBAND.bandwidth / 1e9, color="k", linestyle=":", label="InfiniBand NDR, per GPU and direction"
)
ax.set(xscale="log", yscale="log", xlabel="message (MiB)", ylabel="bus bandwidth (GB/s)")
ax.set_title(f"All-reduce on {NODES * PER_NODE} GPUs ({NODES} nodes x {PER_NODE}), α-β model", fontsize=10)
ax.grid(True, which="both", alpha=0.3)
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

world = NODES * PER_NODE
ring_floor = cost_model.ring_cost(0, world).time(INFINIBAND)  # 2(p-1) latencies, no bytes
crossover = ring_floor / cost_model.ring_cost(1, world).time(cost_model.Link(0, INFINIBAND.bandwidth))
speedups = [row["ring_s"] / row["hierarchical_s"] for row in scale]
print(
    f"flat ring's latency alone: 2 x {world - 1} x {INFINIBAND.alpha_s * 1e6:g} us = {ring_floor * 1e3:.2f} ms; "
    f"its bytes take as long at {crossover / 1e6:.0f} MB"
)
print(f"hierarchical over flat ring: {min(speedups):.1f}x to {max(speedups):.1f}x faster")
assert abs(scale[0]["ring_s"] - ring_floor) < 0.01 * ring_floor, "at 1 KiB the flat ring is all latency"
assert 250e6 < crossover < 350e6, "latency dominates the flat ring up to about 300 MB"
assert min(speedups) > 4.9, "hierarchical is about 5x faster or more at every size"
assert all(row["tree_s"] < row["hierarchical_s"] for row in scale if row["nbytes"] <= 16 * MiB)
assert all(row["hierarchical_s"] < row["tree_s"] for row in scale if row["nbytes"] >= 256 * MiB)
assert scale[-1]["hierarchical_busbw"] > INFINIBAND.bandwidth, "busbw counts NVLink traffic too"

# The gradients of a 7B-parameter model in bf16, all-reduced once per step: at once, or in 25 MiB buckets.
grad_bytes = 7e9 * 2
topology = cost_model.Topology(NODES, PER_NODE, NVLINK, INFINIBAND)
bucket = 25 * MiB
n_buckets_7b = grad_bytes / bucket
at_once = {a: cost_model.predict(a, grad_bytes, topology).time_s for a in ("ring", "hierarchical")}
bucketed = {a: n_buckets_7b * cost_model.predict(a, bucket, topology).time_s for a in at_once}
show_table(
    ["all-reduce of 14 GB of gradients", "at once, ms", f"in {n_buckets_7b:.0f} buckets of 25 MiB, ms"],
    [(a, f"{at_once[a] * 1e3:.0f}", f"{bucketed[a] * 1e3:.0f}") for a in at_once],
)
print(
    f"in buckets, the ring takes {bucketed['ring'] / at_once['ring']:.1f}x its time for one message, and "
    f"{bucketed['ring'] / bucketed['hierarchical']:.1f}x the hierarchical all-reduce's time in buckets"
)
assert bucketed["ring"] > 10 * at_once["ring"], "each bucket pays the ring's 2046 latencies"
assert bucketed["ring"] > 7 * bucketed["hierarchical"]
RESULTS["1024 GPUs"] = (
    f"hierarchical {min(speedups):.1f}-{max(speedups):.1f}x faster than a flat ring; 7B bf16 gradients in "
    f"25 MiB buckets: ring {bucketed['ring']:.1f} s, hierarchical {bucketed['hierarchical']:.2f} s per step"
)

# %% [markdown]
# What the model says (these numbers are predictions from datasheet rates, not measurements):
#
# - A flat ring over 1024 GPUs pays 2046 network latencies, 12.3 ms, before it moves a byte; its bytes take
#   as long only at about 300 MB, so up to there the latency dominates. The hierarchical all-reduce pays
#   2·127 network latencies (and 2·7 NVLink ones) and sends only 1/8 of the data over the network: about 5
#   times faster or more at every size, per the printed range.
# - Up to 16 MiB a tree is faster still (20 latencies): that is why NCCL picks trees for small messages
#   across nodes. From 256 MiB the hierarchical algorithm wins; its bus bandwidth even exceeds the
#   network's, because most of the traffic counted in busbw stays inside a node, on NVLink.
# - DDP's 25 MiB buckets meet the ring at its worst: each bucket pays the full 12 ms of latency, and 14 GB of
#   bf16 gradients of a 7B model make 534 buckets, more than 10 times the ring's time for one message, and
#   more than 7 times the hierarchical all-reduce's time in the same buckets (both printed). Real systems
#   use bigger messages at scale, hierarchical or tree algorithms (NCCL picks per size and topology), and
#   shard the model so that each GPU reduces less (weeks 5 and 6).
#
# ## Summary
#
# - N processes become ranks 0..N-1 through a rendezvous at a store that all of them know; then every
#   collective is matched across the ranks by the order of the calls, and a rank that fails or hangs must be
#   named and the others killed, which `launch` does.
# - Collectives are defined by what they leave on each rank (drawn in section 3); an all-reduce is a
#   reduce-scatter followed by an all-gather, and the ring does each in N-1 steps, sending less than 2n per
#   rank for any N.
# - An all-reduce costs 2(N-1)·α + 2(N-1)/N·n·β: latency-bound for small messages, bandwidth-bound for large
#   ones; two fitted numbers describe the measured curve on gloo, and quote bus bandwidth to compare runs.
# - DDP = same start, gradients averaged in buckets by hooks during backward; ours matches torch's bit for
#   bit. Overlap hides communication only when it runs on hardware that compute does not use: on this
#   2-core CPU it gained nothing measurable.
# - `no_sync()` turns K all-reduces per step into one. At cluster scale the model says latency decides: a
#   hierarchical all-reduce, and messages larger than DDP's default buckets, cut the time several-fold.

# %% tags=["summary"]
for key, line in RESULTS.items():
    print(f"{key}: {line}")
