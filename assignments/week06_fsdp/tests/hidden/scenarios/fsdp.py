"""Runs in the submission's worker (the student's FSDP) and in the checker (FSDP2): one Llama trained on ranks
of the grader's hub, observed the same way on both sides, so that the checker can hold one to the other.

`train(ours, steps)` on every rank: the same seeded Llama, sharded by the student's `shard_model` (ours) or by
FSDP2 (`common.distributed.fsdp.apply_fsdp`, each block told to prefetch the next in forward as the
assignment asks), then `steps` SGD steps on the rank's slice of each batch. What comes back is raw data:

- "layout": per parameter after sharding, whether it is a DTensor, its placements, the mesh's ranks, its
  global shape and its local tensor;
- per step: the rank's loss, its local gradient shards, and the storage bytes of every whole parameter the
  scenario saw in a forward (captured by forward pre-hooks registered after sharding, which run after the
  sharding's own: the module's parameters are then the gathered ones), read after the forward and after the
  backward;
- the local parameter shards after the last step.

`profile_rank(ours, steps)` (the GPU task overlap_gpu): the same, on a larger bf16 model, under torch.profiler;
what comes back is the trace's GPU kernels, each with its CUDA stream, and the scenario's ranges.

Markers: the scenario calls `dist.barrier()` (trusted code) at the start of each step, inside the first
block's forward (a pre-hook on its attention: after that block was gathered, before it computes), after the
forward and after the backward. They split the hub's log of each step into phases.

Which of these can a submission forge? The collectives (the hub logs them, outside the ranks) and the values
the checker compares with FSDP2's (losses, gradients, parameters: a wrong FSDP gives wrong numbers) are
observed outside its reach. The layout and the storage bytes are read inside the rank, in the submission's
own interpreter: a submission could patch what they report. So could it the profiler's trace (see the
overlap task's test). Before the submission is imported each rank
refuses torch's FSDP (`torch.distributed.fsdp`, `torch.distributed._composable`) and the course's
`common.distributed.fsdp` and `zero`; that refusal is a message, not a guard (`common.grading.off_limits`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from common.grading.off_limits import refuse_imports
from common.grading.ranks import run_ranks
from common.models.llama import Llama, LlamaConfig, random_batch

PACKAGE = "myfsdp"
OFF_LIMITS = ("torch.distributed.fsdp", "torch.distributed._composable", "common.distributed.fsdp",
              "common.distributed.zero")  # fmt: skip
# vocab 66 and d_ff 40 do not divide by 4 ranks: those shards are padded.
CONFIG = {"vocab_size": 66, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 40,
          "max_seq_len": 16}  # fmt: skip
BATCH, SEQ, LR = 4, 8, 0.5
# The overlap task's model: a block's forward (2 * 16.8M parameters * 8192 tokens per rank = 2.7e11 FLOPs) does
# 16,000 FLOPs per byte of its gather (16.8M bf16 parameters, half of them from the other rank): more than any
# GPU's bf16 rate over its link bandwidth (an H100's 990 TFLOP/s over NVLink's 450 GB/s: 2,200), so a block
# computes longer than the next block's gather takes. A small vocabulary keeps the root's gather small.
OVERLAP_CONFIG = {"vocab_size": 512, "d_model": 1024, "n_layers": 4, "n_heads": 8, "n_kv_heads": 8,
                  "d_ff": 4096, "max_seq_len": 1024}  # fmt: skip
OVERLAP_BATCH, OVERLAP_SEQ = 16, 1024  # 8 sequences of 1024 tokens per rank on 2 ranks
PHASES = ("forward", "backward")  # the profiled steps' record_function ranges: "forward#0", "backward#0", ...


def initial_model(config: dict = CONFIG) -> Llama:
    """The model every rank starts from (and the checker rebuilds to know the whole initial parameters)."""
    torch.manual_seed(0)
    return Llama(LlamaConfig(**config))


def _device(device: str) -> torch.device:
    """This rank's device of the kind `device` ("cpu", or "cuda": the GPU the rank was given)."""
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)


def _sharded(ours: bool, device: str, config: dict = CONFIG) -> Llama:
    from torch.distributed.device_mesh import init_device_mesh

    model = initial_model(config)
    if device == "cuda":  # bf16 on the GPU: the dtype FSDP is used with there
        model = model.to(device=_device(device), dtype=torch.bfloat16)
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    if ours:
        refuse_imports(OFF_LIMITS, "write the gathering and the reduce-scattering yourself")
        from myfsdp.fsdp import shard_model

        shard_model(model, mesh)
    else:
        from common.distributed.fsdp import apply_fsdp

        apply_fsdp(model, mesh)
        for block, following in zip(model.layers, model.layers[1:], strict=False):
            block.set_modules_to_forward_prefetch([following])
    return model


def _layout(model: Llama) -> dict:
    from torch.distributed.tensor import DTensor

    layout = {}
    for name, param in model.named_parameters():
        if isinstance(param, DTensor):
            layout[name] = {"dtensor": True, "placements": [str(p) for p in param.placements],
                            "mesh": param.device_mesh.mesh.flatten().tolist(), "shape": list(param.shape),
                            "local": _local(param)}  # fmt: skip
        else:
            layout[name] = {"dtensor": False, "placements": [], "mesh": [], "shape": list(param.shape),
                            "local": _local(param)}  # fmt: skip
    return layout


def _local(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None:
        return None
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).detach().cpu().clone()


