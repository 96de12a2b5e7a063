"""How far a quantized model is from a float64 copy of the original: per layer, in the logits, in the loss.

    reference = copy.deepcopy(model).double()            # before quantizing
    quantize_linears(model, "int8")
    errors = measure_errors(model, reference, tokens)    # tokens (b, s) of the language the model learned
    errors["loss"], errors["logits_relative_error"], errors["layer_relative_error"]["max"]

Each layer is measured on the input the float64 model gives it, not on what the quantized model's earlier
layers produced: the number is that layer's own error, the errors of earlier layers do not add in. The
logits and the loss show what all of them do together. float64, because the errors of int8 (~1e-3) and of
bf16 rounding (~1e-3) are close: an fp32 or bf16 reference would mix its own rounding into the measurement.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.inference.acceptance import held_out_loss
from common.inference.quantization import linear_names

__all__ = ["layer_inputs", "measure_errors", "relative_error"]


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact|| (Frobenius norms), in float64."""
    exact = exact.double()
    return ((approx.double() - exact).norm() / exact.norm()).item()


@torch.no_grad()
def layer_inputs(model: nn.Module, tokens: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """What each named layer of `model` receives when model(tokens) runs."""
    modules, inputs = dict(model.named_modules()), {}
    hooks = [
        modules[name].register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0]))
        for name in names
    ]
    try:
        model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


@torch.no_grad()
def measure_errors(model: nn.Module, reference: nn.Module, tokens: torch.Tensor) -> dict[str, Any]:
    """Loss, logits error and per-layer output errors of `model` against its float64 `reference`.

    model and reference: the same Llama (common.models.llama), `model` possibly quantized (quantize_linears)
    and in any dtype, `reference` the float64 original. tokens (b, s): the loss is held_out_loss's (the
    predictions of tokens[:, 2:]). Layers: every nn.Linear of the reference, the output projection included,
    each fed the reference's input in model's dtype.
    """
    if reference.tok_embeddings.weight.dtype != torch.float64:
        raise TypeError(
            f"the reference must be the float64 model (copy.deepcopy(model).double()), got "
            f"{reference.tok_embeddings.weight.dtype}"
        )
    dtype = model.tok_embeddings.weight.dtype
    modules, reference_modules = dict(model.named_modules()), dict(reference.named_modules())
    layers = {}
    for name, x in layer_inputs(
        reference, tokens[:, :-1], linear_names(reference, include_output=True)
    ).items():
        layers[name] = relative_error(modules[name](x.to(dtype)), reference_modules[name](x))
    return {
        "loss": held_out_loss(model, tokens),
        "logits_relative_error": relative_error(model(tokens[:, :-1]), reference(tokens[:, :-1])),
        "layer_relative_error": {
            "mean": sum(layers.values()) / len(layers),
            "max": max(layers.values()),
            "per_layer": layers,
        },
    }
