"""Pipeline parallelism: GPipe and 1F1B, applied to a plain `Llama`, with schedules you can print and draw.

    stage = split_into_stages(model, n_stages=4, stage=rank)          # this rank's consecutive blocks
    actions = one_f_one_b_schedule(n_stages=4, n_microbatches=8, stage=rank)
    print(actions)                                                   # rank 0: [F0, F1, F2, F3, B0, F4, B1, ...]
    result = pipeline_step(stage, actions, tokens, targets)          # one step's gradients, on every stage
    optimizer.step()                                                 # each stage updates its own weights

    timeline = simulate(one_f_one_b_schedule, n_stages=4, n_microbatches=8)   # forward 1, backward 2
    timeline.bubble_fraction                                         # 3/11 = (p - 1)/(m + p - 1)
    plot_timeline(timeline, "1F1B")                                  # one row per stage; or a measured step:
    plot_timeline(Timeline([spans_of_rank[r] for r in range(4)]))    # result.spans gathered from the ranks

A model too large for one GPU can be cut by depth: rank 0 holds the embedding and the first blocks, the last
rank the last blocks, the final norm, the output layer and the loss; activations travel forward from stage to
stage, and their gradients travel back. What you will learn:

- Cutting a model (section 1). Stages are consecutive blocks, balanced: their counts differ by at most one,
  and the extra blocks go to the first stages, because the last stage also carries the output layer (in a
  large-vocabulary model its matmul costs more than a block) while the first stage's embedding is a lookup
  that costs nothing. A stage keeps the model's own parameter names ("layers.5.attention.wq.weight"), so its
  state dict is a piece of the model's.
- The bubble (sections 2 and 3). One batch through p stages keeps one stage busy at a time: p - 1 of them
  idle. GPipe (Huang et al. 2019) cuts the batch into m micro-batches that follow each other through the
  stages: all forwards, then all backwards. With a forward costing 1 and a backward 2, each stage works
  3m and waits for the pipeline to fill and to drain, so the step takes 3(m + p - 1) and the idle fraction,
  the bubble, is (p - 1)/(m + p - 1): small only when m >> p. (Narayanan et al. quote the same bubble as
  (p - 1)/m, bubble time over compute time.)
- Memory (section 2). GPipe's first stage runs all m forwards before its first backward, so it keeps the
  activations of m micro-batches alive, and m must be large for a small bubble. 1F1B (PipeDream-Flush,
  Narayanan et al. 2021) starts each micro-batch's backward as early as possible: stage s runs p - s - 1
  warm-up forwards, then alternates one forward and one backward, then drains. Same bubble, but at most
  p micro-batches in flight on the first stage whatever m is: that is why 1F1B exists.
- Schedules as data. A schedule is each stage's ordered list of actions (forward i, backward i). The same
  list drives a unit-cost simulation (section 3) and the real step (section 4), whose measured timeline is
  drawn like the simulated one (section 5), so theory and measurement sit side by side.
- Point-to-point (section 4). A stage never waits for its neighbour to take a message. A blocking `send`
  returns only once the receiver has posted its `recv` (on gloo even for 16 numbers), so in 1F1B stage s
  would send its activation to s + 1 while s + 1 sends its gradient to s, each waiting for the other to
  receive: deadlock. Sends are therefore posted asynchronously, and a send is held back until the stage's
  next receive: when both go to the same neighbour they are posted together (`_Mailbox`), because NCCL runs
  the messages between two ranks in the order they were posted.
- Exact gradients. Each micro-batch's loss is divided by m, so the gradients accumulated over the
  micro-batches are the full batch's mean-loss gradients: the tests check them, and the weights after
  several SGD steps, against the single-process model.
- Tied embeddings. When the output layer reuses the embedding matrix, the first and the last stage each hold
  a copy; each computes part of its gradient, and they exchange and add them (Megatron's "embedding group"),
  so both copies take the same step and stay equal.

What this leaves out (torch.distributed.pipelining has it): interleaved stages (several chunks per rank,
a smaller bubble), zero-bubble schedules that split the backward into input and weight gradients,
building each stage on the meta device so no rank ever holds the whole model (here every rank builds the
model and keeps its part), mixed-precision activations, and composing with data parallelism.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist
from torch import nn

from common.errors import EffdlError
from common.models.llama import Llama

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "SCHEDULES",
    "Action",
    "PipelineError",
    "PipelineStage",
    "Span",
    "StepResult",
    "Timeline",
    "activations_in_flight",
    "blocks_per_stage",
    "bubble_formula",
    "check_schedule",
    "gpipe_schedule",
    "one_f_one_b_schedule",
    "pipeline_step",
    "plot_timeline",
    "simulate",
    "split_into_stages",
]


class PipelineError(EffdlError, ValueError):
    """A pipeline asked for something it cannot do (too few blocks, a bad schedule); the message says the fix."""


# ----------------------------------------------------------------------------------------------------
# 1. Stages: consecutive blocks of the model, one piece per rank
# ----------------------------------------------------------------------------------------------------


def _check_stage(n_stages: int, stage: int) -> None:
    if n_stages < 1:
        raise PipelineError(f"n_stages must be at least 1, got {n_stages}")
    if not 0 <= stage < n_stages:
        raise PipelineError(f"stage must be in 0..{n_stages - 1} for {n_stages} stages, got {stage}")


def blocks_per_stage(n_blocks: int, n_stages: int) -> list[int]:
    """How many blocks each stage gets: as equal as possible, the extra ones to the first stages."""
    _check_stage(n_stages, 0)
    if n_blocks < n_stages:
        raise PipelineError(
            f"{n_stages} stages need at least {n_stages} blocks; the model has {n_blocks}. "
            f"Use at most {n_blocks} stages, or a model with more layers"
        )
    return [n_blocks // n_stages + (s < n_blocks % n_stages) for s in range(n_stages)]


class PipelineStage(nn.Module):
    """One stage of a Llama: the model's own modules (not copies), under the model's own names.

    Input: tokens (b, s) on the first stage, hidden states (b, s, d_model) on the others. forward returns
    hidden states (b, s, d_model) to send on, or, on the last stage, logits (b, s, vocab) as Llama.forward;
    loss (last stage only) is Llama.loss: the model's own head_loss, the Triton kernel's when it uses them.
    """

    def __init__(self, model: Llama, n_stages: int, stage: int) -> None:
        super().__init__()
        _check_stage(n_stages, stage)
        counts = blocks_per_stage(len(model.layers), n_stages)
        first_block = sum(counts[:stage])
        self.n_stages, self.stage = n_stages, stage
        self.is_first, self.is_last = stage == 0, stage == n_stages - 1
        self.d_model, self.max_seq_len = model.config.d_model, model.config.max_seq_len
        # Tied embeddings: the first and the last stage each hold a copy of the shared matrix (see pipeline_step).
        self.holds_tied_copy = (
            model.config.tie_embeddings and n_stages > 1 and (self.is_first or self.is_last)
        )
        self.tok_embeddings = model.tok_embeddings if self.is_first else None
        # A ModuleDict keyed by the block's index in the model keeps the names: "layers.5.attention.wq.weight".
        self.layers = nn.ModuleDict(
            {str(i): model.layers[i] for i in range(first_block, first_block + counts[stage])}
        )
        self.norm = model.norm if self.is_last else None
        self.output = model.output if self.is_last else None
        self.head_loss = model.head_loss
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def hidden_states(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding (first stage), this stage's blocks, final norm (last stage): (b, s, d_model) out."""
        if self.tok_embeddings is not None:
            x = self.tok_embeddings(x)  # (b, s) -> (b, s, d_model)
        s = x.shape[1]
        for layer in self.layers.values():
            x = layer(x, self.rope_cos[:s], self.rope_sin[:s])
        return self.norm(x) if self.norm is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hidden_states(x)
        return self.output(x) if self.output is not None else x  # last stage: (b, s, vocab)

    def loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy of this micro-batch; the last stage's work. targets (b, s) long."""
        if not self.is_last:
            raise PipelineError(
                f"stage {self.stage} of {self.n_stages} has no output layer: only the last computes the loss"
            )
        return self.head_loss(self.output, self.hidden_states(x), targets)

    def tied_weight(self) -> nn.Parameter:
        """The shared embedding matrix as this stage holds it (the first stage's input, the last's output)."""
        return self.tok_embeddings.weight if self.is_first else self.output.weight


