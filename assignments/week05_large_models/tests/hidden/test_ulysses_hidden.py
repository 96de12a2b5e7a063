"""Hidden tests of `largemodels.ulysses` (task ulysses_attention).

Reference: causal attention (`common.models.llama.Attention.attend`'s definition: kv heads repeated with
repeat_interleave, then scaled_dot_product_attention) in float64 on the whole sequence, computed here; each rank
must return, and get the gradients of, its own slice of the sequence. Tensors are (batch, positions, heads,
head_dim), and the cases include fewer kv heads than ranks: the course library's Ulysses (heads before
positions, kv heads divisible by the ranks) answers neither. The student's code runs on each rank
through the grader's hub, which counts every collective: all_to_all only, 4 in forward and 4 in backward, on
the group given (the scenario's one barrier between forward and backward splits the log). The scenario's
refusal to import the library is a message, not a guard (a submission can undo it): these cases, which the
library cannot answer, are the guard (`scenarios/attention.py`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scenarios import attention

from common.grading.client import Submission
from common.grading.ranks import Collective, RankRun

# float64: the same softmax and sums as the reference in another order, a few ulps; float32 against a float64
# reference: ~1e-6 relative per operation over s <= 8 positions and head_dim <= 4.
TOLERANCE = {torch.float64: {"rtol": 1e-9, "atol": 1e-9}, torch.float32: {"rtol": 1e-4, "atol": 1e-5}}
# name: (ranks, n_heads, n_kv_heads, batch, seq, head_dim, dtype)
CASES = {
    "2 ranks": (2, 2, 2, 2, 6, 4, torch.float64),
    "2 ranks, grouped-query, 2 kv heads per rank": (2, 8, 4, 1, 8, 2, torch.float64),
    "4 ranks, grouped-query": (4, 8, 4, 1, 8, 2, torch.float64),
    "4 ranks, 2 kv heads, each sent to 2 ranks": (4, 8, 2, 1, 8, 2, torch.float64),
    "4 ranks, multi-query: 1 kv head": (4, 4, 1, 2, 4, 3, torch.float64),
    "4 ranks, float32": (4, 4, 4, 2, 4, 4, torch.float32),
}
REPLICATED = ["4 ranks, 2 kv heads, each sent to 2 ranks", "4 ranks, multi-query: 1 kv head"]


def make(n_heads: int, n_kv_heads: int, batch: int, seq: int, head_dim: int, dtype: torch.dtype,
         seed: int = 0) -> dict[str, torch.Tensor]:  # fmt: skip
    generator = torch.Generator().manual_seed(seed)

    def draw(heads: int) -> torch.Tensor:
        return torch.randn(batch, seq, heads, head_dim, generator=generator, dtype=torch.float64).to(dtype)

    return {"q": draw(n_heads), "k": draw(n_kv_heads), "v": draw(n_kv_heads), "grad": draw(n_heads)}


def reference(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    q, k, v = (data[name].double().requires_grad_(True) for name in "qkv")  # (b, s, heads, hd)
    repeat = q.shape[2] // k.shape[2]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.repeat_interleave(repeat, dim=2).transpose(1, 2),
        v.repeat_interleave(repeat, dim=2).transpose(1, 2),
        is_causal=True,
    ).transpose(1, 2)  # (b, s, heads, hd)
    out.backward(data["grad"].double())
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def shards(data: dict[str, torch.Tensor], ranks: int) -> dict[str, list[torch.Tensor]]:
    """Each tensor cut along the sequence (dim 1) into `ranks` contiguous slices."""
    return {name: list(t.chunk(ranks, dim=1)) for name, t in data.items()}


def run(submission: Submission, data: dict[str, torch.Tensor], ranks: int, backward: bool = True,
        groups: list[list[int]] | None = None) -> RankRun:  # fmt: skip
    cut = shards(data, ranks) if groups is None else data
    return RankRun.from_data(
        submission.run(
            attention.ulysses, cut["q"], cut["k"], cut["v"], cut["grad"] if backward else None, groups
        )
    )


def close(ours: torch.Tensor, expected: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    assert type(ours) is torch.Tensor and ours.shape == expected.shape, (
        f"{what}: expected a tensor of shape {list(expected.shape)}, got {list(getattr(ours, 'shape', []))}"
    )
    assert ours.dtype == dtype, f"{what} is {ours.dtype}, expected {dtype}"
    torch.testing.assert_close(ours.double(), expected, **TOLERANCE[dtype], msg=what)


def check(seen: list[dict], ref: dict[str, torch.Tensor], ranks: list[int], dtype: torch.dtype,
          keys: tuple[str, ...] = ("out", "dq", "dk", "dv")) -> None:  # fmt: skip
    for key in keys:
        for position, rank in enumerate(ranks):
            expected = ref[key].chunk(len(ranks), dim=1)[position]
            close(seen[rank][key], expected, f"{key} on rank {rank} (its slice of the sequence)", dtype)


def assert_all_to_alls(part: list[Collective], members: list[int], rank: int, where: str) -> None:
    assert [(c.kind, c.group) for c in part] == [("all_to_all", tuple(members))] * 4, (
        f"rank {rank} made {[(c.kind, list(c.group)) for c in part]} in {where}; expected exactly 4 all_to_all "
        f"on its group {members}"
    )


def split_at_marker(log: list[Collective], rank: int) -> tuple[list[Collective], list[Collective]]:
    barriers = [i for i, c in enumerate(log) if c.kind == "barrier"]
    assert len(barriers) == 1, (
        f"rank {rank} made {len(barriers) - 1} barriers of its own ({[c.kind for c in log]}); expected none"
    )
    return log[: barriers[0]], log[barriers[0] + 1 :]


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_equal_attention_on_the_whole_sequence(
    submission: Submission, case: str
) -> None:
    ranks, n_heads, n_kv_heads, batch, seq, head_dim, dtype = CASES[case]
    data = make(n_heads, n_kv_heads, batch, seq, head_dim, dtype)
    seen = run(submission, data, ranks).returned(dict[str, torch.Tensor])
    check(seen, reference(data), list(range(ranks)), dtype)


@pytest.mark.parametrize("case", ["2 ranks, grouped-query, 2 kv heads per rank", *REPLICATED])
def test_four_all_to_alls_in_forward_and_four_in_backward(submission: Submission, case: str) -> None:
    ranks, n_heads, n_kv_heads, batch, seq, head_dim, dtype = CASES[case]
    data = make(n_heads, n_kv_heads, batch, seq, head_dim, dtype, seed=1)
    ran = run(submission, data, ranks)
    ran.returned(dict[str, torch.Tensor])
    for rank, log in enumerate(ran.collectives):
        forward, backward = split_at_marker(log, rank)
        assert_all_to_alls(forward, list(range(ranks)), rank, "forward")
        assert_all_to_alls(backward, list(range(ranks)), rank, "backward")


def test_forward_only_communicates_four_times(submission: Submission) -> None:
    ranks, n_heads, n_kv_heads, batch, seq, head_dim, dtype = CASES[
        "4 ranks, 2 kv heads, each sent to 2 ranks"
    ]
    data = make(n_heads, n_kv_heads, batch, seq, head_dim, dtype, seed=2)
    ran = run(submission, data, ranks, backward=False)
    check(ran.returned(dict[str, torch.Tensor]), reference(data), list(range(ranks)), dtype, keys=("out",))
    for rank, log in enumerate(ran.collectives):
        assert_all_to_alls(log, list(range(ranks)), rank, "forward")


def test_two_groups_of_two_each_attend_over_their_own_sequence(submission: Submission) -> None:
    groups, dtype = [[0, 1], [2, 3]], torch.float64
    datas = [make(4, 1, 1, 6, 4, dtype, seed=seed) for seed in (3, 4)]  # multi-query on each group
    cut = [shards(data, 2) for data in datas]
    joined = {name: cut[0][name] + cut[1][name] for name in datas[0]}
    ran = run(submission, joined, 4, groups=groups)
    seen = ran.returned(dict[str, torch.Tensor])
    for members, data in zip(groups, datas, strict=True):
        check(seen, reference(data), members, dtype)
        for rank in members:
            forward, backward = split_at_marker(ran.collectives[rank], rank)
            assert_all_to_alls(forward, members, rank, "forward")
            assert_all_to_alls(backward, members, rank, "backward")


@pytest.mark.parametrize("name", ["SequenceToHeads", "HeadsToSequence"])
def test_each_exchange_alone(submission: Submission, name: str) -> None:
    """Rank r of 2: SequenceToHeads gives heads r * heads / 2 ... of every position; HeadsToSequence undoes it."""
    generator = torch.Generator().manual_seed(5)
    whole = torch.randn(2, 6, 4, 3, generator=generator, dtype=torch.float64)  # (b, s, heads, hd)
    by_sequence, by_heads = list(whole.chunk(2, dim=1)), list(whole.chunk(2, dim=2))
    given, expected = (by_sequence, by_heads) if name == "SequenceToHeads" else (by_heads, by_sequence)
    ran = RankRun.from_data(submission.run(attention.exchange, name, given))
    for rank, ours in enumerate(ran.returned(torch.Tensor)):
        close(ours, expected[rank], f"{name} on rank {rank}", torch.float64)
        kinds = [c.kind for c in ran.collectives[rank]]
        assert kinds == ["all_to_all"], f"rank {rank} made {kinds} in {name}; expected one all_to_all"


@pytest.mark.parametrize("heads", [(6, 6), (12, 3)], ids=["query heads", "kv heads"])
def test_indivisible_heads_raise_value_error(submission: Submission, heads: tuple[int, int]) -> None:
    """4 ranks: 6 query heads do not split; 3 kv heads neither split over 4 ranks nor divide them. No
    communication first."""
    n_heads, n_kv_heads = heads
    data = make(n_heads, n_kv_heads, 1, 4, 2, torch.float64, seed=6)
    ran = run(submission, data, 4)
    for rank, error in enumerate(ran.errors):
        assert error is not None and "ValueError" in error["kinds"], (
            f"rank {rank}: expected ValueError for {n_heads} query and {n_kv_heads} kv heads on 4 ranks, got "
            f"{'a result' if error is None else error['name'] + ': ' + error['line']}"
        )
        assert ran.collectives[rank] == [], f"rank {rank} communicated before it raised"
