"""One FSDP unit: the parameters that are gathered, freed and reduce-scattered together.

A unit is a module and the parameters it owns (for a transformer block, all of its own; for the root, those
no block took: embeddings, final norm, output layer). Each parameter exists twice:

- sharded: the nn.Parameter registered in its module between uses, a DTensor `Shard(0)` holding this rank's
  block of rows (`myfsdp.sharding`). The optimizer sees these: it updates 1/p of the model on every rank.
- unsharded: a plain nn.Parameter of the whole shape, created once, whose storage exists only while the unit
  is gathered. `unshard` fills it and puts it in the module in place of the sharded one; `reshard` gives its
  storage back (`untyped_storage().resize_(0)`: the tensor object stays, so autograd's saved references to it
  stay valid and see the data again when the unit is gathered for backward) and puts the sharded one back.

Communication is one collective per unit and direction, as FSDP2's: `unshard` packs every parameter's block,
padded to `block_rows` rows, into one flat tensor and makes one `all_gather_into_tensor`. `unshard(async_op=True)`
only starts that all-gather (`async_op=True` returns a Work) and leaves it in flight: on a GPU, NCCL runs it on
its own stream while the caller's stream computes, and the next `unshard()` waits for it (`work.wait()` makes the
caller's stream wait, not the host) and fills the parameters. `reduce_gradients`
packs every whole gradient, padded likewise, into one flat tensor, rank r's part r-th, and makes one
`reduce_scatter_tensor`, after which rank r holds the sum of its rows over the ranks.

Write into a whole parameter through `.data` (or under `torch.autograd._unsafe_preserve_version_counter`):
an in-place write to the parameter itself bumps its version counter and autograd refuses to use it in backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from myfsdp.sharding import block_rows, shard_parameter

__all__ = ["FSDPUnit"]


class FSDPUnit:
    """The parameters `names` of `module` (dotted names relative to it), sharded over the 1-D `mesh`.

    After construction each of them is registered in its module as its sharded DTensor parameter
    (`shard_parameter`), and the unit is not gathered. `sharded` and `unsharded` list the two forms of each
    parameter in the order of `names`.
    """

    def __init__(self, module: nn.Module, names: list[str], mesh: DeviceMesh) -> None:
        if not names:
            raise ValueError(f"an FSDP unit needs parameters; {type(module).__name__} was given none")
        self.module, self.names, self.mesh = module, list(names), mesh
        self.group = mesh.get_group()
        self.world, self.rank = mesh.size(), mesh.get_local_rank()
        self.owners = [_owner(module, name) for name in names]  # (submodule, attribute) of each parameter
        self.sharded: list[nn.Parameter] = []
        self.unsharded: list[nn.Parameter] = []
        for owner, attribute in self.owners:
            whole = getattr(owner, attribute)
            self.sharded.append(shard_parameter(whole, mesh))
            unsharded = nn.Parameter(torch.empty_like(whole.detach()), requires_grad=whole.requires_grad)
            unsharded.untyped_storage().resize_(0)  # no storage until the first unshard
            self.unsharded.append(unsharded)
            setattr(owner, attribute, self.sharded[-1])
        self.gathered = False
        self.in_flight: tuple[dist.Work, torch.Tensor, list[torch.Tensor]] | None = None  # see unshard

    @torch.no_grad()  # the shards require grad; gathering them is not part of the model's graph
    def unshard(self, async_op: bool = False) -> None:
        """Gather every parameter of the unit whole and register the whole ones in their modules.

        Nothing if the unit is gathered already (a prefetch got there first). Else exactly one
        `all_gather_into_tensor` on the mesh's group, of every parameter's local block padded to `block_rows`
        rows, packed into one flat tensor, started with `async_op=True` unless one is in flight already; the
        storage of each unsharded parameter is allocated again (`untyped_storage().resize_`), filled with its
        rows (padding dropped), and the parameter registered.

        async_op: only start the all-gather and return; keep what it returned (its Work) in `self.in_flight`.
        The next unshard() waits for that Work (`work.wait()`) before it fills the parameters: a prefetch.
        """
        # BEGIN SOLUTION: FSDPUnit.unshard: pack the padded blocks, one all_gather_into_tensor (async), wait, unpack into the whole parameters
        if self.gathered:
            return
        if self.in_flight is None:
            blocks = [_padded_block(p.to_local(), block_rows(p.shape[0], self.world)) for p in self.sharded]
            flat = torch.cat([b.reshape(-1) for b in blocks])
            gathered = torch.empty(self.world * flat.numel(), dtype=flat.dtype, device=flat.device)
            work = dist.all_gather_into_tensor(gathered, flat, group=self.group, async_op=True)
            self.in_flight = (work, gathered, blocks)
        if async_op:
            return
        work, gathered, blocks = self.in_flight
        self.in_flight = None
        work.wait()  # on a GPU: the caller's stream waits for NCCL's; the host goes on
        per_rank = gathered.view(self.world, -1)  # row r: rank r's packed blocks
        offset = 0
        for block, whole, (owner, attribute) in zip(blocks, self.unsharded, self.owners, strict=True):
            pieces = per_rank[:, offset : offset + block.numel()].reshape(
                self.world * block.shape[0], *block.shape[1:]
            )
            offset += block.numel()
            whole.untyped_storage().resize_(whole.numel() * whole.element_size())
            whole.data.copy_(pieces[: whole.shape[0]])  # .data: autograd's version counter is not bumped
            setattr(owner, attribute, whole)
        self.gathered = True
        # END SOLUTION

    def reshard(self) -> None:
        """Free the storage of every unsharded parameter (resize it to 0 bytes) and register the sharded
        parameters in their modules again. Nothing if the unit is not gathered."""
        # BEGIN SOLUTION: FSDPUnit.reshard: resize each whole parameter's storage to 0, register the shards again
        if not self.gathered:
            return
        for whole, sharded, (owner, attribute) in zip(self.unsharded, self.sharded, self.owners, strict=True):
            whole.untyped_storage().resize_(0)
            setattr(owner, attribute, sharded)
        self.gathered = False
        # END SOLUTION

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Average the unit's whole gradients over the ranks and keep this rank's rows as the sharded
        parameters' gradients (DTensors `Shard(0)`, accumulated into a gradient already there).

        Exactly one `reduce_scatter_tensor` on the mesh's group, of every whole gradient padded to
        p * `block_rows` rows, rank r's rows of all parameters packed r-th; the average is the sum divided by
        the number of ranks (as DDP and FSDP2 average). The whole gradients are dropped afterwards
        (`grad = None`). A parameter whose whole gradient is None gets none.
        """
        # BEGIN SOLUTION: FSDPUnit.reduce_gradients: pack padded gradients by destination rank, one reduce_scatter_tensor, divide by p
        from torch.distributed.tensor import DTensor, Shard

        present = [i for i, whole in enumerate(self.unsharded) if whole.grad is not None]
        if not present:
            return
        parts = []
        for i in present:
            grad, rows = self.unsharded[i].grad, block_rows(self.unsharded[i].shape[0], self.world)
            parts.append(_padded_block(grad, self.world * rows).reshape(self.world, -1))
        packed = torch.cat(parts, dim=1) / self.world  # row r: what rank r keeps, of every parameter
        mine = torch.empty(packed.shape[1], dtype=packed.dtype, device=packed.device)
        dist.reduce_scatter_tensor(mine, packed.reshape(-1), op=dist.ReduceOp.SUM, group=self.group)
        offset = 0
        for i, part in zip(present, parts, strict=True):
            sharded, whole = self.sharded[i], self.unsharded[i]
            local_shape = sharded.to_local().shape
            rows = block_rows(whole.shape[0], self.world)
            block = mine[offset : offset + part.shape[1]].view(rows, *whole.shape[1:])[: local_shape[0]]
            offset += part.shape[1]
            grad = DTensor.from_local(
                block.clone(), self.mesh, [Shard(0)], shape=whole.shape, stride=whole.stride()
            )
            sharded.grad = grad if sharded.grad is None else sharded.grad + grad
            whole.grad = None
        # END SOLUTION


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The submodule holding the parameter `name` (dotted, relative to module) and its attribute name."""
    path, _, attribute = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attribute


def _padded_block(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with zero rows appended up to `rows` rows (itself if it has that many)."""
    missing = rows - tensor.shape[0]
    if missing == 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(missing, *tensor.shape[1:])])
