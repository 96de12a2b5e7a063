"""Collectives from point-to-point messages: what NCCL and gloo do inside `dist.all_reduce`.

    ring_all_reduce(grad)                       # in place, like dist.all_reduce(grad)
    halving_doubling_all_reduce(grad, op=dist.ReduceOp.MAX)

Every function here is called by every rank of the group, in the same order, and uses only `isend`/`irecv`
(batched with `batch_isend_irecv`, so a rank's send and receive are in flight together and no pair of
ranks waits on each other). The tests check each against torch.distributed's own collective, for several
dtypes, ops and sizes, on 2, 3 and 4 ranks.

What you will learn (the alpha-beta costs are in cost_model.py):

- Ring all-reduce = reduce-scatter, then all-gather. The tensor is cut into p chunks; in p-1 steps each
  rank passes one chunk to its right neighbour and adds the chunk coming from its left, so after them rank
  r holds chunk r+1 summed over all ranks; p-1 more steps pass the finished chunks around. Each rank sends
  2(p-1)/p of the tensor, whatever p is: bandwidth-optimal, which is why NCCL's default is a ring. But
  it takes 2(p-1) steps, each paying the link's latency: slow for small tensors on many ranks.
- Pipelining. Each chunk travels as several segments, all posted at once; a segment is added as soon as it
  arrives, while the next ones are still on the wire, so the additions hide behind the transfer.
- Recursive halving and doubling (Rabenseifner) = the same reduce-scatter then all-gather in log2(p)
  steps: exchange half the data with the rank at distance p/2, then a quarter at distance p/4, and so on,
  then the same distances backwards to gather. Same bytes as the ring, far fewer steps. For a world size
  that is not a power of two, the first 2r ranks (r = p - 2^k) pair up and fold into r ranks first, and
  get the result back last: two extra steps with the whole tensor.
- Every element is reduced by exactly one rank and then copied to the others, so all ranks end with the
  same bits; but the order of the additions differs from gloo's or NCCL's, so float sums agree with
  theirs to rounding, not bit for bit (integer-valued data agrees exactly: the tests use both).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "REDUCE_OPS",
    "ReduceOp",
    "binomial_broadcast",
    "halving_doubling_all_reduce",
    "ring_all_gather",
    "ring_all_reduce",
    "ring_reduce_scatter",
]

ReduceOp = dist.ReduceOp
DEFAULT_SEGMENT_BYTES = 1 << 20  # pipelining granularity: large enough that a message's latency is amortised

# How two partial results combine, in place into the first. AVG sums, and divides once at the end.
REDUCE_OPS: dict[object, Callable[[torch.Tensor, torch.Tensor], object]] = {
    ReduceOp.SUM: torch.Tensor.add_,
    ReduceOp.AVG: torch.Tensor.add_,
    ReduceOp.PRODUCT: torch.Tensor.mul_,
    ReduceOp.MAX: lambda acc, x: torch.maximum(acc, x, out=acc),
    ReduceOp.MIN: lambda acc, x: torch.minimum(acc, x, out=acc),
}


def _reducer(op: object, tensor: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], object]:
    if op not in REDUCE_OPS:
        raise ValueError(f"op must be one of ReduceOp.SUM, AVG, PRODUCT, MAX, MIN, got {op!r}")
    if op == ReduceOp.AVG and not tensor.is_floating_point():
        raise TypeError(f"ReduceOp.AVG needs a floating-point tensor (it divides), got {tensor.dtype}")
    return REDUCE_OPS[op]


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D view of the tensor's memory: the collectives work in place, so a copy would be wrong."""
    if not tensor.is_contiguous():
        raise ValueError(
            f"the collectives work in place on a contiguous tensor, got one of shape {tuple(tensor.shape)} and "
            f"strides {tensor.stride()}; pass tensor.contiguous() and copy the result back"
        )
    return tensor.view(-1)