def split_into_stages(model: Llama, n_stages: int, stage: int) -> PipelineStage:
    """This rank's stage of `model`: blocks balanced by blocks_per_stage, plus the embedding on the first
    stage and the final norm and output layer on the last (the loss is computed there by pipeline_step).

    The stage shares its modules with the model: the model's other blocks are freed once it is dropped.
    """
    return PipelineStage(model, n_stages, stage)


# ----------------------------------------------------------------------------------------------------
# 2. Schedules as data: the ordered actions each stage runs
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """Forward ("F") or backward ("B") of one micro-batch on one stage; prints as F3 or B3."""

    kind: Literal["F", "B"]
    microbatch: int

    def __repr__(self) -> str:
        return f"{self.kind}{self.microbatch}"


def _check_sizes(n_stages: int, n_microbatches: int, stage: int) -> None:
    _check_stage(n_stages, stage)
    if n_microbatches < 1:
        raise PipelineError(f"a pipeline needs at least 1 micro-batch, got n_microbatches={n_microbatches}")


def gpipe_schedule(n_stages: int, n_microbatches: int, stage: int) -> list[Action]:
    """GPipe: every forward, then every backward. All m micro-batches' activations are alive at once."""
    _check_sizes(n_stages, n_microbatches, stage)
    m = n_microbatches
    return [Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m)]


