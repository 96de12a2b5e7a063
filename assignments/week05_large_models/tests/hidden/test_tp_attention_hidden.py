"""Hidden tests of `largemodels.tp_attention` (task tp_attention).

Reference: a whole `common.models.llama.Attention` in float64, computed here, in the checker, on the same x,
weights and output gradient. The student's code runs on each rank through the grader's hub
(`common.grading.ranks`), which carries out every collective itself and so counts them where the submission
cannot reach: exactly one all-reduce (sum) in forward and one in backward, on the group given. The scenario
calls one barrier between forward and backward: the marker that splits the log.
"""

from __future__ import annotations

import pytest
import torch
from scenarios import attention

from common.grading.client import Submission
from common.grading.ranks import Collective, RankRun
from common.models.llama import Attention, LlamaConfig, rope_tables

TOLERANCE = {torch.float64: {"rtol": 1e-9, "atol": 1e-9}, torch.float32: {"rtol": 1e-4, "atol": 1e-5}}
HEAD_DIM = 4
# name: (ranks, n_heads, n_kv_heads, batch, seq, dtype)
CASES = {
    "2 ranks, one kv head per query head": (2, 4, 4, 2, 5, torch.float64),
    "2 ranks, grouped-query": (2, 4, 2, 1, 6, torch.float64),
    "4 ranks, grouped-query, 2 kv heads per rank": (4, 16, 8, 1, 4, torch.float64),
    "2 ranks, float32": (2, 8, 4, 2, 3, torch.float32),
}


def make(n_heads: int, n_kv_heads: int, batch: int, seq: int, dtype: torch.dtype, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    d_model = n_heads * HEAD_DIM

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)

    weights = {
        "wq": draw(n_heads * HEAD_DIM, d_model) / d_model**0.5,
        "wk": draw(n_kv_heads * HEAD_DIM, d_model) / d_model**0.5,
        "wv": draw(n_kv_heads * HEAD_DIM, d_model) / d_model**0.5,
        "wo": draw(d_model, n_heads * HEAD_DIM) / d_model**0.5,
    }
    return {"weights": weights, "x": draw(batch, seq, d_model), "grad": draw(batch, seq, d_model)}


def reference(data: dict) -> dict[str, torch.Tensor]:
    """The whole attention in float64: output, input gradient and every weight's gradient."""
    weights = data["weights"]
    config = LlamaConfig(
        d_model=weights["wq"].shape[1],
        n_heads=weights["wq"].shape[0] // HEAD_DIM,
        n_kv_heads=weights["wk"].shape[0] // HEAD_DIM,
    )
    whole = Attention(config).double()
    with torch.no_grad():
        for name, weight in weights.items():
            getattr(whole, name).weight.copy_(weight.double())
    x = data["x"].double().requires_grad_(True)
    cos, sin = rope_tables(HEAD_DIM, x.shape[1])
    y = whole(x, cos, sin)
    y.backward(data["grad"].double())
    seen = {"y": y.detach(), "dx": x.grad}
    seen.update({"d" + name: getattr(whole, name).weight.grad for name in weights})
    return seen


def shard_rows(
    full: torch.Tensor, name: str, rank: int, ranks: int, n_heads: int, n_kv_heads: int
) -> torch.Tensor:
    """Rank `rank`'s part of a weight (or of its gradient): its heads' rows of wq/wk/wv, their columns of wo."""
    heads = n_kv_heads if name in ("wk", "wv") else n_heads
    per_rank = heads // ranks * HEAD_DIM
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    return full[:, part] if name == "wo" else full[part]


def run(submission: Submission, data: dict, ranks: int, groups: list[list[int]] | None = None,
        xs: list[torch.Tensor] | None = None) -> RankRun:  # fmt: skip
    xs = xs or [data["x"]] * ranks
    return RankRun.from_data(
        submission.run(
            attention.tp_attention, data["weights"], HEAD_DIM, xs, [data["grad"]] * len(xs), groups
        )
    )


