"""Whether the repair keeps a layer's activations to complete its outputs, or runs the layer again.

Keeping them (reconstruction.py's shortcut) computes each projection's product once and the
attention once per layer: on SmolLM2 the repair takes 0.57x the time of running every repaired
layer again.  But it holds every window's attention output and MLP-output inputs besides the
hidden states, and those grow with the windows: at LLaMA-2-7B's shapes with 512 windows of 128
tokens the repair's peak is 1.22-1.26x plain inference with them and 1.13-1.14x without (BENCHMARKS.md,
"Repair memory").  So the repair keeps them unless that would take it past MEMORY_BOUND of the
model's weights where running the layers again would not: a small model, whose windows' hidden
states alone pass the bound, keeps the fast path.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from bonsai.stages.core.families.base import Family
from bonsai.stages.core.families.remote_code import get_module
from bonsai.stages.core.units import CHANNEL, HEAD, output_projection

log = logging.getLogger("bonsai.reconstruct")

MEMORY_BOUND = 1.15  # the repair's peak over the weights it may reach, as a multiple of them


def repair_bytes(
    *, tokens: int, hidden: int, mlp_width: int, state_bytes: int, pass_bytes: int, copy_bytes: int = 0
) -> tuple[int, int]:
    """(bytes beyond the weights running each layer again, bytes keeping the activations), an
    estimate for ``tokens`` repair tokens: the hidden states twice (a layer's inputs and the
    outputs being made) and the widest Gram matrix (float64) either way; keeping adds every
    token's attention output and MLP-output input in the passes' dtype, and ``copy_bytes``, the
    layer copy its passes run on (working_layers.py; running the layers again makes none)."""
    rerun = 2 * tokens * hidden * state_bytes + 8 * mlp_width**2
    return rerun, rerun + tokens * (hidden + mlp_width) * pass_bytes + copy_bytes


def prefers_keeping(*, weight_bytes: int, rerun: int, keep: int) -> bool:
    """Keep the activations unless only running the layers again stays within the bound
    (``rerun``, ``keep``: ``repair_bytes``)."""
    headroom = (MEMORY_BOUND - 1) * weight_bytes
    return keep <= headroom or rerun > headroom


def keeps_activations(model: nn.Module, family: Family, windows: torch.Tensor, pass_dtype: torch.dtype) -> bool:
    """``prefers_keeping`` for repairing ``model`` on ``windows`` with its passes in ``pass_dtype``."""
    layers = list(get_module(model, family.layers))
    state = next(model.parameters()).dtype
    largest = max(sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear)) for layer in layers)
    rerun, keep = repair_bytes(
        tokens=windows.numel(),
        hidden=output_projection(layers[0], family, HEAD).out_features,
        mlp_width=max(output_projection(layer, family, CHANNEL).in_features for layer in layers),
        state_bytes=state.itemsize,
        pass_bytes=pass_dtype.itemsize,
        copy_bytes=largest * pass_dtype.itemsize if pass_dtype != state else 0,
    )
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kept = prefers_keeping(weight_bytes=weights, rerun=rerun, keep=keep)
    if not kept:
        log.info(
            "the repair runs each layer again: keeping %d windows' activations would take it to %.2fx its "
            "model's weights (%.2fx without)",
            windows.shape[0],
            1 + keep / weights,
            1 + rerun / weights,
        )
    return kept