def one_f_one_b_schedule(n_stages: int, n_microbatches: int, stage: int) -> list[Action]:
    """1F1B (PipeDream-Flush): warm up with p - s - 1 forwards, alternate forward and backward, drain.

    A stage starts micro-batch i's backward as soon as it can, so it holds at most p - s micro-batches'
    activations; the last stage runs F0 B0 F1 B1 ..., the first holds p.
    """
    _check_sizes(n_stages, n_microbatches, stage)
    m = n_microbatches
    warmup = min(n_stages - stage - 1, m)
    actions = [Action("F", i) for i in range(warmup)]
    for i in range(m - warmup):  # steady state: the forward of one micro-batch, the backward of an older one
        actions += [Action("F", warmup + i), Action("B", i)]
    return actions + [Action("B", i) for i in range(m - warmup, m)]  # drain


Schedule = Callable[[int, int, int], list[Action]]
SCHEDULES: dict[str, Schedule] = {"gpipe": gpipe_schedule, "1f1b": one_f_one_b_schedule}


def check_schedule(actions: Sequence[Action], n_microbatches: int) -> None:
    """Raise PipelineError unless each micro-batch runs one forward, then, later, one backward."""
    expected = {Action(kind, i) for kind in "FB" for i in range(n_microbatches)}
    if len(actions) != len(expected) or set(actions) != expected:
        raise PipelineError(
            f"a schedule of {n_microbatches} micro-batches runs F0..F{n_microbatches - 1} and "
            f"B0..B{n_microbatches - 1} once each, got {list(actions)}"
        )
    forwarded: set[int] = set()
    for action in actions:
        if action.kind == "B" and action.microbatch not in forwarded:
            raise PipelineError(f"{action} comes before F{action.microbatch} in {list(actions)}")
        forwarded.add(action.microbatch)


def activations_in_flight(actions: Sequence[Action]) -> int:
    """The most micro-batches whose forward has run and backward not yet: whose activations are stored."""
    alive = peak = 0
    for action in actions:
        alive += 1 if action.kind == "F" else -1
        peak = max(peak, alive)
    return peak


def bubble_formula(n_stages: int, n_microbatches: int) -> float:
    """The idle fraction of GPipe and 1F1B with uniform stages and free communication: (p-1)/(m+p-1)."""
    return (n_stages - 1) / (n_microbatches + n_stages - 1)


