"""FSDP2 (ZeRO stage 3) with PyTorch's own `fully_shard`, applied to the week-5 Llama, and a training loop.

    model = apply_fsdp(Llama(config))           # every rank: each block, then the root, sharded over the ranks
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)   # over the shards: its states are 1/p too
    losses = train_steps(model, optimizer, batches)              # each rank trains on its slice of each batch

zero.py shards the optimizer states (stage 1) and the gradients (stage 2); stage 3 shards the parameters
themselves, so a rank holds 1/p of everything between steps. `fully_shard` (torch.distributed.fsdp, the
FSDP2 API) turns each parameter into a DTensor sharded on dim 0 (padded to a multiple of p) and adds hooks
to the module: before its forward, all-gather its parameters into whole tensors; after its forward, free
them again (reshard_after_forward=True: they are gathered once more for the backward) or keep them until
the backward (False: less communication, more memory); after its backward, reduce-scatter the gradients
so each rank keeps the shard of the average it owns. What is gathered together is one `fully_shard` call's
parameters, so the unit of memory and communication is chosen by where you call it: here one unit per
transformer block, and the root (embeddings, final norm, output layer) as the last unit. apply_fsdp passes
reshard_after_forward to the root as well, so with True the root too is freed after the forward and
gathered again at the start of the backward (the week-6 seminar's log of collectives shows it);
fully_shard's own default, None, would keep the root gathered, since its backward follows at once.

The hooks run on `forward`; the Llama's training entry point is `loss`, which does not go through
`forward`, so `register_fsdp_forward_method` gives `loss` the root's hooks too (without it the embedding
would meet a sharded DTensor weight).

`train_steps` is the loop that the week-6 tests (and the assignment's grader) hold every scheme to: the
same global batches, each rank computing on its 1/p slice, against one process on the whole batch.

Checkpoints: `save_checkpoint` writes the model's and the optimizer's state with torch.distributed.checkpoint
(DCP): each rank writes its own shards, with metadata that says where each piece sits in the whole tensor, so
`load_checkpoint` can read them back on another number of ranks (each rank reads the pieces its new shards
cover). get_state_dict and set_state_dict translate between the optimizer's per-parameter state and names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

from common.distributed.launch import rank_device
from common.errors import EffdlError
from common.models.llama import Llama

__all__ = [
    "apply_fsdp",
    "full_parameters",
    "load_checkpoint",
    "local_slice",
    "save_checkpoint",
    "train_steps",
]

Batch = tuple[torch.Tensor, torch.Tensor]  # (tokens, targets), each (batch, seq) long


def apply_fsdp(
    model: Llama,
    mesh: DeviceMesh | None = None,
    *,
    reshard_after_forward: bool | int = True,
    mp_policy: MixedPrecisionPolicy | None = None,
    offload_policy: OffloadPolicy | None = None,
) -> Llama:
    """Shard model over the mesh (default: all ranks) with fully_shard: each block, then the root.

    Blocks first: fully_shard on the root then takes only the parameters no block took (embeddings, final
    norm, output). Call it on every rank with the same model (the same seed): each keeps its shards.
    reshard_after_forward, mp_policy and offload_policy go to every fully_shard call as they are (an int
    reshard_after_forward keeps a 1/k shard between forward and backward: a divisor k of the shard mesh's
    size); None leaves fully_shard's default (fp32 throughout; no offload). A 2-D mesh
    (replicate, shard) gives HSDP.
    """
    if not isinstance(model, Llama):
        raise EffdlError(
            f"apply_fsdp wraps a common.models.llama.Llama (one unit per block in model.layers), got "
            f"{type(model).__name__}; call fully_shard on your own model's blocks and root instead"
        )
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise EffdlError("the model is sharded already; apply_fsdp once, to a fresh model")
    mesh = mesh or init_device_mesh(rank_device().type, (dist.get_world_size(),))
    options = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    options |= {"mp_policy": mp_policy} if mp_policy is not None else {}
    options |= {"offload_policy": offload_policy} if offload_policy is not None else {}
    for block in model.layers:
        fully_shard(block, **options)
    fully_shard(model, **options)
    register_fsdp_forward_method(model, "loss")
    return model


def local_slice(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's equal share of a global batch, along dim 0 (the batch must divide by the world size)."""
    world = dist.get_world_size()
    if tensor.shape[0] % world:
        raise ValueError(
            f"a global batch of {tensor.shape[0]} sequences does not split over {world} ranks; make it a "
            f"multiple of {world}, so that every rank's loss is a mean over as many tokens"
        )
    return tensor.chunk(world)[dist.get_rank()]


def train_steps(
    model: nn.Module, optimizer, batches: Sequence[Batch], *, data_parallel: bool = True
) -> list[float]:
    """Train one step per global batch; return each step's loss on the whole global batch.

    data_parallel: each rank computes on its slice of the batch (local_slice) and the loss reported is the
    mean of the ranks' losses, which is the whole batch's mean since the slices are equal. False: the one
    process computes on the whole batch (the reference). optimizer is anything with step() and
    zero_grad(): a torch.optim optimizer (DDP, FSDP2) or a ZeroOptimizer; the model's gradients are
    averaged by whatever was applied to it.
    """
    losses = []
    for tokens, targets in batches:
        if data_parallel:
            tokens, targets = local_slice(tokens), local_slice(targets)
        loss = model.loss(tokens, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach()
        if data_parallel:
            dist.all_reduce(loss)  # sum of the ranks' means; divided below (gloo has no AVG)
            loss /= dist.get_world_size()
        losses.append(loss.item())
    return losses


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole, by name, on the CPU: sharded DTensors gathered (a collective: call on every rank)."""
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
        for name, p in model.named_parameters()
    }


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Write model and optimizer state to the folder `path` with DCP: every rank its own shards (collective)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(path))


def load_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Read what save_checkpoint wrote into model and optimizer, sharded as they are now, on any world size.

    DCP loads in place, into tensors of the shapes this rank holds now; get_state_dict creates a fresh
    optimizer's states for that, so model and optimizer may be new.
    """
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
