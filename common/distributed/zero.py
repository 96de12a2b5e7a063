"""ZeRO stages 1 and 2 from scratch: data parallelism that stops keeping p copies of the optimizer.

    optimizer = ZeroOptimizer(model.parameters(), torch.optim.AdamW, stage=2, lr=3e-4)
    for tokens, targets in shard_of_the_data:       # each rank: its own slice of the global batch
        model.loss(tokens, targets).backward()      # stage 2: each gradient reduce-scattered as it is ready
        optimizer.step()                            # step this rank's shard, all-gather the parameters
        optimizer.zero_grad()

DDP (week 4) keeps on every rank the whole model, its whole gradient and the whole optimizer state: with
AdamW in fp32 that is 4 + 4 + 8 = 16 bytes per parameter, p times over. Yet the optimizer's update is
elementwise, so no rank needs more than a 1/p slice of it (Rajbhandari et al., 2020, "ZeRO"). What you
will learn:

- Sharding. Every parameter is flattened, padded with zeros to a multiple of p, and cut into p equal
  shards; rank r owns shard r of every parameter. A shard is a tensor of its own (a copy of the
  parameter's slice), and the inner optimizer, any elementwise `torch.optim` optimizer, is built over these
  shards with the same param groups: its states (AdamW's exp_avg and exp_avg_sq, SGD's momentum) exist only
  for the shards, 1/p of the model on each rank. The padding stays zero: a zero parameter with a zero
  gradient keeps its zero states, and the padding is dropped when the shards are gathered back.
- Stage 1 (optimizer states sharded). The backward is a plain local one: every rank has the whole gradient
  of its own micro-batch. In step(), each gradient is reduce-scattered (summed over the ranks, each rank
  receiving its shard of the sum), the inner optimizer updates the shards, and each parameter is
  all-gathered from the p updated shards. Reduce-scatter + all-gather move exactly the bytes of DDP's
  all-reduce (which is one of each, week 4), so stage 1 costs no extra communication.
- Stage 2 (gradients sharded too). The reduce-scatter moves into the backward: a hook on each parameter
  fires once its gradient is accumulated, reduce-scatters it, keeps this rank's shard and frees the full
  gradient at once (param.grad = None). The whole-model gradient never exists: 1/p of it, plus one
  parameter's gradient at a time.
- Averaging as DDP does it: each gradient is multiplied by 1/p, then summed (week 4's ddp.py says why
  pre-multiplying), so the update equals one process's on the whole batch, up to the order of the float
  additions.

What is freed when, on each rank (B = bytes per element, N = parameters, p = ranks):

| | parameters | gradients | optimizer states | shards (the optimizer's copy) |
| --- | --- | --- | --- | --- |
| DDP | N B, always | N B, backward to zero_grad | whole | none |
| stage 1 | N B, always | N B, backward to zero_grad; shard's N/p B from step to zero_grad | 1/p | N/p B, always |
| stage 2 | N B, always | one parameter's at a time in backward; shard's N/p B from backward to zero_grad | 1/p | N/p B, always |

Stage 3 shards the parameters as well, gathering each block's just before it runs: that is FSDP, which
fsdp.py applies with PyTorch's own `fully_shard`. common.memory.sharded predicts each stage's peak.

What this version leaves out, and the real ones (DeepSpeed, torch's ZeroRedundancyOptimizer) do: buckets
that batch many small parameters into one collective and overlap it with the backward (here: one
reduce-scatter per parameter, waited for at once, and one all-gather per parameter in step()); mixed
precision (an fp32 shard as master copy of bf16 parameters, the natural next step since the shard is a copy
already); gradient clipping, which needs the norm over all shards (one more all-reduce). Optimizers that
look at a whole tensor, not at each element (LBFGS, Adafactor's row and column statistics, LAMB's trust
ratio), would compute something else on a flat shard, and are refused where torch ships them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from common.errors import EffdlError

__all__ = ["ZeroOptimizer", "shard_numel"]

# torch.optim optimizers whose update is not elementwise, so a shard would not get the same update.
NOT_ELEMENTWISE = ("LBFGS", "Adafactor")


def shard_numel(numel: int, world_size: int) -> int:
    """Elements of one rank's shard of a tensor of `numel` elements: ceil(numel / p), zero-padded."""
    return math.ceil(numel / world_size)


@dataclass
class _Shard:
    """One parameter and this rank's shard of it."""

    param: nn.Parameter  # the model's parameter: whole, the same on every rank
    shard: torch.Tensor  # this rank's ceil(n / p) elements of it, flat: what the inner optimizer updates
    padded_numel: int  # p ceil(n / p): the parameter flattened and zero-padded, as the collectives see it