# ----------------------------------------------------------------------------------------------------
# 3. Timelines: simulated with unit costs, or measured (section 4); the bubble is read from either
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """One action as it ran: its stage, and when it started and ended (unit costs, or perf_counter seconds)."""

    stage: int
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class Timeline:
    """What every stage did during one step: spans[s] lists stage s's spans in the order they ran."""

    spans: list[list[Span]]
    unit: str = "s"  # "s" for a measured step; "forward = 1" for a simulation

    @property
    def start(self) -> float:
        return min(span.start for stage in self.spans for span in stage)

    @property
    def makespan(self) -> float:
        return max(span.end for stage in self.spans for span in stage) - self.start

    @property
    def bubble_fraction(self) -> float:
        """The fraction of the stages' time spent idle: 1 - busy / (stages x makespan)."""
        busy = sum(span.end - span.start for stage in self.spans for span in stage)
        return 1.0 - busy / (len(self.spans) * self.makespan)


def simulate(
    schedule: Schedule,
    n_stages: int,
    n_microbatches: int,
    forward_cost: float = 1.0,
    backward_cost: float = 2.0,
) -> Timeline:
    """Run a schedule on paper: each stage takes its actions in order, each as soon as its input is there.

    Forward i on stage s needs forward i on stage s - 1; backward i needs backward i on stage s + 1 (on the
    last stage, its own forward i, which comes first in its list). Sends are free. A schedule whose stages
    wait for each other forever is a PipelineError naming where each one stopped.
    """
    actions = [schedule(n_stages, n_microbatches, s) for s in range(n_stages)]
    for stage_actions in actions:
        check_schedule(stage_actions, n_microbatches)
    finished: dict[tuple[int, Action], float] = {}  # (stage, action) -> when it ended
    spans: list[list[Span]] = [[] for _ in range(n_stages)]
    clock = [0.0] * n_stages  # when each stage is free
    while sum(map(len, spans)) < sum(map(len, actions)):
        progressed = False
        for s in range(n_stages):
            while len(spans[s]) < len(actions[s]):
                action = actions[s][len(spans[s])]
                if action.kind == "F":
                    needs = (s - 1, action) if s > 0 else None
                else:
                    needs = (s + 1, action) if s < n_stages - 1 else None
                if needs is not None and needs not in finished:
                    break
                start = max(clock[s], finished.get(needs, 0.0))
                clock[s] = start + (forward_cost if action.kind == "F" else backward_cost)
                finished[(s, action)] = clock[s]
                spans[s].append(Span(s, action, start, clock[s]))
                progressed = True
        if not progressed:
            stuck = {s: actions[s][len(spans[s])] for s in range(n_stages) if len(spans[s]) < len(actions[s])}
            raise PipelineError(f"the schedule deadlocks: each stage waits at (stage: action) {stuck}")
    return Timeline(spans, unit="forward = 1")


# ----------------------------------------------------------------------------------------------------
# 4. One training step: run this stage's actions, sending activations forward and gradients back
# ----------------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    """What pipeline_step returns on each rank."""

    loss: float | None  # the full batch's mean loss, on the last stage; None on the others
    spans: list[Span]  # this stage's actions, timed with perf_counter (comparable across ranks of one host)
    peak_in_flight: int  # the most micro-batches whose activations this stage held at once


