"""common.distributed.tensor_parallel on 2 and 4 gloo ranks (and NCCL GPUs), each variant against one process.

The reference is the plain single-process Llama, built from the same seed, trained on the same batches:
every variant (Megatron tensor parallelism, with sequence parallelism, both through torch's DTensor API too,
Ulysses) must give its logits, its loss and every parameter's gradient (gathered back to full shape), at
each of two SGD steps. One launch per world size runs all the variants and the size errors; the tests below
read its report.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
import torch._dynamo  # noqa: F401  DTensor imports it on first use (seconds): here once, the ranks inherit it
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from common.distributed.ddp import apply_ddp
from common.distributed.launch import launch, rank_device
from common.distributed.tensor_parallel import (
    apply_tensor_parallel,
    apply_tensor_parallel_dtensor,
    apply_ulysses,
    bytes_sent_per_rank,
    communication_volume,
    count_collectives,
    full_gradients,
    gather_shards,
    shard_sequence,
)
from common.errors import EffdlError
from common.models.llama import Llama, LlamaConfig, count_parameters

WORLD_SIZES = (2, 4)
# Heads (8), kv heads (4), d_ff (96) and the sequence (16) all divide by 4; 2 layers, so that a block's
# output feeds another block's collectives.
CONFIG = LlamaConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=96, max_seq_len=32)
BATCH, SEQ = 2, 16
VARIANTS = ("tp", "tp_sp", "dtensor", "dtensor_sp", "ulysses")
# float32 throughout. The variants compute the same sums as the single process in another order (a matmul's
# inner sum cut into p partial sums that an all-reduce adds; a norm's weight gradient summed by shards), and
# a reordered sum of K terms moves by at most about K eps sum|terms| (eps = 1.2e-7, K <= 96 here) at each of
# a few layers: up to 7.4e-7 of each tensor's largest entry is what we see. 1e-5 of it leaves >10x
# headroom, and is far below what any real mistake gives (a missing all-reduce, or one too many, changes
# gradients by a factor of p; a wrong slice changes them by O(1)).
RELATIVE_TOLERANCE = 1e-5
STEPS, LR = 2, 0.5  # the second step runs on weights that the first updated, shard by shard on every rank


def fresh_model(config: LlamaConfig = CONFIG) -> Llama:
    torch.manual_seed(0)
    return Llama(config).to(rank_device())


def relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    if got.shape != expected.shape:
        return float("inf")
    return ((got - expected).abs().max() / expected.abs().max()).item()


def block_weights_on_this_rank(model: Llama) -> int:
    return sum(
        p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.layers.parameters()
    )


def parallelize(model: Llama, variant: str) -> Llama:
    if variant == "tp":
        apply_tensor_parallel(model)
    elif variant == "tp_sp":
        apply_tensor_parallel(model, sequence_parallel=True)
    elif variant in ("dtensor", "dtensor_sp"):
        mesh = init_device_mesh(rank_device().type, (dist.get_world_size(),))
        apply_tensor_parallel_dtensor(model, mesh, sequence_parallel=variant == "dtensor_sp")
    elif variant == "ulysses":
        apply_ulysses(model)
        apply_ddp(model)
    return model


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS batches of (tokens, targets), the same on every rank; targets shifted on the whole sequence."""
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(CONFIG.vocab_size, (BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]
    return [(d[:, :-1].to(rank_device()), d[:, 1:].to(rank_device())) for d in data]


def train(model: Llama, variant: str) -> list[dict]:
    """STEPS steps of SGD; each step's logits, loss, full gradients and what it passed to the collectives."""
    steps = []
    for tokens, targets in batches():
        if variant == "ulysses":
            tokens, targets = shard_sequence(tokens), shard_sequence(targets)  # (b, s/p): this rank's slice
        logits = model(tokens)
        with count_collectives() as counts:  # a training step: forward and backward of the loss
            loss = model.loss(tokens, targets)
            loss.backward()
        if variant == "ulysses":  # the slices back together; the mean of the ranks' means is the mean
            logits, loss = gather_shards(logits, 1), gather_shards(loss[None], 0).mean()
        steps.append(
            {
                "logits": logits.detach(),
                "loss": loss.detach(),
                "grads": full_gradients(model),
                "counts": counts,
            }
        )
        with torch.no_grad():  # each rank updates what it holds: its shards, and the replicated weights alike
            for param in model.parameters():
                param -= LR * param.grad
                param.grad = None
    return steps


def error_of(make_error) -> str:
    try:
        make_error()
    except EffdlError as error:  # ParallelSizeError is one
        return str(error)
    return "no error"


def size_errors(tokens: torch.Tensor) -> dict[str, str]:
    """The errors for sizes that don't split, all raised before any collective (on every rank alike)."""
    small = dict(vocab_size=16, n_layers=1, max_seq_len=32)
    three_heads = LlamaConfig(d_model=48, n_heads=3, n_kv_heads=3, d_ff=64, **small)
    one_kv_head = LlamaConfig(d_model=64, n_heads=8, n_kv_heads=1, d_ff=64, **small)
    odd_ff = LlamaConfig(d_model=64, n_heads=8, n_kv_heads=4, d_ff=97, **small)
    odd_tokens = tokens[:, : SEQ - 1]  # 15 positions: divisible by neither 2 nor 4
    mesh = init_device_mesh(rank_device().type, (dist.get_world_size(),))
    sequence_parallel = apply_tensor_parallel(fresh_model(), sequence_parallel=True)
    # the kernels take head_dim 64 or 128 only
    kernels = fresh_model(dataclasses.replace(CONFIG, d_model=256, n_heads=4, n_kv_heads=4, use_kernels=True))
    tied = fresh_model(dataclasses.replace(CONFIG, tie_embeddings=True))
    tensor_parallel_once = apply_tensor_parallel(fresh_model())
    ulysses_once = apply_ulysses(fresh_model())
    short = apply_ulysses(fresh_model(dataclasses.replace(CONFIG, max_seq_len=SEQ - 1)))
    return {
        "tp not a llama": error_of(lambda: apply_tensor_parallel(torch.nn.Linear(4, 4))),
        "tp n_heads": error_of(lambda: apply_tensor_parallel(Llama(three_heads))),
        "tp n_kv_heads": error_of(lambda: apply_tensor_parallel(Llama(one_kv_head))),
        "tp d_ff": error_of(lambda: apply_tensor_parallel(Llama(odd_ff))),
        "dtensor n_heads": error_of(lambda: apply_tensor_parallel_dtensor(Llama(three_heads), mesh)),
        "dtensor_sp kernels": error_of(
            lambda: apply_tensor_parallel_dtensor(kernels, mesh, sequence_parallel=True)
        ),
        "dtensor_sp tied": error_of(
            lambda: apply_tensor_parallel_dtensor(tied, mesh, sequence_parallel=True)
        ),
        "tp twice": error_of(lambda: apply_tensor_parallel(tensor_parallel_once)),
        "ulysses twice": error_of(lambda: apply_ulysses(ulysses_once)),
        "sp sequence": error_of(lambda: sequence_parallel(odd_tokens)),
        "ulysses n_kv_heads": error_of(lambda: apply_ulysses(Llama(one_kv_head))),
        "ulysses sequence": error_of(lambda: shard_sequence(odd_tokens)),
        "ulysses max_seq_len": error_of(lambda: short(shard_sequence(tokens))),
    }


def differences(steps: list[dict], expected: list[dict]) -> dict:
    """The largest relative difference over the steps of the logits, the loss and any gradient."""
    worst = {"logits": 0.0, "loss": 0.0, "grads": 0.0}
    for got, want in zip(steps, expected, strict=True):
        assert sorted(got["grads"]) == sorted(want["grads"]), "the parameters are not the reference's"
        pairs = [("logits", got["logits"], want["logits"]), ("loss", got["loss"], want["loss"])]
        pairs += [("grads", got["grads"][name], grad) for name, grad in want["grads"].items()]
        for what, a, b in pairs:
            worst[what] = max(worst[what], relative_difference(a, b))
    return worst


def check_tensor_parallel() -> dict:
    """Every variant against the single-process model, on this rank: differences, counts and errors."""
    expected = train(fresh_model(), "reference")
    report: dict = {"reference_block_weights": block_weights_on_this_rank(fresh_model())}
    for variant in VARIANTS:
        model = parallelize(fresh_model(), variant)
        block_inputs: list[tuple] = []
        model.layers[0].register_forward_pre_hook(
            lambda block, args, seen=block_inputs: seen.append(tuple(args[0].shape))
        )
        steps = train(model, variant)
        report[variant] = differences(steps, expected) | {
            "counts": steps[-1]["counts"],  # the last step: apply_ddp has its final buckets by then
            "block_input": block_inputs[0],
            "block_weights": block_weights_on_this_rank(model),
        }
    report["errors"] = size_errors(batches()[0][0])
    return report


@pytest.fixture(
    scope="module",
    params=[*WORLD_SIZES, pytest.param("nccl", marks=pytest.mark.gpu)],
    ids=lambda w: f"{w}ranks" if isinstance(w, int) else "gpus",
)
def reports(request) -> tuple[int, dict[int, dict]]:
    """Each world size on gloo; on a GPU runner, also up to 4 GPUs on NCCL, every test the same."""
    if request.param != "nccl":
        return request.param, launch(check_tensor_parallel, request.param, timeout_s=300)
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs for NCCL; this runner has {torch.cuda.device_count()}")
    world = 4 if torch.cuda.device_count() >= 4 else 2
    return world, launch(check_tensor_parallel, world, backend="nccl", timeout_s=300)


@pytest.mark.distributed
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_equals_the_single_process_model(reports, variant) -> None:
    _, by_rank = reports
    for rank, report in by_rank.items():
        result = report[variant]
        for what in ("logits", "loss", "grads"):
            assert result[what] < RELATIVE_TOLERANCE, (rank, what, result[what])


@pytest.mark.distributed
def test_each_variant_splits_what_it_says(reports) -> None:
    p, by_rank = reports
    for report in by_rank.values():
        whole = report["reference_block_weights"]
        norms = 2 * CONFIG.n_layers * CONFIG.d_model  # replicated in every variant
        for variant in ("tp", "tp_sp", "dtensor", "dtensor_sp"):  # 1/p of every block matrix on each rank
            assert report[variant]["block_weights"] == (whole - norms) // p + norms
        assert report["ulysses"]["block_weights"] == whole
        # The residual stream: whole sequences under plain TP, this rank's slice otherwise.
        assert report["tp"]["block_input"] == (BATCH, SEQ, CONFIG.d_model)
        assert report["dtensor"]["block_input"] == (BATCH, SEQ, CONFIG.d_model)
        for variant in ("tp_sp", "dtensor_sp", "ulysses"):
            assert report[variant]["block_input"] == (BATCH, SEQ // p, CONFIG.d_model)


@pytest.mark.distributed
@pytest.mark.parametrize("scheme", ["tp", "tp_sp", "ulysses"])
def test_communication_volume_is_what_the_step_passes_to_the_collectives(reports, scheme) -> None:
    p, by_rank = reports
    expected: Counter = Counter()
    for collective in communication_volume(scheme, CONFIG, BATCH, SEQ, p):
        expected[(collective.kind, collective.nbytes)] += collective.calls
    for rank, report in by_rank.items():
        assert report[scheme]["counts"] == expected, rank


@pytest.mark.distributed
def test_sizes_that_do_not_split_are_clear_errors(reports) -> None:
    p, by_rank = reports
    expected = {
        "tp not a llama": "the plan's 'layers.*.attention' matches no module of this model: is it a Llama?",
        "tp n_heads": f"layers.0.attention: n_heads=3 is not divisible by the tensor-parallel size {p}; "
        f"make n_heads a multiple of {p}, or use a tensor-parallel size that divides 3",
        "tp n_kv_heads": f"layers.0.attention: n_kv_heads=1 is not divisible by the tensor-parallel size {p}",
        "tp d_ff": f"layers.0.feed_forward: d_ff=97 is not divisible by the tensor-parallel size {p}",
        "dtensor n_heads": f"layers.0.attention: n_heads=3 is not divisible by the tensor-parallel size {p}",
        "dtensor_sp kernels": "apply_tensor_parallel_dtensor(sequence_parallel=True) splits the output "
        "layer, but use_kernels=True computes the loss from output.weight directly",
        "dtensor_sp tied": "apply_tensor_parallel_dtensor(sequence_parallel=True) splits the embedding by rows "
        "and the output layer by columns, each into a parameter of its own, which would untie",
        "tp twice": "the model is tensor-parallel already; apply_tensor_parallel once, to a fresh model",
        "ulysses twice": "the model runs Ulysses attention already; apply_ulysses once, to a fresh model",
        "sp sequence": f"sequence length 15 is not divisible by the sequence-parallel size {p}; "
        f"pad or cut the sequences to a multiple of {p} tokens",
        "ulysses n_kv_heads": f"layers.0.attention: n_kv_heads=1 is not divisible by the Ulysses size {p}",
        "ulysses sequence": f"sequence length 15 is not divisible by the sequence-parallel size {p}",
        "ulysses max_seq_len": f"the whole sequence, {p} x {SEQ // p} positions, exceeds "
        f"max_seq_len={SEQ - 1}",
    }
    for report in by_rank.values():
        assert report["errors"].keys() == expected.keys()
        for name, start in expected.items():
            assert report["errors"][name].startswith(start), (name, report["errors"][name])


def test_communication_volume_at_llama_7b_sizes_is_the_docstrings_formulas() -> None:
    """Bytes sent per rank against the docstring's sums: Korthikanti's equal volume, Ulysses' 1/p."""
    b, s, d, L, p, B = 8, 4096, 4096, 32, 8, 2
    config = LlamaConfig(d_model=d, n_layers=L, n_heads=32, n_kv_heads=8, d_ff=11008, max_seq_len=s)
    sent = {
        scheme: bytes_sent_per_rank(communication_volume(scheme, config, b, s, p, B), p)
        for scheme in ("tp", "tp_sp", "ulysses")
    }
    activations = b * s * d * B
    assert sent["tp"] == pytest.approx(8 * L * (p - 1) / p * activations)
    embedding_and_final_norm = 2 * (p - 1) / p * activations
    norm_gradients = 2 * L * 2 * (p - 1) / p * d * B
    assert sent["tp_sp"] == pytest.approx(sent["tp"] + embedding_and_final_norm + norm_gradients)
    kv = config.n_kv_heads * config.head_dim
    ulysses_activations = 4 * L * (p - 1) / p**2 * b * s * (d + kv) * B
    gradients = 2 * (p - 1) / p * count_parameters(config) * B
    assert sent["ulysses"] == pytest.approx(ulysses_activations + gradients)
    assert ulysses_activations < sent["tp"] / p  # all-to-alls of 1/p of the activations, against all-reduces


def test_collectives_are_counted_whether_the_message_is_passed_by_position_or_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def reduce_scatter_tensor(output, input, op=None, group=None, async_op=False):  # noqa: A002 (torch's names)
        return None  # stands in for the collective: no process group is needed to count its calls

    monkeypatch.setattr(dist, "reduce_scatter_tensor", reduce_scatter_tensor)
    shard, whole = torch.zeros(4), torch.zeros(8)
    with count_collectives() as counts:
        dist.reduce_scatter_tensor(shard, whole)
        dist.reduce_scatter_tensor(output=shard, input=whole)  # as FSDP2 calls it
    assert counts == Counter({("reduce_scatter", whole.numel() * whole.element_size()): 2})
    assert dist.reduce_scatter_tensor is reduce_scatter_tensor, "the original is back after the block"