def _exchange(send: torch.Tensor | None, dst: int, recv: torch.Tensor | None, src: int, group) -> list:
    """Post a send and a receive together (either may be None); return their works to wait on."""
    ops = []
    if send is not None and send.numel():
        ops.append(dist.P2POp(dist.isend, send, group=group, group_peer=dst))
    if recv is not None and recv.numel():
        ops.append(dist.P2POp(dist.irecv, recv, group=group, group_peer=src))
    return dist.batch_isend_irecv(ops) if ops else []


def _ring_pass(
    chunks: Sequence[torch.Tensor],
    send_index: Callable[[int], int],
    recv_index: Callable[[int], int],
    reduce: Callable[[torch.Tensor, torch.Tensor], object] | None,
    group,
    segment_bytes: int,
) -> None:
    """p-1 ring steps: at step s send chunks[send_index(s)] right and receive chunks[recv_index(s)] from the left.

    With reduce, the received chunk is combined into ours (reduce-scatter); without, it overwrites ours
    (all-gather). Segments of a step are all posted at once and reduced as they arrive: the pipeline.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    right, left = (rank + 1) % world, (rank - 1) % world
    largest = max(chunks, key=torch.Tensor.numel)
    # Every chunk is cut into the same number of segments, so that a chunk is cut the same way on the rank
    # that sends it and on the rank that receives it.
    n_segments = max(1, -(-largest.numel() * largest.element_size() // segment_bytes))
    scratch = torch.empty_like(largest) if reduce else None
    for step in range(world - 1):
        send_chunk, recv_chunk = chunks[send_index(step)], chunks[recv_index(step)]
        target = scratch[: recv_chunk.numel()] if reduce else recv_chunk
        pending = [
            (recv_seg, target_seg, _exchange(send_seg, right, target_seg, left, group))
            for send_seg, recv_seg, target_seg in zip(
                send_chunk.tensor_split(n_segments),
                recv_chunk.tensor_split(n_segments),
                target.tensor_split(n_segments),
                strict=True,
            )
        ]
        for recv_seg, target_seg, works in pending:
            for work in works:
                work.wait()
            if reduce:
                reduce(recv_seg, target_seg)


def _ring_chunks(flat: torch.Tensor, world: int) -> tuple[torch.Tensor, ...]:
    return flat.tensor_split(world)  # sizes differ by at most one; some are empty when numel < world


def ring_reduce_scatter(
    tensor: torch.Tensor, op=ReduceOp.SUM, group=None, segment_bytes: int = DEFAULT_SEGMENT_BYTES
) -> torch.Tensor:
    """Reduce tensor over the ranks; return this rank's chunk of the result (a view into tensor).

    The tensor is cut into world_size chunks with tensor_split (sizes differ by at most one element); rank r
    gets chunk r, like dist.reduce_scatter_tensor when the size divides evenly. The rest of tensor holds
    partial sums afterwards.
    """
    reduce = _reducer(op, tensor)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    chunks = _ring_chunks(_flat(tensor), world)
    # Shifted by one from the textbook so that rank r ends with chunk r: at step s it sends chunk r-s-1.
    _ring_pass(
        chunks,
        send_index=lambda s: (rank - s - 1) % world,
        recv_index=lambda s: (rank - s - 2) % world,
        reduce=reduce,
        group=group,
        segment_bytes=segment_bytes,
    )
    if op == ReduceOp.AVG:
        chunks[rank].div_(world)
    return chunks[rank]


def ring_all_gather(
    tensor: torch.Tensor, group=None, segment_bytes: int = DEFAULT_SEGMENT_BYTES
) -> torch.Tensor:
    """Fill tensor, in place, from every rank's chunk: rank r contributes chunk r (tensor_split chunks)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    chunks = _ring_chunks(_flat(tensor), world)
    _ring_pass(
        chunks,
        send_index=lambda s: (rank - s) % world,
        recv_index=lambda s: (rank - s - 1) % world,
        reduce=None,
        group=group,
        segment_bytes=segment_bytes,
    )
    return tensor