def close(ours: torch.Tensor, expected: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    assert type(ours) is torch.Tensor and ours.shape == expected.shape, (
        f"{what}: expected a tensor of shape {list(expected.shape)}, got {list(getattr(ours, 'shape', []))}"
    )
    assert ours.dtype == dtype, f"{what} is {ours.dtype}, expected {dtype}"
    torch.testing.assert_close(ours.double(), expected, **TOLERANCE[dtype], msg=what)


def check_group(seen: list[dict], ref: dict, members: list[int], n_heads: int, n_kv_heads: int,
                dtype: torch.dtype) -> None:  # fmt: skip
    """Every rank of the group: the whole output and input gradient, its own shard of each weight's gradient."""
    for position, rank in enumerate(members):
        close(seen[rank]["y"], ref["y"], f"the output on rank {rank}", dtype)
        close(seen[rank]["dx"], ref["dx"], f"the input's gradient on rank {rank}", dtype)
        for name in ("wq", "wk", "wv", "wo"):
            expected = shard_rows(ref["d" + name], name, position, len(members), n_heads, n_kv_heads)
            close(seen[rank]["d" + name], expected, f"{name}'s gradient on rank {rank} (its shard)", dtype)


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
    check_group(seen, reference(data), list(range(ranks)), n_heads, n_kv_heads, dtype)


@pytest.mark.parametrize("case", ["2 ranks, grouped-query", "4 ranks, grouped-query, 2 kv heads per rank"])
def test_the_weights_kept_are_this_ranks_heads(submission: Submission, case: str) -> None:
    ranks, n_heads, n_kv_heads, batch, seq, dtype = CASES[case]
    data = make(n_heads, n_kv_heads, batch, seq, dtype, seed=1)
    seen = run(submission, data, ranks).returned(dict[str, torch.Tensor])
    for rank in range(ranks):
        for name in ("wq", "wk", "wv", "wo"):
            expected = shard_rows(data["weights"][name], name, rank, ranks, n_heads, n_kv_heads)
            close(seen[rank][name], expected.double(), f"{name} kept on rank {rank}", dtype)


@pytest.mark.parametrize("case", ["2 ranks, grouped-query", "4 ranks, grouped-query, 2 kv heads per rank"])
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
    """Four ranks, tensor-parallel groups {0, 1} and {2, 3} with different inputs: each group is one attention."""
    n_heads, n_kv_heads, dtype, groups = 4, 2, torch.float64, [[0, 1], [2, 3]]
    inputs = [make(n_heads, n_kv_heads, 1, 5, dtype, seed=3)]
    inputs.append({**inputs[0], "x": make(n_heads, n_kv_heads, 1, 5, dtype, seed=4)["x"]})
    xs = [inputs[0]["x"]] * 2 + [inputs[1]["x"]] * 2
    ran = run(submission, inputs[0], 4, groups=groups, xs=xs)
    seen = ran.returned(dict[str, torch.Tensor])
    for members, data in zip(groups, inputs, strict=True):
        check_group(seen, reference(data), members, n_heads, n_kv_heads, dtype)
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


@pytest.mark.parametrize("heads", [(6, 2), (8, 2)], ids=["query heads", "kv heads"])
def test_indivisible_heads_raise_value_error(submission: Submission, heads: tuple[int, int]) -> None:
    """4 ranks: 6 query heads, or 8 query heads but 2 kv heads, cannot be split; no communication first."""
    n_heads, n_kv_heads = heads
    data = make(n_heads, n_kv_heads, 1, 3, torch.float64, seed=6)
    ran = run(submission, data, 4)
    for rank, error in enumerate(ran.errors):
        assert error is not None and "ValueError" in error["kinds"], (
            f"rank {rank}: expected ValueError for {n_heads} query and {n_kv_heads} kv heads on 4 ranks, got "
            f"{'a result' if error is None else error['name'] + ': ' + error['line']}"
        )
        assert ran.collectives[rank] == [], f"rank {rank} communicated before it raised"
