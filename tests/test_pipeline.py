"""common.distributed.pipeline: schedules and their bubble on paper, then real steps on 2 and 4 gloo ranks.

The reference for a pipelined step is the single-process Llama on the full batch, computed here in the test
process (never in the ranks): same loss, same gradients, same weights after several SGD steps, for GPipe
and 1F1B, with untied and tied embeddings. The reference for a simulated schedule is the closed form
(p - 1)/(m + p - 1). One launch per world size runs every pipelined check.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.distributed as dist

from common.distributed.launch import launch, rank_device
from common.distributed.pipeline import (
    SCHEDULES,
    Action,
    PipelineError,
    Timeline,
    activations_in_flight,
    blocks_per_stage,
    bubble_formula,
    check_schedule,
    gpipe_schedule,
    one_f_one_b_schedule,
    pipeline_step,
    plot_timeline,
    simulate,
    split_into_stages,
)
from common.models.llama import Llama, LlamaConfig

STEPS = 3
SEQ = 8
LR = 0.5
RUNS = (("gpipe", False), ("1f1b", False), ("1f1b", True))  # (schedule, tied embeddings)

# ----------------------------------------------------------------------------------------------------
# Schedules on paper: no processes
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("forward, backward", [(1.0, 2.0), (1.0, 0.5)])
def test_simulated_bubble_is_the_formula(name: str, forward: float, backward: float) -> None:
    """Forward 1 and backward 2 as the papers count; the formula holds for any costs of uniform stages."""
    for p in (1, 2, 3, 4, 6):
        for m in (1, 2, 3, 4, 5, 8, 16):
            timeline = simulate(SCHEDULES[name], p, m, forward, backward)
            # The costs are multiples of 1/2, so every time is exact in float: equal up to the final division.
            assert timeline.makespan == (m + p - 1) * (forward + backward), (p, m)
            assert timeline.bubble_fraction == pytest.approx(bubble_formula(p, m), abs=1e-12), (p, m)


def test_simulated_timeline_respects_dependencies_and_never_overlaps() -> None:
    timeline = simulate(one_f_one_b_schedule, 4, 6, forward_cost=1.0, backward_cost=2.5)
    ended = {(span.stage, span.action): span.end for stage in timeline.spans for span in stage}
    for s, spans in enumerate(timeline.spans):
        assert [span.action for span in spans] == one_f_one_b_schedule(4, 6, s)
        for before, after in zip(spans, spans[1:], strict=False):
            assert before.end <= after.start
        for span in spans:
            assert span.end - span.start == (1.0 if span.action.kind == "F" else 2.5)
            upstream = s - 1 if span.action.kind == "F" else s + 1
            if 0 <= upstream < 4:
                assert span.start >= ended[(upstream, span.action)]


def test_1f1b_holds_at_most_p_microbatches_where_gpipe_holds_m() -> None:
    p, m = 4, 12
    assert activations_in_flight(gpipe_schedule(p, m, 0)) == m
    assert activations_in_flight(one_f_one_b_schedule(p, m, 0)) == p
    # Stage s of 1F1B holds p - s; with fewer micro-batches than stages, both hold all m.
    assert [activations_in_flight(one_f_one_b_schedule(p, m, s)) for s in range(p)] == [4, 3, 2, 1]
    assert activations_in_flight(one_f_one_b_schedule(p, 2, 0)) == 2


def test_schedules_are_the_published_ones() -> None:
    F, B = (lambda i: Action("F", i)), (lambda i: Action("B", i))
    assert gpipe_schedule(2, 3, 1) == [F(0), F(1), F(2), B(0), B(1), B(2)]
    assert one_f_one_b_schedule(3, 4, 0) == [F(0), F(1), F(2), B(0), F(3), B(1), B(2), B(3)]
    assert one_f_one_b_schedule(3, 4, 2) == [F(0), B(0), F(1), B(1), F(2), B(2), F(3), B(3)]
    assert repr(one_f_one_b_schedule(2, 2, 0)) == "[F0, F1, B0, B1]"


def test_bad_schedules_and_deadlocks_are_named() -> None:
    with pytest.raises(PipelineError, match=r"B1 comes before F1"):
        check_schedule([Action("F", 0), Action("B", 1), Action("F", 1), Action("B", 0)], 2)
    with pytest.raises(PipelineError, match=r"runs F0..F1 and B0..B1 once each"):
        check_schedule([Action("F", 0), Action("B", 0)], 2)

    def crossed(p: int, m: int, stage: int) -> list[Action]:
        # Stage 0 waits for B0 before it sends F1; stage 1 needs F1 before it computes B0.
        if stage == 0:
            return [Action("F", 0), Action("B", 0), Action("F", 1), Action("B", 1)]
        return gpipe_schedule(p, m, stage)

    with pytest.raises(
        PipelineError, match=r"deadlocks: each stage waits at \(stage: action\) \{0: B0, 1: F1\}"
    ):
        simulate(crossed, 2, 2)
    with pytest.raises(PipelineError, match=r"at least 1 micro-batch, got n_microbatches=0"):
        gpipe_schedule(2, 0, 0)
    with pytest.raises(PipelineError, match=r"stage must be in 0..1 for 2 stages, got 2"):
        one_f_one_b_schedule(2, 4, 2)


def test_blocks_are_balanced_and_too_few_blocks_is_a_clear_error() -> None:
    assert blocks_per_stage(10, 4) == [3, 3, 2, 2]
    assert blocks_per_stage(4, 4) == [1, 1, 1, 1]
    model = Llama(LlamaConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=64))
    with pytest.raises(PipelineError, match=r"^4 stages need at least 4 blocks; the model has 2\."):
        split_into_stages(model, 4, 0)
    with pytest.raises(PipelineError, match=r"stage must be in 0..1 for 2 stages, got -1"):
        split_into_stages(model, 2, -1)


def test_stages_partition_the_model_under_its_own_names() -> None:
    model = tiny_llama(n_layers=5, tied=False)
    stages = [split_into_stages(model, 3, s) for s in range(3)]
    names = [list(dict(stage.named_parameters())) for stage in stages]
    assert sorted(sum(names, [])) == sorted(dict(model.named_parameters()))
    assert names[0][0] == "tok_embeddings.weight" and names[2][-1] == "output.weight"
    assert [len(stage.layers) for stage in stages] == [2, 2, 1]
    # The stages, chained, are the model: the same operations in the same order, so the same bits.
    g = torch.Generator().manual_seed(0)
    tokens, targets = torch.randint(0, 64, (2, 2, SEQ), generator=g)
    hidden = stages[1](stages[0](tokens))
    assert torch.equal(stages[2](hidden), model(tokens))
    assert torch.equal(stages[2].loss(hidden, targets), model.loss(tokens, targets))
    with pytest.raises(PipelineError, match=r"stage 1 of 3 has no output layer"):
        stages[1].loss(hidden, targets)


def test_plot_timeline_draws_one_row_per_stage_and_a_bar_per_action() -> None:
    timeline = simulate(gpipe_schedule, 3, 4)
    figure = plot_timeline(timeline, "GPipe")
    axes = figure.axes[0]
    assert [label.get_text() for label in axes.get_yticklabels()] == ["stage 0", "stage 1", "stage 2"]
    assert len(axes.collections) == 3 * 2 * 4
    assert axes.get_title() == f"GPipe: bubble {bubble_formula(3, 4):.0%}"


# ----------------------------------------------------------------------------------------------------
# Real steps on gloo ranks, against the single-process model on the full batch
# ----------------------------------------------------------------------------------------------------


def tiny_llama(n_layers: int, tied: bool) -> Llama:
    torch.manual_seed(0)  # every rank, and the reference here, builds the same weights
    config = LlamaConfig(
        vocab_size=64,
        d_model=32,
        n_layers=n_layers,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        max_seq_len=SEQ,
        tie_embeddings=tied,
    )
    return Llama(config)


def batches(n_microbatches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS batches of 2 sequences per micro-batch: (tokens, targets), each (2m, SEQ)."""
    g = torch.Generator().manual_seed(1)
    shape = (2 * n_microbatches, SEQ)
    return [
        (torch.randint(0, 64, shape, generator=g), torch.randint(0, 64, shape, generator=g))
        for _ in range(STEPS)
    ]


