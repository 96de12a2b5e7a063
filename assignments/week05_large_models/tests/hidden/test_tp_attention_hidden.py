"""Hidden tests of `largemodels.tp_attention` (task tp_attention).

Reference: a whole `common.models.llama.Attention` in float64 (separate wq, wk, wv cut from the fused wqkv by
this file's own layout table), computed here, in the checker, on the same x, weights and output gradient.
Each rank receives the whole weights with the rows and columns it does not own set to NaN: only a rank that
computes with exactly its own shard returns finite, correct values. The student's code runs on each rank through the grader's hub
(`common.grading.ranks`), which carries out every collective itself and so counts them where the submission
cannot reach: exactly one all-reduce (sum) in forward and one in backward, on the group given. The scenario
calls one barrier between forward and backward: the marker that splits the log. The scenario's refusal to
import `common.distributed.tensor_parallel` and DTensor is a message, not a guard (a submission can undo it):
the fused layout, the NaN outside each shard and the replicated kv heads, which the library cannot answer,
are the guard (`scenarios/attention.py`).
"""

from __future__ import annotations

import pytest
import torch
from scenarios import attention

from common.grading.client import Submission
from common.grading.ranks import Collective, RankRun
from common.models.llama import Attention, LlamaConfig, rope_tables

# float64 runs the same operations as the reference in another order (per-head sums, an all-reduce of p
# partial sums): differences are a few ulps of values of order 1, far below 1e-9. float32: the same sums in
# float32 against a float64 reference, relative error ~1e-6 per operation over d_model <= 32 terms.
TOLERANCE = {torch.float64: {"rtol": 1e-9, "atol": 1e-9}, torch.float32: {"rtol": 1e-4, "atol": 1e-5}}
HEAD_DIM = 4
# name: (ranks, n_heads, n_kv_heads, batch, seq, dtype)
CASES = {
    "2 ranks, one kv head per query head": (2, 4, 4, 2, 5, torch.float64),
    "2 ranks, grouped-query, kv heads split": (2, 4, 2, 1, 6, torch.float64),
    "4 ranks, 2 kv heads, each on 2 ranks": (4, 8, 2, 1, 4, torch.float64),
    "4 ranks, multi-query: 1 kv head on every rank": (4, 4, 1, 2, 3, torch.float64),
    "2 ranks, float32, 3 query heads per kv head": (2, 6, 2, 2, 3, torch.float32),
}
REPLICATED = ["4 ranks, 2 kv heads, each on 2 ranks", "4 ranks, multi-query: 1 kv head on every rank"]


# The fused layout, written out row by row (independently of any submission): group j holds q of its g
# query heads, then k of kv head j, then v of kv head j, head_dim rows each.
def row_labels(n_heads: int, n_kv_heads: int) -> list[tuple[str, int]]:
    """(kind, head) of each block of HEAD_DIM rows of wqkv, in order; kind "q", "k" or "v"."""
    g = n_heads // n_kv_heads
    labels = []
    for j in range(n_kv_heads):
        labels += [("q", j * g + i) for i in range(g)] + [("k", j), ("v", j)]
    return labels


def rows_of(n_heads: int, n_kv_heads: int, kind: str, heads: list[int]) -> torch.Tensor:
    """The rows of wqkv holding `kind` of `heads`, head by head."""
    where = {label: b for b, label in enumerate(row_labels(n_heads, n_kv_heads))}
    return torch.cat(
        [torch.arange(where[kind, h] * HEAD_DIM, (where[kind, h] + 1) * HEAD_DIM) for h in heads]
    )


