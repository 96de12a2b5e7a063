"""Runs in the submission's worker: the student's parallel attention on each rank, through the grader's hub.

Each function returns run_ranks' data: per rank, raw tensors (outputs, gradients) and the collectives the hub
saw. Where forward and backward are counted apart, the scenario itself calls one `dist.barrier()` between them
(trusted code, on the default group): in the log it marks where forward ended. The checker computes the
reference (a whole `common.models.llama.Attention`, float64) itself.

Before the submission is imported, every rank refuses `common.distributed.tensor_parallel` (the course's own
Megatron and Ulysses) and `torch.distributed.tensor` (DTensor): the tasks are to write that communication.
That refusal states the rule where a student meets it; it is not what enforces it. It runs in the rank, in the
submission's own interpreter, which can take the finder off sys.meta_path, or exec the library's source as
the mutants `tp_calls_the_library` and `ulysses_calls_the_library` do. Nor can the trusted side see the
difference: the library's collectives reach the hub as the student's would, and a scan of the submitted source
misses a module name built at run time. What makes the library useless is the problem itself: a fused QKV
weight interleaved per kv-head group, NaN outside each rank's shard and kv heads fewer than ranks (tensor
parallel); (batch, positions, heads, head_dim) tensors and replicated kv heads (Ulysses). The library answers
other layouts, and the two mutants, which call it past the refusal, lose the task's points.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from common.grading.off_limits import refuse_imports
from common.grading.ranks import run_ranks

PACKAGE = "largemodels"
OFF_LIMITS = ("common.distributed.tensor_parallel", "torch.distributed.tensor")


def refuse_off_limits() -> None:
    """Make the off-limits modules unimportable in this rank (a forked child: the hub's process is unchanged),
    for a clear message to a student who tries; a submission can undo it (see the module docstring)."""
    refuse_imports(
        OFF_LIMITS,
        "write the communication yourself with torch.distributed (all_reduce, all_to_all)",
    )


def _group(groups: list[list[int]] | None) -> dist.ProcessGroup | None:
    """This rank's group of `groups` (every rank creates every group, in the same order); None: the world."""
    mine = None
    for members in groups or []:
        created = dist.new_group(members)
        if dist.get_rank() in members:
            mine = created
    return mine


# ------------------------------------------------------------------------------- tensor-parallel attention
def _tp_attention(wqkv: torch.Tensor, wo: torch.Tensor, heads: list[int], x: torch.Tensor, grad: torch.Tensor,
                  groups: list[list[int]] | None) -> dict:  # fmt: skip
    refuse_off_limits()
    from largemodels.tp_attention import TensorParallelAttention

    from common.models.llama import rope_tables

    group = _group(groups)
    n_heads, n_kv_heads = heads
    tp = TensorParallelAttention(wqkv, wo, n_heads, n_kv_heads, group)
    head_dim = wo.shape[1] // n_heads
    cos, sin = rope_tables(head_dim, x.shape[1])
    x = x.clone().requires_grad_(True)
    y = tp(x, cos, sin)
    dist.barrier()  # the checker's marker: forward ends here
    y.backward(grad.clone())  # a clone: the submission may all-reduce the gradient it receives in place
    seen = {"y": y.detach().clone(), "dx": x.grad.clone()}
    for name in ("wqkv", "wo"):
        seen[name] = getattr(tp, name).weight.detach().clone()
        seen["d" + name] = getattr(tp, name).weight.grad.clone()
    return seen


def tp_attention(wqkvs: list[torch.Tensor], wos: list[torch.Tensor], heads: list[int], xs: list[torch.Tensor],
                 grads: list[torch.Tensor], groups: list[list[int]] | None = None) -> dict:  # fmt: skip
    """Rank r builds TensorParallelAttention from wqkvs[r] and wos[r] (the whole weights with the rows and
    columns that rank r does not own set to NaN), runs it on xs[r] and backpropagates grads[r]."""
    args = [(wqkvs[r], wos[r], heads, x, grads[r], groups) for r, x in enumerate(xs)]
    return run_ranks(_tp_attention, args, package=PACKAGE)


def _tp_functions(x: torch.Tensor, grad: torch.Tensor, groups: list[list[int]] | None) -> dict:
    refuse_off_limits()
    from largemodels.tp_attention import CopyToTensorParallel, ReduceFromTensorParallel

    group = _group(groups)
    seen = {}
    for name, function in (("copy", CopyToTensorParallel), ("reduce", ReduceFromTensorParallel)):
        dist.barrier()  # markers: before forward, between forward and backward
        leaf = x.clone().requires_grad_(True)
        out = function.apply(leaf, group)
        dist.barrier()
        out.backward(grad.clone())  # a clone: the submission may all-reduce the gradient it receives in place
        seen[name], seen[name + "_grad"] = out.detach().clone(), leaf.grad.clone()
    dist.barrier()
    return seen


def tp_functions(
    xs: list[torch.Tensor], grads: list[torch.Tensor], groups: list[list[int]] | None = None
) -> dict:
    """Rank r applies CopyToTensorParallel, then ReduceFromTensorParallel, to xs[r] and backpropagates grads[r]."""
    return run_ranks(_tp_functions, [(x, grads[r], groups) for r, x in enumerate(xs)], package=PACKAGE)


# ---------------------------------------------------------------------------------------------- Ulysses
def _ulysses(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor | None,
             groups: list[list[int]] | None) -> dict:  # fmt: skip
    refuse_off_limits()
    from largemodels.ulysses import ulysses_attention

    group = _group(groups)
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = ulysses_attention(q, k, v, group)
    seen = {"out": out.detach().clone()}
    if grad is not None:
        dist.barrier()  # the checker's marker: forward ends here
        out.backward(grad.clone())  # a clone: the submission may change the gradient it receives in place
        seen.update(dq=q.grad.clone(), dk=k.grad.clone(), dv=v.grad.clone())
    return seen


def ulysses(qs: list[torch.Tensor], ks: list[torch.Tensor], vs: list[torch.Tensor],
            grads: list[torch.Tensor] | None, groups: list[list[int]] | None = None) -> dict:  # fmt: skip
    """Rank r calls ulysses_attention(qs[r], ks[r], vs[r]) and, unless grads is None, backpropagates grads[r]."""
    args = [(q, ks[r], vs[r], None if grads is None else grads[r], groups) for r, q in enumerate(qs)]
    return run_ranks(_ulysses, args, package=PACKAGE)


def _exchange(name: str, x: torch.Tensor) -> torch.Tensor:
    refuse_off_limits()
    from largemodels import ulysses as module

    return getattr(module, name).apply(x, None).detach().clone()


def exchange(name: str, xs: list[torch.Tensor]) -> dict:
    """Rank r applies the Function `name` (SequenceToHeads or HeadsToSequence) to xs[r], forward only."""
    return run_ranks(_exchange, [(name, x) for x in xs], package=PACKAGE)