def _watch_gathered(model: Llama, seen: dict[str, torch.Tensor]) -> None:
    """Forward pre-hooks that keep, per step, every whole parameter the forward computes with, by name."""

    def capture(prefix: str, module: torch.nn.Module, names: list[str]) -> None:
        for name in names:
            seen.setdefault(prefix + name, module.get_parameter(name))

    for i, block in enumerate(model.layers):
        names = [n for n, _ in block.named_parameters()]
        block.register_forward_pre_hook(
            lambda module, args, i=i, names=names: capture(f"layers.{i}.", module, names)
        )
    root = [n for n, _ in model.named_parameters() if not n.startswith("layers.")]
    model.norm.register_forward_pre_hook(lambda module, args: capture("", model, root))  # after the blocks


def _step_marker_in_first_block(model: Llama) -> None:
    model.layers[0].attention.register_forward_pre_hook(lambda module, args: dist.barrier())


def train_rank(ours: bool, steps: int, device: str = "cpu") -> dict:
    """One rank: shard (ours or FSDP2), then `steps` SGD steps; the observations of the module docstring."""
    model = _sharded(ours, device)
    layout = _layout(model)
    gathered: dict[str, torch.Tensor] = {}
    _watch_gathered(model, gathered)
    _step_marker_in_first_block(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    world, rank = dist.get_world_size(), dist.get_rank()
    record = []
    for step in range(steps):
        batch = random_batch(LlamaConfig(**CONFIG), BATCH, SEQ, seed=step)
        tokens, targets = (t.chunk(world)[rank].to(_device(device)) for t in batch)
        gathered.clear()
        dist.barrier()  # marker: the step starts
        loss = model.loss(tokens, targets)
        dist.barrier()  # marker: forward done
        after_forward = {name: t.untyped_storage().nbytes() for name, t in gathered.items()}
        loss.backward()
        dist.barrier()  # marker: backward done
        record.append({
            "loss": loss.detach().float().cpu(),
            "grads": {name: _local(p.grad) for name, p in model.named_parameters()},
            "bytes_after_forward": after_forward,
            "bytes_after_backward": {name: t.untyped_storage().nbytes() for name, t in gathered.items()},
            "whole": {name: [type(t) in (torch.Tensor, torch.nn.Parameter), list(t.shape)]
                      for name, t in gathered.items()},
        })  # fmt: skip
        optimizer.step()
        optimizer.zero_grad()
    return {"layout": layout, "steps": record,
            "parameters": {name: _local(p) for name, p in model.named_parameters()}}  # fmt: skip


def train(ours: bool, ranks: int, steps: int) -> dict:
    """`steps` training steps on `ranks` ranks of the hub, with the student's FSDP (ours) or FSDP2."""
    return run_ranks(train_rank, [(ours, steps)] * ranks, package=PACKAGE, timeout_s=120)


def train_on_gpus(steps: int) -> dict:
    """The student's FSDP on 2 GPUs over NCCL, the model in bf16 (spawned ranks: the worker has initialised
    CUDA). Nothing is counted on NCCL: the values are what the GPU task compares."""
    return run_ranks(train_rank, [(True, steps, "cuda")] * 2, package=PACKAGE, backend="nccl", timeout_s=300)


def profile_rank(ours: bool, steps: int) -> dict:
    """One rank on its GPU: the bf16 OVERLAP_CONFIG model sharded (ours or FSDP2), trained for 2 steps unrecorded
    and `steps` recorded by torch.profiler, which this scenario starts and stops itself around its own calls
    into the model. Each recorded step's forward and backward is a record_function range ("forward#k",
    "backward#k") ended by torch.cuda.synchronize(), so that every kernel it launched ends inside it.
    Returns the trace's kernels (with their streams) and those ranges, as the profiler exported them."""
    import json
    import tempfile
    from pathlib import Path

    from torch.profiler import record_function

    from common.profiling import profile_steps

    model = _sharded(ours, "cuda", OVERLAP_CONFIG)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    world, rank = dist.get_world_size(), dist.get_rank()
    batch = random_batch(LlamaConfig(**OVERLAP_CONFIG), OVERLAP_BATCH, OVERLAP_SEQ, seed=0)
    tokens, targets = (t.chunk(world)[rank].to(_device("cuda")) for t in batch)
    recorded = iter(range(-2, steps))  # the profiler's wait and warm-up steps are -2 and -1

    def step() -> None:
        k = next(recorded)
        with record_function(f"forward#{k}"):
            loss = model.loss(tokens, targets)
            torch.cuda.synchronize()
        with record_function(f"backward#{k}"):
            loss.backward()
            torch.cuda.synchronize()
        optimizer.step()
        optimizer.zero_grad()

    with tempfile.TemporaryDirectory() as folder:  # the rank's own /tmp in the sandbox
        path = Path(folder) / "trace.json"
        profile_steps(step, wait=1, warmup=1, active=steps, trace_path=path, cuda=True)
        events = json.loads(path.read_text())["traceEvents"]
    kept = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "user_annotation")]
    return {"traceEvents": [{key: e[key] for key in ("ph", "cat", "name", "ts", "dur", "args") if key in e}
                            for e in kept]}  # fmt: skip


def profile_on_gpus(steps: int) -> dict:
    """The student's FSDP on 2 GPUs over NCCL under the profiler (`profile_rank`; spawned ranks)."""
    return run_ranks(profile_rank, [(True, steps)] * 2, package=PACKAGE, backend="nccl", timeout_s=300)


def _shard_something_else() -> None:
    from myfsdp.fsdp import shard_model
    from torch.distributed.device_mesh import init_device_mesh

    shard_model(torch.nn.Linear(4, 4), init_device_mesh("cpu", (dist.get_world_size(),)))


def shard_something_else(ranks: int) -> dict:
    """shard_model given an nn.Linear instead of a Llama, on every rank."""
    return run_ranks(_shard_something_else, [()] * ranks, package=PACKAGE)
