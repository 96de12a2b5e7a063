"""ZeRO-1, ZeRO-2 (common.distributed.zero) and FSDP2 (common.distributed.fsdp) on 2 and 4 gloo ranks.

The reference is one process training the same Llama on the whole global batch with the same torch.optim
optimizer and param groups, computed here in the test process after the ranks have run (a process that has
run a backward pass on a GPU machine cannot fork ranks that run autograd). Every scheme must give the same
loss at every step and the same parameters after the last one, and each rank's optimizer state must be its
shard of the reference's state, and no more. One launch per world size runs every scheme.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo  # noqa: F401  torch.optim and FSDP import it on first use (seconds): here once, the ranks inherit it
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from common.distributed.fsdp import (
    apply_fsdp,
    full_parameters,
    load_checkpoint,
    local_slice,
    save_checkpoint,
    train_steps,
)
from common.distributed.launch import launch
from common.distributed.zero import ZeroOptimizer, shard_numel
from common.errors import EffdlError
from common.models.llama import Llama, LlamaConfig, count_parameters

WORLD_SIZES = (2, 4)
# d_model 30: the norms' 30 weights and the embeddings' 61 x 30 do not divide by 4, so the last rank's shard
# is padded (at 2 ranks every size is even; the odd-sized Linear below pads there).
CONFIG = LlamaConfig(vocab_size=61, d_model=30, n_layers=2, n_heads=5, n_kv_heads=1, d_ff=44, max_seq_len=16)
STEPS, BATCH, SEQ = 3, 4, 8  # 4 sequences per global batch: 2 or 1 on each rank
OPTIMIZERS = {  # name -> (class, options); AdamW's weight decay is set per param group
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "betas": (0.9, 0.95)}),
    "sgd": (torch.optim.SGD, {"lr": 0.5, "momentum": 0.9}),
}
# name -> (how, optimizer); fsdp2 frees each block's gathered weights after its forward, fsdp2_keep not, and
# fsdp2_half keeps a shard over half the ranks (reshard_after_forward=p/2: a divisor other than 1 and p, so
# at 2 ranks it is plain fsdp2)
SCHEMES = {
    "zero1_adamw": ("zero1", "adamw"),
    "zero1_sgd": ("zero1", "sgd"),
    "zero2_adamw": ("zero2", "adamw"),
    "zero2_sgd": ("zero2", "sgd"),
    "fsdp2_adamw": ("fsdp2", "adamw"),
    "fsdp2_keep_sgd": ("fsdp2_keep", "sgd"),
    "fsdp2_half_sgd": ("fsdp2_half", "sgd"),
}
STATE_KEYS = {"adamw": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",)}


def fresh_model() -> Llama:
    torch.manual_seed(0)  # every rank and the reference build the same weights
    return Llama(CONFIG)


def param_groups(model: nn.Module, optimizer: str) -> list[dict]:
    """Two groups, as in practice: matrices with weight decay, norm weights without (AdamW only)."""
    params = list(model.parameters())
    decay = 0.1 if optimizer == "adamw" else 0.0
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(CONFIG.vocab_size, (BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]
    return [(d[:, :-1], d[:, 1:]) for d in data]


def make_optimizer(model: nn.Module, how: str, optimizer: str):
    cls, options = OPTIMIZERS[optimizer]
    groups = param_groups(model, optimizer)
    if how in ("zero1", "zero2"):
        return ZeroOptimizer(groups, cls, stage=int(how[-1]), **options)
    return cls(groups, **options)


def optimizer_states(optimizer, optimizer_name: str) -> list[dict[str, torch.Tensor]]:
    """Per parameter in group order: the state tensors this rank holds (a ZeroOptimizer's are its shards)."""
    inner = optimizer.optimizer if isinstance(optimizer, ZeroOptimizer) else optimizer
    return [
        {key: _local(inner.state[p][key]).clone() for key in STATE_KEYS[optimizer_name]}
        for group in inner.param_groups
        for p in group["params"]
    ]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def stage2_frees_full_gradients() -> dict:
    """After a stage-2 backward: no parameter holds a gradient; each shard holds ceil(n / p) averaged values.
    A second backward without zero_grad accumulates into the shards: the same batch twice gives twice the
    gradient (the same sums in the same order, and x + x = 2x exactly)."""
    model = fresh_model()
    optimizer = ZeroOptimizer(model.parameters(), torch.optim.AdamW, stage=2, lr=1e-3)
    tokens, targets = batches()[0]
    model.loss(local_slice(tokens), local_slice(targets)).backward()
    once = [s.shard.grad.clone() for s in optimizer.shards]
    report = {
        "param_grads": sum(p.grad is not None for p in model.parameters()),
        "shard_grad_sizes_ok": all(
            s.shard.grad.numel() == shard_numel(s.param.numel(), dist.get_world_size())
            for s in optimizer.shards
        ),
    }
    model.loss(local_slice(tokens), local_slice(targets)).backward()
    report["accumulated_twice"] = all(
        torch.equal(s.shard.grad, 2 * g) for s, g in zip(optimizer.shards, once, strict=True)
    )
    return report


def odd_sizes_train(stage: int) -> list[torch.Tensor]:
    """A Linear of 5 x 3 weights and 3 biases (neither divides by 2 or 4) trained 3 AdamW steps."""
    torch.manual_seed(2)
    model = nn.Linear(5, 3)
    optimizer = ZeroOptimizer(model.parameters(), torch.optim.AdamW, stage=stage, lr=0.1)
    g = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        x = torch.randn(4, 5, generator=g)
        model(local_slice(x)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def run_every_scheme() -> dict:
    """On each rank: every scheme's losses, final parameters (whole) and optimizer state (this rank's)."""
    report: dict = {}
    for scheme, (how, optimizer_name) in SCHEMES.items():
        model = fresh_model()
        if how.startswith("fsdp2"):
            world = dist.get_world_size()
            half = world // 2 if world >= 4 else True
            apply_fsdp(
                model, reshard_after_forward={"fsdp2": True, "fsdp2_keep": False, "fsdp2_half": half}[how]
            )
        optimizer = make_optimizer(model, how, optimizer_name)
        losses = train_steps(model, optimizer, batches())
        report[scheme] = {
            "losses": losses,
            "params": full_parameters(model),
            "states": optimizer_states(optimizer, optimizer_name),
        }
        if isinstance(optimizer, ZeroOptimizer):
            report[scheme]["state_bytes"] = optimizer.state_bytes()
    report["stage2_backward"] = stage2_frees_full_gradients()
    report["odd_sizes"] = {stage: odd_sizes_train(stage) for stage in (1, 2)}
    return report


def reference(optimizer_name: str) -> dict:
    """One process, the whole batch, plain torch.optim: losses, parameters and each parameter's state."""
    model = fresh_model()
    cls, options = OPTIMIZERS[optimizer_name]
    optimizer = cls(param_groups(model, optimizer_name), **options)
    losses = train_steps(model, optimizer, batches(), data_parallel=False)
    return {
        "losses": losses,
        "params": full_parameters(model),
        "states": optimizer_states(optimizer, optimizer_name),
    }


def odd_sizes_reference() -> list[torch.Tensor]:
    torch.manual_seed(2)
    model = nn.Linear(5, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        model(torch.randn(4, 5, generator=g)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach() for p in model.parameters()]


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"{w}ranks")
def runs(request) -> tuple[int, dict[int, dict], dict[str, dict]]:
    """(world size, each rank's report, the single-process references): one launch per world size."""
    by_rank = launch(run_every_scheme, request.param, timeout_s=300)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks: tiny matmuls, and the same summation order as theirs
    try:
        references = {name: reference(name) for name in OPTIMIZERS}
        references["odd_sizes"] = odd_sizes_reference()
    finally:
        torch.set_num_threads(threads)
    return request.param, by_rank, references


# float32 tolerances. Each scheme computes the reference's gradients as sums in another order (a mean over
# 1 or 2 sequences per rank, then a sum over ranks of gradients pre-multiplied by 1/p, where the reference
# takes one mean over 4), so the first step's gradients differ by a few ulps of their terms. SGD passes that
# on linearly: measured at most 4.5e-8 in a parameter after 3 steps (entries up to 0.19); rtol 1e-5 and atol
# 1e-6 leave a margin of 20. AdamW amplifies it: an entry whose gradient is near eps = 1e-8 moves by up to
# lr = 1e-2 per step whatever its sign, so an ulp of gradient can become ~1e-6 of parameter, and later steps
# compute gradients at parameters that differ that much: measured at most 3.8e-6 (4 ranks), so atol 2e-5.
# Optimizer states, relative to each tensor's largest entry: measured at most 1.7e-5 (exp_avg, 4 ranks),
# tolerance 1e-4. What a mistake gives is far larger: a wrong shard or padding leaking into a parameter is
# off by whole steps (lr), a missing 1/p multiplies SGD's updates and AdamW's exp_avg by p (AdamW's update
# itself does not change with the gradient's scale: that is why SGD is tested too).
LOSS_RTOL = 1e-5
PARAM_TOL = {"adamw": {"rtol": 1e-4, "atol": 2e-5}, "sgd": {"rtol": 1e-5, "atol": 1e-6}}
STATE_RTOL = 1e-4  # of the state tensor's largest entry


def relative_to_largest(got: torch.Tensor, expected: torch.Tensor, whole: torch.Tensor) -> float:
    return ((got - expected).abs().max() / whole.abs().max()).item()


@pytest.mark.distributed
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_each_scheme_trains_like_one_process(runs, scheme: str) -> None:
    world, by_rank, references = runs
    expected = references[SCHEMES[scheme][1]]
    for rank, report in by_rank.items():
        got = report[scheme]
        assert got["losses"] == pytest.approx(expected["losses"], rel=LOSS_RTOL), (world, rank)
        assert got["params"].keys() == expected["params"].keys()
        for name, value in got["params"].items():
            torch.testing.assert_close(
                value,
                expected["params"][name],
                **PARAM_TOL[SCHEMES[scheme][1]],
                msg=f"{scheme}, {world} ranks, rank {rank}: {name}",
            )


@pytest.mark.distributed
@pytest.mark.parametrize("scheme", ["zero1_adamw", "zero1_sgd", "zero2_adamw", "zero2_sgd"])
def test_each_rank_holds_only_its_shard_of_the_optimizer_state(runs, scheme: str) -> None:
    """The bytes: ceil(n / p) per parameter and state, 1/p of the model plus padding. The values: this
    rank's slice of the reference's state, the padding zero."""
    world, by_rank, references = runs
    optimizer_name = SCHEMES[scheme][1]
    expected = references[optimizer_name]["states"]
    keys = STATE_KEYS[optimizer_name]
    sizes = [state[keys[0]].numel() for state in expected]
    sharded = sum(shard_numel(n, world) for n in sizes) * len(keys) * 4
    assert sum(sizes) == count_parameters(CONFIG)
    assert sharded < len(keys) * 4 * (count_parameters(CONFIG) / world + len(sizes))  # padding < 1 per tensor
    for rank, report in by_rank.items():
        assert report[scheme]["state_bytes"] == sharded
        for got, want in zip(report[scheme]["states"], expected, strict=True):
            for key in keys:
                size = shard_numel(want[key].numel(), world)
                padding = want[key].new_zeros(size * world - want[key].numel())
                mine = torch.cat([want[key].reshape(-1), padding])[rank * size : (rank + 1) * size]
                assert got[key].shape == mine.shape, (scheme, rank, key)
                assert relative_to_largest(got[key], mine, want[key]) < STATE_RTOL, (scheme, rank, key)


@pytest.mark.distributed
def test_fsdp2_optimizer_state_is_sharded_too(runs) -> None:
    world, by_rank, references = runs
    whole = sum(state["exp_avg"].numel() for state in references["adamw"]["states"])
    for report in by_rank.values():
        local = sum(state["exp_avg"].numel() for state in report["fsdp2_adamw"]["states"])
        assert local <= math.ceil(whole / world) + CONFIG.d_model * 10  # dim-0 shards, uneven by < 1 row each


@pytest.mark.distributed
def test_stage2_keeps_only_gradient_shards_and_accumulates_them(runs) -> None:
    _, by_rank, _ = runs
    for report in by_rank.values():
        assert report["stage2_backward"] == {
            "param_grads": 0,
            "shard_grad_sizes_ok": True,
            "accumulated_twice": True,
        }


@pytest.mark.distributed
def test_sizes_that_do_not_divide_are_padded(runs) -> None:
    world, by_rank, references = runs
    for rank, report in by_rank.items():
        for stage, params in report["odd_sizes"].items():
            for got, want in zip(params, references["odd_sizes"], strict=True):
                where = f"stage {stage}, rank {rank} of {world}"
                torch.testing.assert_close(got, want, **PARAM_TOL["adamw"], msg=where)


def fsdp2_with_a_checkpoint(path: str, resume: bool) -> dict:
    """FSDP2 with AdamW over STEPS + 2 batches: resume=False trains the first STEPS, saves a DCP checkpoint
    to path and trains on; resume=True loads that checkpoint into a fresh model and trains the last 2."""
    model = apply_fsdp(fresh_model())
    cls, options = OPTIMIZERS["adamw"]
    optimizer = cls(model.parameters(), **options)
    data = batches() + batches()[:2]  # two more steps, on batches the model has seen once
    if resume:
        load_checkpoint(model, optimizer, path)
    else:
        train_steps(model, optimizer, data[:STEPS])
        save_checkpoint(model, optimizer, path)
    losses = train_steps(model, optimizer, data[STEPS:])
    return {"losses": losses, "params": full_parameters(model)}


@pytest.mark.distributed
def test_fsdp2_checkpoint_saved_on_4_ranks_resumes_on_2(tmp_path) -> None:
    """Loaded on 2 ranks, the checkpoint of 4 continues as the 4 ranks did. The two runs reduce their
    gradients over 2 and 4 ranks, so they agree to PARAM_TOL's fp32 rounding, not bit for bit; a run that
    lost the optimizer's state (AdamW's moments, its step count) or took a wrong shard is off by whole steps."""
    uninterrupted = launch(fsdp2_with_a_checkpoint, 4, args=(str(tmp_path), False), timeout_s=300)[0]
    resumed = launch(fsdp2_with_a_checkpoint, 2, args=(str(tmp_path), True), timeout_s=300)
    for rank, report in resumed.items():
        assert report["losses"] == pytest.approx(uninterrupted["losses"], rel=LOSS_RTOL), rank
        for name, value in report["params"].items():
            torch.testing.assert_close(value, uninterrupted["params"][name], **PARAM_TOL["adamw"], msg=name)
    # The checkpoint mattered: a fresh model's loss on these batches is far from the trained one's.
    first_loss = reference("adamw")["losses"][0]
    assert abs(uninterrupted["losses"][0] - first_loss) > 0.05


def test_bad_arguments_are_clear_errors() -> None:
    params = list(nn.Linear(2, 2).parameters())
    with pytest.raises(
        ValueError, match="stage=3: ZeroOptimizer implements stage 1 .* use common.distributed.fsdp"
    ):
        ZeroOptimizer(params, torch.optim.AdamW, stage=3)
    with pytest.raises(ValueError, match="LBFGS does not update each element on its own"):
        ZeroOptimizer(params, torch.optim.LBFGS)
    with pytest.raises(ValueError, match=r"a parameter of shape \(2, 2\) appears twice \(param group 1\)"):
        ZeroOptimizer([{"params": params}, {"params": params[:1]}], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="empty parameter list"):
        ZeroOptimizer([], torch.optim.SGD, lr=0.1)
    with pytest.raises(EffdlError, match="apply_fsdp wraps a common.models.llama.Llama"):
        apply_fsdp(nn.Linear(2, 2))
