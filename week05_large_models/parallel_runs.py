"""What the seminar's ranks run in sections 4 and 6: one step of each parallel scheme, on every rank.

The seminar starts its ranks with `launch(..., start_method="spawn")`, fresh interpreters that import these
functions by name, so they live in this file rather than in a notebook cell. Forking the ranks from the
notebook fails on a GPU machine once the notebook has run a backward pass: autograd then keeps a worker
thread per GPU, and a forked copy of a process with threads cannot run autograd.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from common.distributed.ddp import apply_ddp
from common.distributed.pipeline import SCHEDULES, pipeline_step, split_into_stages
from common.distributed.tensor_parallel import (
    apply_tensor_parallel,
    apply_tensor_parallel_dtensor,
    apply_ulysses,
    full_gradients,
    shard_sequence,
)
from common.distributed.tensor_parallel import count_collectives as counting_collectives
from common.distributed.tensor_parallel import gather_shards as gather
from common.models.llama import Llama, LlamaConfig, random_batch

PCONFIG = LlamaConfig(
    vocab_size=128, d_model=64, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=128, max_seq_len=64
)
PBATCH, PSEQ = 4, 32  # heads, kv heads, d_ff and the sequence divide by 4 ranks; 4 layers for 4 stages
MICRO = 8  # micro-batches of the pipeline schedules, one sequence each
VARIANTS = ("tp", "tp_sp", "dtensor", "dtensor_sp", "ulysses")


def fresh_model() -> Llama:
    torch.manual_seed(0)
    return Llama(PCONFIG)


def parallel_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return random_batch(PCONFIG, PBATCH, PSEQ, seed=1)


def parallel_step(variant: str) -> dict:
    """On every rank: one forward and backward of the parallelized model; loss, full gradients, collectives."""
    model, (tokens, targets) = fresh_model(), parallel_batch()
    if variant in ("tp", "tp_sp"):
        apply_tensor_parallel(model, sequence_parallel=variant == "tp_sp")
    elif variant in ("dtensor", "dtensor_sp"):
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        apply_tensor_parallel_dtensor(model, mesh, sequence_parallel=variant == "dtensor_sp")
    elif variant == "ulysses":
        apply_ulysses(model)
        apply_ddp(model)  # each rank's gradients come from its slice of the sequence: average them
        tokens, targets = shard_sequence(tokens), shard_sequence(targets)
    with counting_collectives() as counts:
        loss = model.loss(tokens, targets)
        loss.backward()
    if variant == "ulysses":  # each rank's loss is the mean over its positions: the mean of the means
        loss = gather(loss.detach()[None], dim=0).mean()
    block_weights = sum(
        p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.layers.parameters()
    )
    return {
        "loss": loss.item(),
        "grads": full_gradients(model),
        "counts": counts,
        "block_weights": block_weights,
    }


def all_variants() -> dict[str, dict]:
    return {variant: parallel_step(variant) for variant in VARIANTS}


def pipelined(name: str) -> dict:
    """One pipelined step on this rank: its stage's gradients by the model's names, loss, spans, peak."""
    stage = split_into_stages(fresh_model(), dist.get_world_size(), dist.get_rank())
    actions = SCHEDULES[name](dist.get_world_size(), MICRO, dist.get_rank())
    tokens, targets = random_batch(PCONFIG, MICRO, PSEQ, seed=1)  # one sequence per micro-batch
    result = pipeline_step(stage, actions, tokens, targets)
    grads = {n: p.grad for n, p in stage.named_parameters()}
    return {"grads": grads, "loss": result.loss, "spans": result.spans, "in_flight": result.peak_in_flight}


def both_schedules() -> dict[str, dict]:
    return {name: pipelined(name) for name in SCHEDULES}
