"""Data parallelism from scratch: what `torch.nn.parallel.DistributedDataParallel` does, in one file.

    ddp = apply_ddp(model)                  # every rank: same weights as rank 0, hooks on the parameters
    for step, (x, y) in enumerate(shard_of_the_data):
        loss_fn(model(x), y).backward()     # gradients are averaged over the ranks as backward runs
        optimizer.step()
        optimizer.zero_grad()

    with ddp.no_sync():                     # gradient accumulation: no communication in these backwards
        loss_fn(model(x1), y1).backward()
    loss_fn(model(x2), y2).backward()       # this one all-reduces the sum of both

The model stays a plain nn.Module: its forward is untouched, everything happens in autograd hooks. What you
will learn:

- Same start. Rank 0's parameters and buffers are broadcast to every rank, so the replicas start equal;
  equal gradients then keep them equal, step after step, with no further parameter traffic.
- Buckets. One all-reduce per parameter would pay a collective's latency hundreds of times per step; one
  all-reduce of everything would wait for the whole backward. So gradients are packed into flat buckets of
  ~25 MiB, and a bucket's all-reduce is launched, asynchronously, as soon as its last gradient arrives,
  while autograd goes on computing the gradients of earlier layers: communication overlaps backward.
  Buckets hold parameters in the order their gradients become ready (roughly the reverse of the forward),
  and are launched strictly in that order on every rank, because collectives match by order.
- The order is learned. Which gradient is ready first is only known after a backward, so the first backward
  uses one bucket of all parameters (reduced at its end, no overlap), records the order in which the
  hooks fired, and builds the buckets from it: a small first bucket (1 MiB) that starts communicating
  early, then 25 MiB ones. torch's DDP does exactly this, and so our buckets, and hence the order of every
  floating-point addition inside gloo's all-reduce, are the same as torch's: the gradients are equal to
  torch DDP's bit for bit (the tests check it on 2, 3 and 4 ranks).
- Averaging. Each gradient is multiplied by 1/world_size while it is copied into its bucket, then the
  bucket is summed: one pass over the data instead of two. (Multiplying by the reciprocal, not dividing,
  is another bit that must match torch: x * (1/3) and x / 3 can differ in the last bit.)
- End of backward. A callback queued on the autograd engine runs when backward finishes: it waits for the
  bucket all-reduces and copies the averaged gradients into param.grad. A parameter whose hook never fired
  (not used in this forward) would leave its bucket waiting forever on the ranks that did use it, so it is
  an error naming the parameter, not a hang.

What torch's DDP does that this one doesn't: broadcasting buffers (BatchNorm statistics) before every
forward, find_unused_parameters, gradient_as_bucket_view (no copy back), comm hooks (fp16 compression),
static graphs, and mixed dtypes in one model.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from common.errors import EffdlError

__all__ = [
    "DEFAULT_BUCKET_CAP_MB",
    "DEFAULT_FIRST_BUCKET_MB",
    "Reducer",
    "UnusedParameterError",
    "apply_ddp",
    "bucket_assignment",
]

MIB = 1 << 20
DEFAULT_BUCKET_CAP_MB = 25.0  # torch DDP's bucket_cap_mb
DEFAULT_FIRST_BUCKET_MB = 1.0  # torch DDP's first bucket (dist._DEFAULT_FIRST_BUCKET_BYTES)


class UnusedParameterError(EffdlError, RuntimeError):
    """A backward produced no gradient for some parameters, so their bucket could never be all-reduced."""


def bucket_assignment(sizes_bytes: Sequence[int], limits_bytes: Sequence[int]) -> list[list[int]]:
    """Group tensors, in the given order, into buckets: a bucket closes once it holds >= its limit.

    The first bucket's limit is limits_bytes[0], the second's limits_bytes[1], and so on; the last limit
    repeats. This is torch's rule (compute_bucket_assignment_by_size), so the buckets come out the same.
    """
    buckets, current, size, limit = [], [], 0, 0
    for index, nbytes in enumerate(sizes_bytes):
        current.append(index)
        size += nbytes
        if size >= limits_bytes[limit]:
            buckets.append(current)
            current, size, limit = [], 0, min(limit + 1, len(limits_bytes) - 1)
    return buckets + [current] if current else buckets


@dataclass
class _Bucket:
    """A flat buffer that holds the (pre-divided) gradients of some parameters, and its all-reduce."""

    params: list[int]  # indices into Reducer.params, in the order of the buffer
    buffer: torch.Tensor
    views: list[torch.Tensor]  # one per parameter: its gradient's place in the buffer
    waiting_for: int = 0  # gradients still to arrive in this backward
    work: dist.Work | None = field(default=None, repr=False)


class Reducer:
    """The part of DDP that does the work (torch calls it the Reducer too): buckets, hooks, all-reduces."""

    def __init__(
        self,
        model: nn.Module,
        group: dist.ProcessGroup | None = None,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        first_bucket_mb: float = DEFAULT_FIRST_BUCKET_MB,
    ) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        kinds = {(p.dtype, p.device) for p in self.params}
        if len(kinds) > 1:
            raise EffdlError(
                "apply_ddp buckets parameters of one dtype on one device, but this model has "
                f"{sorted(map(str, kinds))}; cast the model to one dtype (model.float()), or use torch's "
                "DistributedDataParallel"
            )
        self.limits = [int(first_bucket_mb * MIB), int(bucket_cap_mb * MIB)]
        self.require_sync = True
        self.ready_order: list[int] | None = None  # the order of the first synchronised backward's hooks
        self._in_backward = False
        self._fired: list[int] = []  # parameter indices, in the order their hooks fired in this backward
        self._next_bucket = 0  # the first bucket whose all-reduce is not launched yet
        broadcast_module_states(model, group)
        # First backward: one bucket in registration order, since the ready order is not known yet.
        self._build_buckets(list(range(len(self.params))), [sys.maxsize])
        self._hooks = [
            p.register_post_accumulate_grad_hook(partial(self._on_grad_ready, i))
            for i, p in enumerate(self.params)
        ]

    def _build_buckets(self, order: list[int], limits: Sequence[int]) -> None:
        sizes = [self.params[i].numel() * self.params[i].element_size() for i in order]
        self.buckets: list[_Bucket] = []
        self._place: dict[int, tuple[_Bucket, torch.Tensor]] = {}  # param index -> its bucket and view
        for positions in bucket_assignment(sizes, limits):
            params = [order[k] for k in positions]
            buffer = torch.zeros(
                sum(self.params[i].numel() for i in params),
                dtype=self.params[0].dtype,
                device=self.params[0].device,
            )
            views = [
                v.view_as(self.params[i])
                for i, v in zip(params, buffer.split([self.params[i].numel() for i in params]), strict=True)
            ]
            bucket = _Bucket(params, buffer, views)
            self.buckets.append(bucket)
            self._place.update((i, (bucket, view)) for i, view in zip(params, views, strict=True))

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backwards inside this block only accumulate local gradients; the next one outside all-reduces them."""
        previous, self.require_sync = self.require_sync, False
        try:
            yield
        finally:
            self.require_sync = previous

    def _on_grad_ready(self, index: int, param: torch.Tensor) -> None:
        """Autograd hook: param.grad is final for this backward. Copy it into its bucket; launch full buckets."""
        if not self.require_sync:
            return
        if not self._in_backward:  # the first hook of a backward
            self._in_backward = True
            self._next_bucket = 0
            self._fired = []
            for bucket in self.buckets:
                bucket.waiting_for, bucket.work = len(bucket.params), None
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
        self._fired.append(index)
        bucket, view = self._place[index]
        torch.mul(param.grad, 1.0 / self.world_size, out=view)  # average: pre-multiply, then sum
        bucket.waiting_for -= 1
        # Launch in bucket order only: every rank must issue its all-reduces in the same order.
        while self._next_bucket < len(self.buckets) and self.buckets[self._next_bucket].waiting_for == 0:
            ready = self.buckets[self._next_bucket]
            ready.work = dist.all_reduce(ready.buffer, group=self.group, async_op=True)
            self._next_bucket += 1

    def _finish_backward(self) -> None:
        """Runs once backward is done: wait for the all-reduces, write the averages into param.grad."""
        self._in_backward = False
        fired = set(self._fired)
        missing = [self.names[i] for i in range(len(self.params)) if i not in fired]
        if missing:
            for bucket in self.buckets[: self._next_bucket]:  # don't leave launched all-reduces behind
                bucket.work.wait()
            raise UnusedParameterError(
                f"{len(missing)} parameter(s) got no gradient in this backward: {', '.join(missing)}. Their "
                "bucket's all-reduce can't start, and the ranks that did compute them would wait for it "
                "forever. Use every parameter in the loss on every step, or set requires_grad=False on the "
                "unused ones before apply_ddp (torch's DDP has find_unused_parameters=True for this)."
            )
        for bucket in self.buckets:
            bucket.work.wait()
            for i, view in zip(bucket.params, bucket.views, strict=True):
                self.params[i].grad.copy_(view)
        if self.ready_order is None:  # after the first backward: buckets in the order gradients arrived
            self.ready_order = self._fired
            self._build_buckets(self.ready_order, self.limits)

    def remove(self) -> None:
        """Take the hooks off the model: it is a plain single-process module again."""
        for hook in self._hooks:
            hook.remove()


def broadcast_module_states(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Overwrite every parameter and buffer with rank 0's, so that all replicas start equal.

    One broadcast per tensor: simple, and it happens once. (torch packs them into 250 MB buckets.)
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor, group=group, group_src=0)


def apply_ddp(
    model: nn.Module,
    group: dist.ProcessGroup | None = None,
    bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
    first_bucket_mb: float = DEFAULT_FIRST_BUCKET_MB,
) -> Reducer:
    """Make model data parallel over the group (default: all ranks); returns the Reducer (for no_sync()).

    Call it on every rank, after the process group is up and the model is on its device. The defaults are
    torch DDP's; torch's DistributedDataParallel(model, bucket_cap_mb=X) corresponds to
    apply_ddp(model, bucket_cap_mb=X, first_bucket_mb=X) (torch drops the small first bucket then).
    """
    return Reducer(model, group, bucket_cap_mb, first_bucket_mb)