def _now(device: torch.device) -> float:
    """perf_counter, once the GPU has finished what was queued (note: a host-device sync per time stamp)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def pipeline_step(
    stage: PipelineStage,
    actions: Sequence[Action],
    tokens: torch.Tensor,
    targets: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> StepResult:
    """Run this stage's actions for one batch; the stage's parameters' .grad get the full-batch gradients.

    Call it on every rank of the group (stage s on the group's rank s), each with its own stage's actions.
    Every rank passes the batch, tokens and targets (b, s): the first stage embeds the tokens, the last
    scores the targets, and all check its shape, so that a bad batch stops every rank instead of leaving
    some waiting for the others. The batch is cut into m equal micro-batches, m the number of micro-batches
    in `actions`. Gradients accumulate into .grad, as loss.backward() does: zero them before
    (optimizer.zero_grad()) and step the optimizer after, or call it again to accumulate a larger batch.
    """
    world = dist.get_world_size(group)
    if world != stage.n_stages:
        raise PipelineError(
            f"pipeline_step runs stage s on rank s, so {stage.n_stages} stages need {stage.n_stages} ranks; "
            f"the group has {world}. Launch {stage.n_stages} processes, or split the model into {world} stages"
        )
    n_microbatches = len(actions) // 2
    check_schedule(actions, n_microbatches)
    batch, seq = tokens.shape
    if batch % n_microbatches:
        raise PipelineError(
            f"a batch of {batch} sequences does not split into {n_microbatches} equal micro-batches; use a "
            f"number of micro-batches that divides {batch}"
        )
    if seq > stage.max_seq_len:
        raise PipelineError(
            f"sequence length {seq} exceeds max_seq_len={stage.max_seq_len}; raise max_seq_len in the config "
            "(it sizes the rotary tables)"
        )
    if targets.shape != tokens.shape:
        raise PipelineError(
            f"targets {tuple(targets.shape)} must have the shape of tokens {tuple(tokens.shape)}: one next token "
            "per position"
        )
    device = stage.rope_cos.device
    dtype = next(stage.layers.parameters()).dtype  # the dtype of the hidden states that travel
    hidden_shape = (batch // n_microbatches, seq, stage.d_model)  # one micro-batch's activation
    micro_tokens = tokens.view(n_microbatches, batch // n_microbatches, seq)  # (m, b/m, s)
    micro_targets = targets.view(n_microbatches, batch // n_microbatches, seq)  # (m, b/m, s)
    previous, following = stage.stage - 1, stage.stage + 1

    inputs: dict[int, torch.Tensor] = {}  # micro-batch -> what this stage received (its .grad goes back)
    outputs: dict[int, torch.Tensor] = {}  # micro-batch -> what it sent on (or its loss, on the last stage)
    mailbox = _Mailbox(group)
    spans: list[Span] = []
    loss, peak = 0.0, 0
    if stage.holds_tied_copy:  # set aside what .grad held: only this step's part is exchanged (see the end)
        held, stage.tied_weight().grad = stage.tied_weight().grad, None

    dist.barrier(group)  # start together, so that a late rank is not counted as bubble
    for action in actions:
        i = action.microbatch  # the tag of its messages: gloo matches a receive to the send of the same tag
        if action.kind == "F":
            if stage.is_first:
                x = micro_tokens[i]
            else:
                x = torch.empty(hidden_shape, dtype=dtype, device=device)
                mailbox.receive(x, previous, tag=i)
                x.requires_grad_()
            start = _now(device)
            if stage.is_last:  # divided by m, so the sum over micro-batches is the full batch's mean loss
                y = stage.loss(x, micro_targets[i]) / n_microbatches
                loss += y.item()  # note: a host-device sync
            else:
                y = stage(x)
            inputs[i], outputs[i] = x, y
            peak = max(peak, len(outputs))
            end = _now(device)
            if not stage.is_last:
                mailbox.send(y.detach(), following, tag=i)
        else:
            x, y = inputs.pop(i), outputs.pop(i)
            if stage.is_last:
                start = _now(device)
                y.backward()
            else:
                grad = torch.empty_like(y)
                mailbox.receive(grad, following, tag=i)
                start = _now(device)
                y.backward(grad)
            end = _now(device)
            if not stage.is_first:
                mailbox.send(x.grad, previous, tag=i)
        spans.append(Span(stage.stage, action, start, end))
    mailbox.finish()
    if stage.holds_tied_copy:
        _add_tied_gradients(stage, group, held)
    return StepResult(loss if stage.is_last else None, spans, peak)


class _Mailbox:
    """One stage's point-to-point messages in a step: asynchronous sends, each held back until the next
    receive and posted in one batch with it when both go to the same neighbour.

    On NCCL the sends and receives between two ranks run in the order they were posted. In 1F1B's steady
    state stage s sends an activation to s + 1 and then receives a gradient from it, while s + 1 sends that
    gradient and then receives the activation: posted one by one, each send would wait for a receive queued
    behind the other's send, once messages outgrow NCCL's buffers. Posted together (`batch_isend_irecv`,
    Megatron's send_forward_recv_backward) they proceed at once. Sends complete in the background; their
    tensors are kept alive until they have.
    """

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.held: tuple[torch.Tensor, int, int] | None = None  # (tensor, neighbour, tag) not posted yet
        self.in_flight: list[tuple[dist.Work, torch.Tensor]] = []

    def send(self, tensor: torch.Tensor, neighbour: int, tag: int) -> None:
        self._post_held()
        self.held = (tensor, neighbour, tag)

    def receive(self, buffer: torch.Tensor, neighbour: int, tag: int) -> None:
        """Fill `buffer` from `neighbour` (returns once it has arrived), posting the held send with it."""
        if self.held is not None and self.held[1] != neighbour:
            self._post_held()
        ops = [dist.P2POp(dist.irecv, buffer, group=self.group, group_peer=neighbour, tag=tag)]
        if self.held is not None:
            tensor, _, send_tag = self.held
            ops.insert(
                0, dist.P2POp(dist.isend, tensor, group=self.group, group_peer=neighbour, tag=send_tag)
            )
            self.held = None
        works = dist.batch_isend_irecv(ops)
        if len(ops) == 2:
            self.in_flight.append((works[0], ops[0].tensor))
        works[-1].wait()
        self.in_flight = [(work, tensor) for work, tensor in self.in_flight if not work.is_completed()]

    def finish(self) -> None:
        """Post what is held and wait until every send has gone."""
        self._post_held()
        for work, _ in self.in_flight:
            work.wait()
        self.in_flight = []

    def _post_held(self) -> None:
        if self.held is not None:
            tensor, neighbour, tag = self.held
            self.in_flight.append(
                (dist.isend(tensor, group=self.group, group_dst=neighbour, tag=tag), tensor)
            )
            self.held = None


def _add_tied_gradients(
    stage: PipelineStage, group: dist.ProcessGroup | None, held: torch.Tensor | None
) -> None:
    """First and last stage swap their parts of this step's gradient of the shared matrix and both add the
    other's, then what .grad held before the step.

    a + b and b + a are the same float, so both copies get the same gradient and take the same step.
    Exchanging .grad with an earlier step's sum still in it would add that sum twice.
    """
    weight = stage.tied_weight()
    grad = weight.grad
    other = torch.empty_like(grad)
    peer = stage.n_stages - 1 if stage.is_first else 0
    ops = [
        dist.P2POp(dist.isend, grad, group=group, group_peer=peer),
        dist.P2POp(dist.irecv, other, group=group, group_peer=peer),
    ]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    grad += other
    if held is not None:
        weight.grad = held.add_(grad)


# ----------------------------------------------------------------------------------------------------
# 5. Drawing a timeline: one row per stage, forwards light, backwards dark
# ----------------------------------------------------------------------------------------------------


def plot_timeline(timeline: Timeline, title: str = "") -> Figure:
    """A Gantt chart of the timeline, the bubble fraction in the title; returns the matplotlib Figure."""
    from matplotlib.figure import Figure  # imported here: drawing is the only part that needs matplotlib
    from matplotlib.patches import Patch

    n_stages = len(timeline.spans)
    scale, unit = (1e3, "ms") if timeline.unit == "s" else (1.0, timeline.unit)  # a measured step lasts ms
    figure = Figure(figsize=(10, 0.5 + 0.5 * n_stages), layout="constrained")
    axes = figure.add_subplot()
    colors = {"F": "#9ecae1", "B": "#3182bd"}
    for s, stage_spans in enumerate(timeline.spans):
        for span in stage_spans:
            left, width = scale * (span.start - timeline.start), scale * (span.end - span.start)
            axes.broken_barh(
                [(left, width)], (s - 0.4, 0.8), facecolors=colors[span.action.kind], edgecolor="k"
            )
            axes.text(left + width / 2, s, str(span.action.microbatch), ha="center", va="center", fontsize=8)
    axes.set_yticks(range(n_stages), [f"stage {s}" for s in range(n_stages)])
    axes.invert_yaxis()  # stage 0 on top
    axes.set_xlabel(f"time ({unit})")
    legend = [
        Patch(facecolor=colors[kind], edgecolor="k", label=label)
        for kind, label in (("F", "forward"), ("B", "backward"))
    ]
    axes.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    heading = f"bubble {timeline.bubble_fraction:.0%}"
    axes.set_title(f"{title}: {heading}" if title else heading)
    return figure
