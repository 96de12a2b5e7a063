"""common.inference.small_m_linear: a model whose linears send 2 ... max_rows rows to our Triton kernel
gives the logits of the same model on PyTorch's matmuls, and sends each call where the docstring says.

References: the unmodified model's forward in float64 (CPU) or its own fp32 forward (GPU). In fp32 two
orders of summation differ by ~1e-6 of the largest logit; a wrong route, a transposed weight or a row
mix-up moves logits by O(1). So 1e-4 of the largest logit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from inference_toys import random_llama, random_prompt
from torch import nn

from common.inference import small_m_linear as module
from common.inference.graphed_decoder import GraphedDecoder
from common.inference.kv_cache import CachedDecoder
from common.inference.small_m_linear import SmallMLinear, use_small_m_linears


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=0, atol=1e-4 * expected.abs().max().item()
    )


def test_every_linear_is_replaced_and_shares_its_weight():
    model = random_llama(0)
    weights = {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    use_small_m_linears(model)
    replaced = {name: m for name, m in model.named_modules() if isinstance(m, SmallMLinear)}
    assert replaced.keys() == weights.keys()
    assert all(replaced[name].weight is weights[name] for name in weights), (
        "weights must be shared, not copied"
    )
    assert not any(type(m) is nn.Linear for m in model.modules())


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17])
def test_a_forward_of_any_length_gives_the_float64_logits(rows: int, monkeypatch: pytest.MonkeyPatch):
    """1 row and more than max_rows go to F.linear, 2 ... 16 to the Triton kernel (counted by a spy)."""
    model = random_llama(1)
    reference = copy.deepcopy(model).double()
    use_small_m_linears(model)
    calls = []
    kernel = module.small_m_linear
    monkeypatch.setattr(module, "small_m_linear", lambda x, w: calls.append(x.shape) or kernel(x, w))
    tokens = random_prompt(model.config, batch=1, length=rows, seed=2)
    with torch.no_grad():
        _close(model(tokens), reference(tokens))
    n_linears = sum(isinstance(m, SmallMLinear) for m in model.modules())
    assert len(calls) == (n_linears if 2 <= rows <= 16 else 0)


def test_the_custom_op_passes_torch_library_checks():
    """Its fake (meta) implementation gives the real output's shape and dtype, so torch.compile can trace it."""
    x, weight = torch.randn(2, 3, 64), torch.randn(48, 64)
    torch.library.opcheck(module.small_m_linear, (x, weight))


def test_bad_layers_and_row_limits_are_refused():
    with pytest.raises(ValueError, match="bias-free"):
        SmallMLinear(nn.Linear(4, 4, bias=True))
    with pytest.raises(ValueError, match="max_rows"):
        SmallMLinear(nn.Linear(4, 4, bias=False), max_rows=1)


@pytest.mark.gpu
def test_graphed_decoding_with_small_m_linears_gives_the_cublas_logits_gpu():
    """Compiled, captured decoders: a prefill, 5-token and 1-token feeds give the unmodified model's logits."""
    from test_inference_graphed_decoder import GPU_CONFIG

    model = random_llama(3, GPU_CONFIG).cuda()
    routed = use_small_m_linears(copy.deepcopy(model))
    sequence = random_prompt(GPU_CONFIG, batch=1, length=30, seed=4).cuda()
    eager, graphed = CachedDecoder(model, 1, 32), GraphedDecoder(routed, 1, 32)
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
        for size in (20, 5, 1, 1, 3):
            start = eager.length
            _close(
                graphed.feed(sequence[:, start : start + size]), eager.feed(sequence[:, start : start + size])
            )