def owned(n_heads: int, n_kv_heads: int, rank: int, ranks: int) -> tuple[torch.Tensor, slice]:
    """Rank `rank`'s rows of wqkv (its q rows, k rows, v rows) and its columns of wo."""
    per_rank = n_heads // ranks
    heads = list(range(rank * per_rank, (rank + 1) * per_rank))
    g = n_heads // n_kv_heads
    kv_heads = sorted({h // g for h in heads})
    rows = torch.cat(
        [rows_of(n_heads, n_kv_heads, kind, kv_heads if kind != "q" else heads) for kind in "qkv"]
    )
    return rows, slice(heads[0] * HEAD_DIM, (heads[-1] + 1) * HEAD_DIM)


def make(n_heads: int, n_kv_heads: int, batch: int, seq: int, dtype: torch.dtype, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    d_model = n_heads * HEAD_DIM  # head_dim = d_model // n_heads in LlamaConfig

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)

    return {
        "heads": [n_heads, n_kv_heads],
        "wqkv": draw((n_heads + 2 * n_kv_heads) * HEAD_DIM, d_model) / d_model**0.5,
        "wo": draw(d_model, n_heads * HEAD_DIM) / (n_heads * HEAD_DIM) ** 0.5,
        "x": draw(batch, seq, d_model),
        "grad": draw(batch, seq, d_model),
    }


def poisoned(data: dict, rank: int, ranks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole weights with every row of wqkv and column of wo that `rank` does not own set to NaN: a rank
    that computes with anything but its own shard gets NaN."""
    rows, columns = owned(*data["heads"], rank, ranks)
    wqkv, wo = torch.full_like(data["wqkv"], float("nan")), torch.full_like(data["wo"], float("nan"))
    wqkv[rows], wo[:, columns] = data["wqkv"][rows], data["wo"][:, columns]
    return wqkv, wo


def reference(data: dict) -> dict[str, torch.Tensor]:
    """The whole attention in float64 (common.models.llama.Attention, separate wq, wk, wv): output, input
    gradient, and the gradients of wqkv (fused again) and wo."""
    n_heads, n_kv_heads = data["heads"]
    config = LlamaConfig(d_model=data["wqkv"].shape[1], n_heads=n_heads, n_kv_heads=n_kv_heads)
    assert config.head_dim == HEAD_DIM
    whole = Attention(config).double()
    rows = {kind: rows_of(n_heads, n_kv_heads, kind, list(range(n_kv_heads if kind != "q" else n_heads)))
            for kind in "qkv"}  # fmt: skip
    with torch.no_grad():
        for kind in "qkv":
            getattr(whole, "w" + kind).weight.copy_(data["wqkv"][rows[kind]].double())
        whole.wo.weight.copy_(data["wo"].double())
    x = data["x"].double().requires_grad_(True)
    cos, sin = rope_tables(HEAD_DIM, x.shape[1])
    y = whole(x, cos, sin)
    y.backward(data["grad"].double())
    dwqkv = torch.zeros_like(data["wqkv"], dtype=torch.float64)
    for kind in "qkv":
        dwqkv[rows[kind]] = getattr(whole, "w" + kind).weight.grad
    return {"y": y.detach(), "dx": x.grad, "dwqkv": dwqkv, "dwo": whole.wo.weight.grad}


def run(submission: Submission, data: dict, ranks: int, groups: list[list[int]] | None = None,
        xs: list[torch.Tensor] | None = None) -> RankRun:  # fmt: skip
    xs = xs or [data["x"]] * ranks
    members = groups or [list(range(ranks))]
    position = {rank: (group.index(rank), len(group)) for group in members for rank in group}
    weights = [poisoned(data, *position[rank]) for rank in range(len(xs))]
    return RankRun.from_data(
        submission.run(
            attention.tp_attention,
            [w[0] for w in weights],
            [w[1] for w in weights],
            data["heads"],
            xs,
            [data["grad"]] * len(xs),
            groups,
        )  # fmt: skip
    )


def close(ours: torch.Tensor, expected: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    assert type(ours) is torch.Tensor and ours.shape == expected.shape, (
        f"{what}: expected a tensor of shape {list(expected.shape)}, got {list(getattr(ours, 'shape', []))}"
    )
    assert ours.dtype == dtype, f"{what} is {ours.dtype}, expected {dtype}"
    torch.testing.assert_close(ours.double(), expected, **TOLERANCE[dtype], msg=what)


def check_group(
    seen: list[dict], ref: dict, members: list[int], heads: list[int], dtype: torch.dtype
) -> None:
    """Every rank of the group: the whole output and input gradient, its shard of wo's gradient, its rows of
    wqkv's gradient; the rows of a kv head kept on several ranks summed over them (each holds its part)."""
    summed = torch.zeros_like(ref["dwqkv"])
    for position, rank in enumerate(members):
        close(seen[rank]["y"], ref["y"], f"the output on rank {rank}", dtype)
        close(seen[rank]["dx"], ref["dx"], f"the input's gradient on rank {rank}", dtype)
        rows, columns = owned(*heads, position, len(members))
        close(seen[rank]["dwo"], ref["dwo"][:, columns], f"wo's gradient on rank {rank} (its columns)", dtype)
        local = seen[rank]["dwqkv"]
        assert type(local) is torch.Tensor and local.shape == (rows.numel(), ref["dwqkv"].shape[1]), (
            f"wqkv's gradient on rank {rank}: expected shape {[rows.numel(), ref['dwqkv'].shape[1]]} (its rows), "
            f"got {list(getattr(local, 'shape', []))}"
        )
        summed.index_add_(0, rows, local.double())
        n_q = heads[0] // len(members) * HEAD_DIM
        close(local[:n_q], ref["dwqkv"][rows[:n_q]], f"wqkv's gradient on rank {rank}, its q rows", dtype)
    close(summed.to(dtype), ref["dwqkv"], "wqkv's gradient, summed over the ranks that keep each row", dtype)


def split_at_marker(log: list[Collective], rank: int) -> tuple[list[Collective], list[Collective]]:
    """The rank's collectives before and after the scenario's barrier between forward and backward."""
    barriers = [i for i, c in enumerate(log) if c.kind == "barrier"]
    assert len(barriers) == 1, (
        f"rank {rank} made {len(barriers) - 1} barriers of its own ({[c.kind for c in log]}); expected none"
    )
    return log[: barriers[0]], log[barriers[0] + 1 :]


def assert_one_all_reduce(part: list[Collective], members: list[int], rank: int, where: str) -> None:
    assert [(c.kind, c.group, c.reduce) for c in part] == [("all_reduce", tuple(members), "sum")], (
        f"rank {rank} made {[(c.kind, list(c.group), c.reduce) for c in part]} in {where}; expected exactly one "
        f"all_reduce (sum) on its group {members}"
    )


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_equal_the_whole_attention(submission: Submission, case: str) -> None:
    ranks, n_heads, n_kv_heads, batch, seq, dtype = CASES[case]
    data = make(n_heads, n_kv_heads, batch, seq, dtype)
    seen = run(submission, data, ranks).returned(dict[str, torch.Tensor])
    check_group(seen, reference(data), list(range(ranks)), data["heads"], dtype)


@pytest.mark.parametrize("case", ["2 ranks, grouped-query, kv heads split", *REPLICATED])
def test_the_weights_kept_are_this_ranks_rows_in_order(submission: Submission, case: str) -> None:
    ranks, n_heads, n_kv_heads, batch, seq, dtype = CASES[case]
    data = make(n_heads, n_kv_heads, batch, seq, dtype, seed=1)
    seen = run(submission, data, ranks).returned(dict[str, torch.Tensor])
    for rank in range(ranks):
        rows, columns = owned(n_heads, n_kv_heads, rank, ranks)
        close(seen[rank]["wqkv"], data["wqkv"][rows].double(), f"wqkv kept on rank {rank}", dtype)
        close(seen[rank]["wo"], data["wo"][:, columns].double(), f"wo kept on rank {rank}", dtype)


@pytest.mark.parametrize("case", ["2 ranks, grouped-query, kv heads split", *REPLICATED])
def test_one_all_reduce_in_forward_and_one_in_backward(submission: Submission, case: str) -> None:
    ranks, n_heads, n_kv_heads, batch, seq, dtype = CASES[case]
    data = make(n_heads, n_kv_heads, batch, seq, dtype, seed=2)
    ran = run(submission, data, ranks)
    ran.returned(dict[str, torch.Tensor])
    for rank, log in enumerate(ran.collectives):
        forward, backward = split_at_marker(log, rank)
        assert_one_all_reduce(forward, list(range(ranks)), rank, "forward")
        assert_one_all_reduce(backward, list(range(ranks)), rank, "backward")


def test_two_groups_of_two_each_split_their_own_heads(submission: Submission) -> None:
    """Four ranks, tensor-parallel groups {0, 1} and {2, 3} with different inputs: each group is one attention,
    its one kv head kept on both of its ranks."""
    n_heads, n_kv_heads, dtype, groups = 4, 1, torch.float64, [[0, 1], [2, 3]]
    inputs = [make(n_heads, n_kv_heads, 1, 5, dtype, seed=3)]
    inputs.append({**inputs[0], "x": make(n_heads, n_kv_heads, 1, 5, dtype, seed=4)["x"]})
    xs = [inputs[0]["x"]] * 2 + [inputs[1]["x"]] * 2
    ran = run(submission, inputs[0], 4, groups=groups, xs=xs)
    seen = ran.returned(dict[str, torch.Tensor])
    for members, data in zip(groups, inputs, strict=True):
        check_group(seen, reference(data), members, data["heads"], dtype)
        for rank in members:
            forward, backward = split_at_marker(ran.collectives[rank], rank)
            assert_one_all_reduce(forward, members, rank, "forward")
            assert_one_all_reduce(backward, members, rank, "backward")


def test_the_two_functions(submission: Submission) -> None:
    """f: identity forward, sum of the gradients backward; g: sum forward, identity backward; one all-reduce each
    where it communicates, none where it does not."""
    generator = torch.Generator().manual_seed(5)
    xs = [torch.randn(2, 3, generator=generator, dtype=torch.float64) for _ in range(3)]
    grads = [torch.randn(2, 3, generator=generator, dtype=torch.float64) for _ in range(3)]
    ran = RankRun.from_data(submission.run(attention.tp_functions, xs, grads))
    seen = ran.returned(dict[str, torch.Tensor])
    for rank in range(3):
        close(seen[rank]["copy"], xs[rank], f"CopyToTensorParallel's forward on rank {rank}", torch.float64)
        close(
            seen[rank]["copy_grad"],
            sum(grads),
            f"CopyToTensorParallel's backward on rank {rank}",
            torch.float64,
        )
        close(
            seen[rank]["reduce"], sum(xs), f"ReduceFromTensorParallel's forward on rank {rank}", torch.float64
        )
        close(seen[rank]["reduce_grad"], grads[rank], f"ReduceFromTensorParallel's backward on rank {rank}",
              torch.float64)  # fmt: skip
        kinds = [c.kind for c in ran.collectives[rank]]
        expected = ["barrier", "barrier", "all_reduce", "barrier", "all_reduce", "barrier", "barrier"]
        assert kinds == expected, (
            f"rank {rank}'s collectives {kinds}: expected one all_reduce in CopyToTensorParallel's backward "
            f"and one in ReduceFromTensorParallel's forward, none elsewhere (the barriers are the test's)"
        )


@pytest.mark.parametrize("heads", [(6, 2), (12, 3)], ids=["query heads", "kv heads"])
def test_indivisible_heads_raise_value_error(submission: Submission, heads: tuple[int, int]) -> None:
    """4 ranks: 6 query heads do not split; 12 query heads split, but 3 kv heads neither split over 4 ranks nor
    divide them. No communication first."""
    n_heads, n_kv_heads = heads
    data = make(n_heads, n_kv_heads, 1, 3, torch.float64, seed=6)
    ran = RankRun.from_data(
        submission.run(
            attention.tp_attention,
            [data["wqkv"]] * 4,
            [data["wo"]] * 4,
            data["heads"],
            [data["x"]] * 4,
            [data["grad"]] * 4,
        )  # fmt: skip
    )
    for rank, error in enumerate(ran.errors):
        assert error is not None and "ValueError" in error["kinds"], (
            f"rank {rank}: expected ValueError for {n_heads} query and {n_kv_heads} kv heads on 4 ranks, got "
            f"{'a result' if error is None else error['name'] + ': ' + error['line']}"
        )
        assert ran.collectives[rank] == [], f"rank {rank} communicated before it raised"
