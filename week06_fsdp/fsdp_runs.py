"""What the week-6 seminar's ranks run: DTensor's placements, every sharded scheme's training, a resume.

From its third section on, the seminar starts its ranks with `launch(..., start_method="spawn")`, fresh
interpreters that import these functions by name, so they live in this file rather than in a notebook cell:
a rank forked from a notebook that has run a backward pass on a GPU machine cannot run autograd (week 5's
parallel_runs.py says why), and the memory probe of common.memory counts every tensor of its process, so it
needs a fresh one. (Its first two sections fork, before the notebook's first backward.)

Each function returns plain data (numbers, CPU tensors, strings); the notebook compares it with one
process's computation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.utils._python_dispatch import TorchDispatchMode

from common.bench import bench
from common.distributed.fsdp import (
    apply_fsdp,
    full_parameters,
    load_checkpoint,
    save_checkpoint,
    train_steps,
)
from common.distributed.launch import rank_device
from common.distributed.zero import ZeroOptimizer
from common.memory.anatomy import MeasuredStep
from common.memory.sharded import TABLE_BATCH, TABLE_CONFIG, TABLE_SEQ, measure_sharded_step
from common.models.llama import Llama, LlamaConfig, random_batch, training_flops
from common.profiling import (
    dump_memory_snapshot,
    memory_history,
    memory_snapshot,
    profile_steps,
    summarize_snapshot,
)

# d_model 30, vocab 61: norms and embeddings do not divide by 4 ranks, so FSDP2's shards are padded.
CONFIG = LlamaConfig(vocab_size=61, d_model=30, n_layers=4, n_heads=5, n_kv_heads=1, d_ff=44, max_seq_len=16)
BATCH, SEQ = 4, 8  # sequences per global batch: 2 or 1 per rank, and 2 per rank after a resume on half
STEPS, MORE_STEPS = 3, 2  # steps before the checkpoint, and after it
ADAMW = {"lr": 1e-2, "betas": (0.9, 0.95)}
PREFETCH = 2  # blocks whose all-gather a block issues right after its own, with explicit prefetching


def fresh_model() -> Llama:
    torch.manual_seed(0)  # every rank and the single-process reference build the same weights
    return Llama(CONFIG)


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS + MORE_STEPS global batches of (tokens, targets), the same in every process."""
    g = torch.Generator().manual_seed(1)
    data = [
        torch.randint(CONFIG.vocab_size, (BATCH, SEQ + 1), generator=g) for _ in range(STEPS + MORE_STEPS)
    ]
    return [(d[:, :-1], d[:, 1:]) for d in data]


# ----------------------------------------------------------------------------------------------------
# DTensor: placements and the collectives that convert between them
# ----------------------------------------------------------------------------------------------------

ROWS, COLS = 10, 4  # 10 rows: 5 + 5 on 2 ranks, 3 + 3 + 3 + 1 on 4 (torch.chunk's split)


def summand(rank: int) -> torch.Tensor:
    """What rank r holds of a Partial() tensor: a gradient computed on its own data, say."""
    return torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS) * (rank + 1)


def _collectives(comm: CommDebugMode) -> dict[str, int]:
    return {str(op).split(".")[-1]: n for op, n in comm.get_comm_counts().items()}


