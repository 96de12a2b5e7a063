"""A parameter sharded on dim 0 over a DeviceMesh: this rank's block of rows, as a DTensor.

FSDP2 cuts every parameter the way `torch.chunk` does: with p ranks, a tensor of n rows becomes blocks of
ceil(n / p) rows, rank r holding rows r * ceil(n / p) ... (r + 1) * ceil(n / p) - 1 (the last blocks may be
shorter, or empty when n < p). That is exactly DTensor's `Shard(0)` placement, so the shard can say what it
is: `DTensor.from_local(block, mesh, [Shard(0)], shape=whole.shape, stride=whole.stride())`. An all-gather
needs blocks of one size, so a collective pads each block to ceil(n / p) rows and drops the padding after.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

__all__ = ["block_rows", "shard_parameter"]


def block_rows(rows: int, world: int) -> int:
    """Rows in each rank's block of a tensor of `rows` rows over `world` ranks (the last ones may hold fewer)."""
    return -(-rows // world)


def shard_parameter(param: torch.Tensor, mesh: DeviceMesh) -> nn.Parameter:
    """This rank's block of rows of `param` (see the module docstring) as an nn.Parameter holding a DTensor
    placed `Shard(0)` on the 1-D `mesh`, whose global shape and stride are param's.

    The block is a copy (the whole tensor may be freed afterwards); requires_grad as param's.
    Raise ValueError if the mesh is not 1-D or param is a 0-d tensor (nothing to cut).
    """
    # BEGIN SOLUTION: shard_parameter: cut dim 0 into blocks of block_rows rows, keep this rank's as a DTensor
    from torch.distributed.tensor import DTensor, Shard

    if mesh.ndim != 1:
        raise ValueError(f"shard over a 1-D mesh; this one has {mesh.ndim} dimensions {tuple(mesh.shape)}")
    if param.dim() == 0:
        raise ValueError("a 0-d parameter has no rows to shard; keep scalars out of the sharded units")
    rows = block_rows(param.shape[0], mesh.size())
    rank = mesh.get_local_rank()
    block = param.detach()[rank * rows : (rank + 1) * rows].clone()
    sharded = DTensor.from_local(block, mesh, [Shard(0)], shape=param.shape, stride=param.stride())
    return nn.Parameter(sharded, requires_grad=param.requires_grad)
    # END SOLUTION