def ring_all_reduce(
    tensor: torch.Tensor, op=ReduceOp.SUM, group=None, segment_bytes: int = DEFAULT_SEGMENT_BYTES
) -> torch.Tensor:
    """All-reduce in place with a ring: reduce-scatter, then all-gather. Returns tensor."""
    world = dist.get_world_size(group)
    if world == 1:
        return tensor
    ring_reduce_scatter(tensor, op, group, segment_bytes)  # divides this rank's chunk for AVG
    return ring_all_gather(tensor, group, segment_bytes)


def halving_doubling_all_reduce(tensor: torch.Tensor, op=ReduceOp.SUM, group=None) -> torch.Tensor:
    """All-reduce in place by recursive halving (reduce-scatter) and doubling (all-gather), any world size."""
    reduce = _reducer(op, tensor)
    flat = _flat(tensor)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    power = 1 << (world.bit_length() - 1)  # the largest power of two <= world
    extra = world - power
    scratch = torch.empty_like(flat)

    # 1. Fold: among the first 2*extra ranks, each even rank hands its tensor to the odd rank above it and
    #    sits out. The `power` ranks left get virtual ranks 0..power-1.
    if rank < 2 * extra:
        if rank % 2 == 0:
            _wait(_exchange(flat, rank + 1, None, rank + 1, group))
        else:
            _wait(_exchange(None, rank - 1, scratch, rank - 1, group))
            reduce(flat, scratch)
    folded_out = rank < 2 * extra and rank % 2 == 0
    if not folded_out:
        vrank = rank // 2 if rank < 2 * extra else rank - extra

        def real(v: int) -> int:
            return 2 * v + 1 if v < extra else v + extra

        # 2. Recursive halving: at distance d, keep one half of the current range, send the other half to
        #    the partner v^d and add the partner's copy of the half we keep.
        lo, hi, ranges = 0, flat.numel(), []
        distance = power // 2
        while distance:
            partner, mid = vrank ^ distance, (lo + hi) // 2
            keep, give = ((lo, mid), (mid, hi)) if vrank < partner else ((mid, hi), (lo, mid))
            _wait(
                _exchange(
                    flat[give[0] : give[1]], real(partner), scratch[keep[0] : keep[1]], real(partner), group
                )
            )
            reduce(flat[keep[0] : keep[1]], scratch[keep[0] : keep[1]])
            ranges.append((lo, hi))
            lo, hi = keep
            distance //= 2
        if op == ReduceOp.AVG:
            flat[lo:hi].div_(world)
        # 3. Recursive doubling: the same partners in reverse order; swap finished ranges, which double.
        distance = 1
        while distance < power:
            partner = vrank ^ distance
            outer_lo, outer_hi = ranges.pop()
            theirs = (outer_lo, lo) if lo > outer_lo else (hi, outer_hi)
            _wait(_exchange(flat[lo:hi], real(partner), flat[theirs[0] : theirs[1]], real(partner), group))
            lo, hi = outer_lo, outer_hi
            distance *= 2
    # 4. Unfold: the odd ranks of the first 2*extra hand the result back to their even partner.
    if rank < 2 * extra:
        if rank % 2 == 1:
            _wait(_exchange(flat, rank - 1, None, rank - 1, group))
        else:
            _wait(_exchange(None, rank + 1, flat, rank + 1, group))
    return tensor


def binomial_broadcast(tensor: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    """Broadcast tensor from rank src, in place, along a binomial tree: log2(p) rounds, the senders double."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    vrank = (rank - src) % world  # rotate so that the source is virtual rank 0
    # Round k: every virtual rank below 2^k that has the data sends it to vrank + 2^k.
    distance = 1
    while distance < world:
        if vrank < distance and vrank + distance < world:
            _wait(_exchange(tensor, (rank + distance) % world, None, 0, group))
        elif distance <= vrank < 2 * distance:
            _wait(_exchange(None, 0, tensor, (rank - distance) % world, group))
        distance *= 2
    return tensor


def _wait(works: list) -> None:
    for work in works:
        work.wait()