def dtensor_tour() -> dict[str, dict]:
    """On every rank: a weight sharded by rows, redistributed, multiplied; a Partial sum, reduced two ways.

    For each step: this rank's local tensor (or the whole result) and the collectives DTensor issued.
    """
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    weight = torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS)
    x = torch.linspace(-1, 1, 3 * ROWS).reshape(3, ROWS)
    steps: dict[str, dict] = {}

    def record(name: str, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        with CommDebugMode() as comm:
            out = run()
        local = out.to_local() if isinstance(out, DTensor) else out
        placements = [str(p) for p in out.placements] if isinstance(out, DTensor) else []
        steps[name] = {"local": local.clone(), "placements": placements, "collectives": _collectives(comm)}
        return out

    w = record("distribute_tensor(weight, [Shard(0)])", lambda: distribute_tensor(weight, mesh, [Shard(0)]))
    record("Shard(0) -> Replicate()", lambda: w.redistribute(mesh, [Replicate()]))
    xr = distribute_tensor(x, mesh, [Replicate()])
    record("Replicate() @ Shard(0)", lambda: xr @ w)
    record("(Replicate() @ Shard(0)).full_tensor()", lambda: (xr @ w).full_tensor())
    grad = DTensor.from_local(summand(dist.get_rank()), mesh, [Partial()])
    record("Partial() -> Shard(0)", lambda: grad.redistribute(mesh, [Shard(0)]))
    record("Partial() -> Replicate()", lambda: grad.redistribute(mesh, [Replicate()]))
    return steps


# ----------------------------------------------------------------------------------------------------
# The collectives of one training step, as the ranks call them
# ----------------------------------------------------------------------------------------------------

# c10d's ops as they reach the dispatcher -> (kind, which tensor argument is the whole message)
C10D_OPS = {
    "_allgather_base_": ("all-gather", 0),  # (output, input, ...): the gathered output
    "_reduce_scatter_base_": ("reduce-scatter", 1),  # (output, input, ...): the input that is reduced
    "allreduce_": ("all-reduce", 0),  # ([tensors], ...)
}


@dataclass(frozen=True)
class Collective:
    """One collective a rank called: its kind, the whole message's bytes and dtype, the ranks taking part."""

    kind: str
    nbytes: int
    dtype: str
    group_size: int
    before_block: int | None  # the block whose forward had not started yet when it was called (None: after)


class CollectiveLog(TorchDispatchMode):
    """Every all-gather, reduce-scatter and all-reduce this rank calls while inside, in order.

    A dispatch mode sees the c10d ops that torch.distributed's functions call, with their tensors, so it
    sees FSDP2's and ZeroOptimizer's collectives alike. `mark_blocks(model)` also notes each block's
    forward, so the log says which all-gathers were issued before which block ran (prefetching).
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Collective] = []
        self._forwards_started = 0

    def mark_blocks(self, model: Llama) -> list:
        def started(module: nn.Module, args: object) -> None:
            self._forwards_started += 1

        return [block.register_forward_pre_hook(started) for block in model.layers]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if func.namespace == "c10d" and name in C10D_OPS:
            kind, position = C10D_OPS[name]
            message = args[position][0] if isinstance(args[position], list) else args[position]
            group = next(a for a in args if isinstance(a, torch.ScriptObject))  # the first is the group
            block = self._forwards_started if self._forwards_started < CONFIG.n_layers else None
            self.calls.append(
                Collective(
                    kind,
                    message.numel() * message.element_size(),
                    str(message.dtype).removeprefix("torch."),
                    dist.ProcessGroup.unbox(group).size(),
                    block,
                )
            )
        return out


# ----------------------------------------------------------------------------------------------------
# Every scheme, trained on the same batches
# ----------------------------------------------------------------------------------------------------


def _fsdp(**options: object) -> Callable[[Llama], Llama]:
    return lambda model: apply_fsdp(model, **options)


def fsdp_prefetching(model: Llama) -> Llama:
    """FSDP2 where each block issues the next PREFETCH blocks' all-gathers (and the backward's likewise)."""
    apply_fsdp(model)
    blocks = list(model.layers)
    for i, block in enumerate(blocks):
        block.set_modules_to_forward_prefetch(blocks[i + 1 : i + 1 + PREFETCH])
        block.set_modules_to_backward_prefetch(blocks[max(i - PREFETCH, 0) : i][::-1])
    return model


def _hsdp(model: Llama) -> Llama:
    """HSDP: shard over groups of `world / 2` ranks, replicate across the 2 groups."""
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    return apply_fsdp(model, mesh)


def schemes(world_size: int) -> dict[str, Callable[[Llama], Llama] | int]:
    """name -> how the model is made data parallel: a function applied to it, or a ZeRO stage (1, 2)."""
    table: dict[str, Callable[[Llama], Llama] | int] = {
        "ZeRO-1": 1,
        "ZeRO-2": 2,
        "FSDP2": _fsdp(),
        "FSDP2, keep gathered": _fsdp(reshard_after_forward=False),
    }
    if world_size >= 4:  # an int must be a divisor of the shard group other than 1 and p
        table[f"FSDP2, reshard to {world_size // 2}"] = _fsdp(reshard_after_forward=world_size // 2)
    table |= {
        f"FSDP2, prefetch {PREFETCH}": fsdp_prefetching,
        "FSDP2, bf16 gather, fp32 reduce": _fsdp(
            mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        ),
        "FSDP2, CPU offload": _fsdp(offload_policy=CPUOffloadPolicy(pin_memory=False)),
        f"HSDP (2 x {world_size // 2})": _hsdp,
    }
    return table


def _build(how: Callable[[Llama], Llama] | int) -> tuple[Llama, object]:
    """A fresh model made data parallel by `how`, and its AdamW (a ZeroOptimizer for the ZeRO stages)."""
    model = fresh_model()
    if isinstance(how, int):
        return model, ZeroOptimizer(model.parameters(), torch.optim.AdamW, stage=how, **ADAMW)
    how(model)
    return model, torch.optim.AdamW(model.parameters(), **ADAMW)


def _one_logged_step(how: Callable[[Llama], Llama] | int) -> list[Collective]:
    """The collectives of the first training step of a fresh copy (forward, backward, optimizer step)."""
    model, optimizer = _build(how)
    tokens, targets = batches()[0]
    rank, world = dist.get_rank(), dist.get_world_size()
    log = CollectiveLog()
    hooks = log.mark_blocks(model)
    with log:
        model.loss(tokens.chunk(world)[rank], targets.chunk(world)[rank]).backward()
        optimizer.step()
    for hook in hooks:
        hook.remove()
    if isinstance(optimizer, ZeroOptimizer):
        optimizer.remove()
    return log.calls


def _sharding(model: Llama, optimizer: object) -> dict:
    """What this rank holds: elements of parameters and of AdamW's states, one weight's placement."""
    weight = model.layers[0].attention.wq.weight
    inner = optimizer.optimizer if isinstance(optimizer, ZeroOptimizer) else optimizer
    states = [t for s in inner.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim()]
    local = [(p.to_local() if isinstance(p, DTensor) else p) for p in model.parameters()]
    return {
        "parameter elements": sum(p.numel() for p in local),
        "state elements": sum((t.to_local() if isinstance(t, DTensor) else t).numel() for t in states),
        "wq type": type(weight).__name__,
        "wq placements": [str(p) for p in weight.placements] if isinstance(weight, DTensor) else [],
        "wq local shape": tuple((weight.to_local() if isinstance(weight, DTensor) else weight).shape),
        "block class": type(model.layers[0]).__name__,
        "is FSDPModule": isinstance(model.layers[0], FSDPModule),
    }


def train_every_scheme(checkpoint_dir: str) -> dict[str, dict]:
    """On every rank: each scheme trained STEPS steps (losses, whole parameters, what the rank holds, one
    step's collectives). FSDP2 also saves a DCP checkpoint to checkpoint_dir and trains MORE_STEPS more."""
    report = {}
    data = batches()
    for name, how in schemes(dist.get_world_size()).items():
        model, optimizer = _build(how)
        losses = train_steps(model, optimizer, data[:STEPS])
        report[name] = {
            "losses": losses,
            "params": full_parameters(model),
            "holds": _sharding(model, optimizer),
            "collectives": _one_logged_step(how),
        }
        if name == "FSDP2":
            save_checkpoint(model, optimizer, Path(checkpoint_dir))
            report[name]["continued"] = train_steps(model, optimizer, data[STEPS:])
            report[name]["continued params"] = full_parameters(model)
        if isinstance(optimizer, ZeroOptimizer):
            optimizer.remove()
    return report


def resume(checkpoint_dir: str) -> dict:
    """On every rank of another world size: load the FSDP2 checkpoint into a fresh model, train MORE_STEPS."""
    model = apply_fsdp(fresh_model())
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    load_checkpoint(model, optimizer, Path(checkpoint_dir))
    losses = train_steps(model, optimizer, batches()[STEPS:])
    return {"losses": losses, "params": full_parameters(model)}


# ----------------------------------------------------------------------------------------------------
# Memory of reshard_after_forward=k (common.memory.sharded measures True and False)
# ----------------------------------------------------------------------------------------------------


def measure_reshard_to(k: int) -> MeasuredStep:
    """One rank's live tensor bytes in a steady FSDP2 step of the README's model, reshard_after_forward=k."""
    return measure_sharded_step(TABLE_CONFIG, TABLE_BATCH, TABLE_SEQ, "fsdp2", reshard_after_forward=k)


# ----------------------------------------------------------------------------------------------------
# On one GPU: step time and MFU, memory with and without CPU offload, a trace and a memory snapshot
# ----------------------------------------------------------------------------------------------------


def gpu_tour(config: LlamaConfig, batch: int, seq_len: int, out_dir: str) -> dict:
    """On this rank's GPU (a 1-rank NCCL group): FSDP2 with bf16 gathers and fp32 reductions, AdamW.

    For FSDP2 and FSDP2 with CPUOffloadPolicy: the peak of a steady step (max_memory_allocated), its time
    (common.bench) and MFU (the week-5 FLOP count over the time and the GPU's bf16 peak). For FSDP2 alone,
    a profiler trace of 3 steps and a memory snapshot of one, written to out_dir.
    """
    device = rank_device()
    tokens, targets = random_batch(config, batch, seq_len, device=device)
    flops = training_flops(config, batch * seq_len, seq_len)
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    out = Path(out_dir)
    report: dict = {"flops": flops}
    for name, offload in (("FSDP2", None), ("FSDP2, CPU offload", CPUOffloadPolicy(pin_memory=True))):
        torch.manual_seed(0)
        model = apply_fsdp(Llama(config).to(device), mp_policy=mp_policy, offload_policy=offload)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model: Llama = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            model.loss(tokens, targets).backward()
            optimizer.step()
            optimizer.zero_grad()

        step()  # the optimizer's states are created here
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        timed = bench(step, name=name, flops=flops, dtype=torch.bfloat16, cache="warm", device=device)
        report[name] = {"peak_bytes": peak, "step_ms": timed.median_ms, "mfu": timed.frac_peak_flops}
        if offload is None:
            trace = out / "fsdp2_trace.json"
            profile_steps(step, trace_path=trace)
            with memory_history():
                step()
                torch.cuda.synchronize(device)
                snapshot = memory_snapshot()
                dump_memory_snapshot(out / "fsdp2_snapshot.pickle")
            report["snapshot"] = str(summarize_snapshot(snapshot))
            report["fsdp ranges"] = sorted(
                {
                    e["name"]
                    for e in json.loads(trace.read_text())["traceEvents"]
                    if "FSDP::" in e.get("name", "")
                }
            )
        del model, optimizer, step
        torch.cuda.empty_cache()
    return report