def sgd_step(params) -> None:
    """Plain SGD, written out: torch.optim's first use imports torch._dynamo, seconds in every forked rank."""
    with torch.no_grad():
        for param in params:
            param -= LR * param.grad
            param.grad = None


def pipelined_runs(n_layers: int, n_microbatches: int) -> dict:
    """Every run of RUNS on this rank's stage: losses, first-step gradients, final weights, timeline."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = rank_device()
    report = {}
    for name, tied in RUNS:
        stage = split_into_stages(tiny_llama(n_layers, tied).to(device), world, rank)
        actions = SCHEDULES[name](world, n_microbatches, rank)
        losses, first_grads = [], None
        for tokens, targets in batches(n_microbatches):
            result = pipeline_step(stage, actions, tokens.to(device), targets.to(device))
            losses.append(result.loss)
            if first_grads is None:
                first_grads = {n: p.grad.cpu() for n, p in stage.named_parameters()}
            sgd_step(stage.parameters())  # each stage updates its own weights
        params = {n: p.detach().cpu() for n, p in stage.named_parameters()}
        # Accumulation: a second step on the same batch, .grad not zeroed, doubles every gradient.
        pipeline_step(stage, actions, tokens.to(device), targets.to(device))
        once = [p.grad.clone() for p in stage.parameters()]
        pipeline_step(stage, actions, tokens.to(device), targets.to(device))
        twice = [p.grad for p in stage.parameters()]
        report[name, tied] = {
            "losses": losses,
            "grads": first_grads,
            "params": params,
            "accumulation_error": max(
                ((b - 2 * a).abs().max() / a.abs().max()).item() for a, b in zip(once, twice, strict=True)
            ),
            "spans": result.spans,
            "peak_in_flight": result.peak_in_flight,
            "actions": actions,
        }
    return report


def single_process_runs(n_layers: int, n_microbatches: int) -> dict:
    """The reference: the whole model on the whole batch, the same SGD steps; tied and untied embeddings."""
    report = {}
    for tied in sorted({tied for _, tied in RUNS}):  # the model does not depend on the schedule
        model = tiny_llama(n_layers, tied)
        named = dict(model.named_parameters(remove_duplicate=False))  # "output.weight" too, when tied
        losses, first_grads = [], None
        for tokens, targets in batches(n_microbatches):
            loss = model.loss(tokens, targets)
            loss.backward()
            losses.append(loss.item())
            if first_grads is None:
                first_grads = {n: p.grad.clone() for n, p in named.items()}
            sgd_step(model.parameters())
        report[tied] = {
            "losses": losses,
            "grads": first_grads,
            "params": {n: p.detach() for n, p in named.items()},
        }
    return report


# float32 tolerances. The pipelined and the single-process step compute the same sums in different orders
# (per micro-batch, then accumulated, instead of one pass over the batch), so gradients agree to a few ulps
# of the terms they sum: measured at most 3e-8 on entries up to 0.1. rtol 1e-5 (~100 ulps) and atol 1e-6
# (for entries that cancel to ~0) leave a margin of thirty, while a missing 1/m or a lost micro-batch is off
# by tens of percent. SGD is linear in the gradient: after 3 steps of lr 0.5 the weights (up to ~1) differ by
# at most 3 x 0.5 x 3e-8 plus an ulp of rounding per step (~1e-7): measured at most 2.2e-8.
GRAD_TOL = {"rtol": 1e-5, "atol": 1e-6}
PARAM_TOL = {"rtol": 1e-5, "atol": 1e-6}


def check_against_single_process(world: int, pipelined: dict, reference: dict, run: tuple[str, bool]) -> None:
    expected = reference[run[1]]
    # Losses: the sum over micro-batches of their mean loss / m is the batch's mean loss, at every step.
    assert pipelined[world - 1][run]["losses"] == pytest.approx(expected["losses"], rel=1e-6), run
    assert all(pipelined[r][run]["losses"] == [None] * STEPS for r in range(world - 1)), run
    held = []
    for rank in range(world):
        for kind, tolerance in (("grads", GRAD_TOL), ("params", PARAM_TOL)):
            for name, value in pipelined[rank][run][kind].items():
                where = f"{run}, rank {rank}, {kind} of {name}"
                torch.testing.assert_close(value, expected[kind][name], **tolerance, msg=where)
        held += pipelined[rank][run]["params"]
    # Every parameter lives on exactly one stage (a tied matrix on two, as two names of the model).
    assert sorted(held) == sorted(expected["params"]), run


def check_timeline(world: int, pipelined: dict, run: tuple[str, bool]) -> None:
    """Measured spans: in schedule order, one at a time per rank, and after the span they depend on."""
    timeline = Timeline([pipelined[rank][run]["spans"] for rank in range(world)])
    ended = {(span.stage, span.action): span.end for stage in timeline.spans for span in stage}
    for rank, spans in enumerate(timeline.spans):
        assert [span.action for span in spans] == pipelined[rank][run]["actions"], run
        assert all(span.start <= span.end and span.stage == rank for span in spans), run
        for before, after in zip(spans, spans[1:], strict=False):
            assert before.end <= after.start, (run, before, after)
        for (
            span
        ) in spans:  # ranks of one host share perf_counter's clock: a stage starts after its input ended
            upstream = rank - 1 if span.action.kind == "F" else rank + 1
            if 0 <= upstream < world:
                assert span.start >= ended[(upstream, span.action)], (run, span)
    assert 0 < timeline.bubble_fraction < 1


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4], ids=lambda w: f"{w}ranks")
def test_pipelined_training_equals_one_process(world: int) -> None:
    """2 ranks hold 2 + 1 blocks, 4 hold 2 + 1 + 1 + 1; p + 2 micro-batches, so 1F1B holds fewer than GPipe.

    One launch per world size (one test, so that pytest-xdist's workers never launch the same ranks twice).
    """
    # backward(grad) imports sympy on first use (seconds): import it once here, and the forked ranks inherit it
    importlib.import_module("torch.fx.experimental.symbolic_shapes")

    n_layers, n_microbatches = world + 1, world + 2
    pipelined = launch(pipelined_runs, world, args=(n_layers, n_microbatches), timeout_s=120)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference's matmuls are tiny: a pool of threads only slows them down
    try:
        reference = single_process_runs(n_layers, n_microbatches)
    finally:
        torch.set_num_threads(threads)

    for run in RUNS:
        check_against_single_process(world, pipelined, reference, run)
        check_timeline(world, pipelined, run)
        for rank in range(world):  # what the step measured is what the schedule says
            report = pipelined[rank][run]
            assert report["peak_in_flight"] == activations_in_flight(report["actions"]), (run, rank)
        # Relative to each tensor's largest gradient: float addition g + g is exact, and a sum of m terms
        # accumulated onto the same sum rounds differently only in its last bits (< 1e-6). A tied matrix's
        # earlier sum exchanged again would be counted twice: an error of order 1.
        assert max(pipelined[rank][run]["accumulation_error"] for rank in range(world)) < 1e-6, run
    assert pipelined[0]["gpipe", False]["peak_in_flight"] == n_microbatches
    assert pipelined[0]["1f1b", False]["peak_in_flight"] == world
    # Tied embeddings: the first and the last stage's copies took the same steps, to the bit.
    first, last = pipelined[0]["1f1b", True]["params"], pipelined[world - 1]["1f1b", True]["params"]
    assert torch.equal(first["tok_embeddings.weight"], last["output.weight"])


@pytest.mark.gpu
@pytest.mark.distributed
def test_pipelined_training_on_gpus_equals_one_process() -> None:
    """The same steps over NCCL, one GPU per stage, against the same CPU reference.

    cuBLAS and SDPA's GPU kernels sum in other orders than the CPU's, so the tolerances are ten times wider.
    """
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs: one per stage")
    importlib.import_module("torch.fx.experimental.symbolic_shapes")
    pipelined = launch(pipelined_runs, 2, args=(3, 4), backend="nccl", timeout_s=300)
    reference = single_process_runs(3, 4)
    for run in RUNS:
        expected = reference[run[1]]
        assert pipelined[1][run]["losses"] == pytest.approx(expected["losses"], rel=1e-5), run
        for rank in range(2):
            for kind in ("grads", "params"):
                for name, value in pipelined[rank][run][kind].items():
                    torch.testing.assert_close(
                        value, expected[kind][name], rtol=1e-4, atol=1e-5, msg=f"{run} {name}"
                    )


def refusals() -> list[str]:
    """pipeline_step's clear errors, raised on every rank before any message is sent (so none waits)."""
    rank, messages = dist.get_rank(), []
    tokens = torch.zeros(5, SEQ + 1, dtype=torch.long)
    cases = [  # (stages, tokens, targets)
        (3, tokens[:4, :SEQ], tokens[:4, :SEQ]),
        (2, tokens[:, :SEQ], tokens[:, :SEQ]),
        (2, tokens[:4], tokens[:4]),
        (2, tokens[:4, :SEQ], tokens[:, :SEQ]),
    ]
    for n_stages, batch, targets in cases:
        stage = split_into_stages(tiny_llama(3, False), n_stages, rank)
        try:
            pipeline_step(stage, gpipe_schedule(n_stages, 2, rank), batch, targets)
            messages.append("no error")
        except PipelineError as error:
            messages.append(str(error))
    return messages


@pytest.mark.distributed
def test_pipeline_step_refuses_what_it_cannot_run() -> None:
    world, batch, length, targets = launch(refusals, 2, timeout_s=60)[1]
    assert world.startswith("pipeline_step runs stage s on rank s, so 3 stages need 3 ranks; the group has 2")
    assert batch.startswith("a batch of 5 sequences does not split into 2 equal micro-batches")
    assert length.startswith(f"sequence length {SEQ + 1} exceeds max_seq_len={SEQ}; raise max_seq_len")
    assert targets.startswith(f"targets (5, {SEQ}) must have the shape of tokens (4, {SEQ})")