class ZeroOptimizer:
    """ZeRO stage 1 or 2 around any elementwise torch.optim optimizer (see the module docstring).

    params: parameters, or param groups (dicts with "params" and their own options), as torch.optim takes
    them. optimizer_class: the inner optimizer, built over this rank's shards with the same groups and
    `defaults`. stage: 1 (optimizer states sharded) or 2 (gradients as well). Rank 0's parameter values are
    broadcast to all ranks, as DDP does. Every rank must construct it with the same parameters in the same
    order, and run the same backward: each collective is matched by order across the ranks.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
        optimizer_class: type[torch.optim.Optimizer],
        *,
        stage: int = 1,
        group: dist.ProcessGroup | None = None,
        **defaults: Any,
    ) -> None:
        if stage not in (1, 2):
            raise ValueError(
                f"stage={stage!r}: ZeroOptimizer implements stage 1 (optimizer states sharded) and stage 2 "
                "(gradients too); for stage 3 (parameters too) use common.distributed.fsdp.apply_fsdp"
            )
        if optimizer_class.__name__ in NOT_ELEMENTWISE:
            raise ValueError(
                f"{optimizer_class.__name__} does not update each element on its own, so stepping a flat "
                "shard would compute something else; use an elementwise optimizer (SGD, Adam, AdamW, ...)"
            )
        groups = _param_groups(params)
        self.stage, self.group = stage, group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.shards: list[_Shard] = []
        inner_groups = []
        for param_group in groups:
            shards = [self._make_shard(param) for param in param_group["params"]]
            self.shards += shards
            inner_groups.append({**param_group, "params": [s.shard for s in shards]})
        self.optimizer = optimizer_class(inner_groups, **defaults)
        self._hooks = (
            [
                s.param.register_post_accumulate_grad_hook(self._reduce_scatter_hook(s))
                for s in self.shards
                if s.param.requires_grad  # a frozen parameter never gets a gradient, nor a hook
            ]
            if stage == 2
            else []
        )

    def _make_shard(self, param: nn.Parameter) -> _Shard:
        """Broadcast rank 0's values into param; return this rank's zero-padded slice of it, as a new leaf."""
        with torch.no_grad():
            dist.broadcast(param, group=self.group, group_src=0)
            size = shard_numel(param.numel(), self.world_size)
            padded = torch.zeros(size * self.world_size, dtype=param.dtype, device=param.device)
            padded[: param.numel()] = param.reshape(-1)
            shard = padded[self.rank * size : (self.rank + 1) * size].clone()  # only 1/p stays alive
        return _Shard(param, shard.requires_grad_(param.requires_grad), size * self.world_size)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner optimizer's groups (lr and the rest can be changed here; "params" are the shards)."""
        return self.optimizer.param_groups

    def _reduce_scatter(self, entry: _Shard, grad: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the average over the ranks of grad (each rank passes its own)."""
        padded = grad.new_zeros(entry.padded_numel)  # the padding must add zeros
        torch.mul(grad.reshape(-1), 1.0 / self.world_size, out=padded[: grad.numel()])  # average like DDP
        shard = grad.new_empty(entry.shard.numel())
        dist.reduce_scatter_tensor(shard, padded, group=self.group)
        return shard

    def _accumulate_shard_grad(self, entry: _Shard, grad: torch.Tensor) -> None:
        shard_grad = self._reduce_scatter(entry, grad)
        if entry.shard.grad is None:
            entry.shard.grad = shard_grad
        else:  # gradient accumulation over several backwards before a step
            entry.shard.grad += shard_grad

    def _reduce_scatter_hook(self, entry: _Shard):
        """Stage 2: once param.grad is final for this backward, keep this rank's shard and free the rest."""

        def hook(param: nn.Parameter) -> None:
            self._accumulate_shard_grad(entry, param.grad)
            param.grad = None  # the full gradient is freed here, not at zero_grad()

        return hook

    @torch.no_grad()
    def step(self) -> None:
        """Average the gradients into the shards (stage 1), update the shards, all-gather the parameters."""
        if self.stage == 1:
            for entry in self.shards:
                if (
                    entry.param.grad is not None
                ):  # a parameter without gradient is skipped, as torch.optim does
                    entry.shard.grad = self._reduce_scatter(entry, entry.param.grad)
        self.optimizer.step()
        for entry in self.shards:
            gathered = entry.shard.new_empty(entry.padded_numel)
            dist.all_gather_into_tensor(gathered, entry.shard, group=self.group)
            entry.param.copy_(gathered[: entry.param.numel()].view_as(entry.param))  # the padding dropped

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients: the shards' and (stage 1) the parameters'."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for entry in self.shards:
            if set_to_none:
                entry.param.grad = None
            elif entry.param.grad is not None:
                entry.param.grad.zero_()

    def state_bytes(self) -> int:
        """Bytes of the inner optimizer's tensor states on this rank (0-dim step counters left out)."""
        return sum(
            t.numel() * t.element_size()
            for state in self.optimizer.state.values()
            for t in state.values()
            if isinstance(t, torch.Tensor) and t.dim() > 0
        )

    def remove(self) -> None:
        """Take stage 2's hooks off the parameters: they refer to this optimizer, and so to the parameters,
        through autograd's C++ side, which Python's garbage collector cannot see; unhooked, both can be freed."""
        for hook in self._hooks:
            hook.remove()


def _param_groups(params: Iterable[nn.Parameter] | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """params as torch.optim accepts them, as a list of groups; checks what sharding needs."""
    params = list(params)
    if not params:
        raise ValueError("ZeroOptimizer got an empty parameter list")
    groups = [dict(g) for g in params] if isinstance(params[0], dict) else [{"params": params}]
    seen: set[int] = set()
    for index, param_group in enumerate(groups):
        param_group["params"] = list(param_group["params"])
        for param in param_group["params"]:
            if not isinstance(param, torch.Tensor) or not param.is_leaf:
                raise TypeError(
                    f"param group {index} holds a {type(param).__name__} that is not a leaf tensor; pass "
                    "the model's parameters (model.parameters())"
                )
            if id(param) in seen:
                raise ValueError(
                    f"a parameter of shape {tuple(param.shape)} appears twice (param group {index}); "
                    "list each parameter once (model.parameters() lists a tied weight once)"
                )
            seen.add(id(param))
    devices = {p.device for g in groups for p in g["params"]}
    if len(devices) > 1:
        raise EffdlError(
            f"ZeroOptimizer shards parameters on one device, but they are on {sorted(map(str, devices))}; "
            "move the model to this rank's device (rank_device()) first"
        )
    return groups
