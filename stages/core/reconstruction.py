"""Forward-only repair of what a removal breaks: least-squares updates of the kept columns.

Removing heads and channels deletes columns of each layer's attention-output and MLP-output
projections, and with them part of every output.  The kept columns can take over much of it:
with G = sum over calibration tokens of x x^T, x the projection's input with all its units,

    W_K' = W_K + W_P G_PK (G_KK + lambda I)^-1,   lambda = damping * mean(diag(G_KK))

is the least-squares fit of the full output W x by the kept inputs, shrunk toward the current
W_K (not toward zero, which measured far worse).  Layers are repaired in order, each one's G
collected through the already repaired (and pruned) layers before it: every decoder layer's
input hidden states are kept between layers, so one iteration costs about two passes of each
layer over the windows, not one full forward per layer.  Held-out windows check each update:
one that does not lower that projection's output error there is not applied.

The model is changed in place (removed columns zeroed, kept ones updated), which is exactly
the pruned model; ``repair`` returns the updated tensors and a table of what it did.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from bonsai.stages.core.families.base import Family
from bonsai.stages.core.families.remote_code import get_module
from bonsai.stages.core.progress import Progress
from bonsai.stages.core.units import CHANNEL, HEAD, LayerShape, layer_shapes, output_projection

log = logging.getLogger("bonsai.reconstruct")

PROJECTIONS = {HEAD: "attention_out", CHANNEL: "mlp_out"}
MAX_RETRIES = 6  # each multiplies the damping by 10 when G_KK + lambda I is not positive definite


@dataclass
class Outcome:
    layer: int
    projection: str  # attention_out or mlp_out
    inputs: int  # columns before the removal
    kept: int
    tokens: int  # fit tokens
    damping: float  # the factor finally used
    error_before: float  # relative held-out output error of plain removal
    error_after: float  # ... with the update
    applied: bool


class _Stop(Exception):
    """Raised by a hook once it has what it came for: the rest of the layer is not run."""


def _columns(kind: str, shape: LayerShape, positions: list[int]) -> torch.Tensor:
    width = shape.per_group * shape.head_dim if kind == HEAD else 1
    base = torch.tensor(positions, dtype=torch.long).unsqueeze(1) * width
    return (base + torch.arange(width)).reshape(-1)


def capture_layer_inputs(model: nn.Module, family: Family, ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    """(hidden states entering the first decoder layer, each layer's call arguments) for a
    batch, from a pass in which every decoder layer is an identity: only the embeddings and
    what the model computes for its layers (rotary tables, masks) are computed."""
    layers = list(get_module(model, family.layers))
    base = get_module(model, family.layers.rsplit(".", 1)[0])
    calls: list = []

    def stand_in(hidden_states, *args, **kwargs):
        calls.append((hidden_states, args, kwargs))
        return hidden_states

    for layer in layers:
        layer.forward = stand_in
    try:
        with torch.no_grad():
            base(input_ids=ids, use_cache=False)
    finally:
        for layer in layers:
            del layer.forward
    return calls[0][0], [(args, kwargs) for _, args, kwargs in calls]


def _run_layer(layer: nn.Module, hidden: torch.Tensor, call) -> torch.Tensor:
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _gram(layer, family, kind, hidden, calls, fit_rows: int, affine: bool = False):
    """(G over the fit windows, G over the check windows, fit tokens) of the projection's input
    (``affine``: with a constant 1 appended as the last input, for an intercept)."""
    target = output_projection(layer, family, kind)
    width = target.in_features
    device = target.weight.device
    grams = [torch.zeros(width + affine, width + affine, dtype=torch.float64, device=device) for _ in range(2)]
    tokens = 0
    state = {"which": 0}

    def hook(module, args):
        # each batch's product in float32 (half the time of float64, and within 2e-7 of it in
        # norm on SmolLM2's activations), summed over batches in float64
        x = args[0].reshape(-1, width).float()
        if affine:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
        grams[state["which"]] += (x.T @ x).double()
        raise _Stop

    handle = target.register_forward_pre_hook(hook)
    try:
        for start, (batch, call) in enumerate(zip(hidden, calls)):
            state["which"] = 0 if start < fit_rows else 1
            if state["which"] == 0:
                tokens += batch.shape[0] * batch.shape[1]
            try:
                _run_layer(layer, batch, call)
            except _Stop:
                pass
    finally:
        handle.remove()
    return grams[0], grams[1], tokens


def solve(
    weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, removed: torch.Tensor, damping: float
) -> tuple[torch.Tensor, float]:
    """(W_K', damping used): W_K + W_P G_PK (G_KK + lambda I)^-1, in float64; the damping is
    raised tenfold (with a warning) until G_KK + lambda I is positive definite."""
    w = weight.double()
    g_kk = gram.index_select(0, kept).index_select(1, kept)
    g_kp = gram.index_select(0, kept).index_select(1, removed)
    scale = float(g_kk.diagonal().mean()) if g_kk.numel() else 0.0
    for _ in range(MAX_RETRIES + 1):
        lam = damping * scale
        factor, info = torch.linalg.cholesky_ex(g_kk + lam * torch.eye(len(kept), dtype=g_kk.dtype, device=g_kk.device))
        if int(info) == 0:
            update = torch.cholesky_solve(g_kp, factor)  # (G_KK + lambda I)^-1 G_KP
            return w[:, kept] + w[:, removed] @ update.T, damping
        log.warning("G_KK + %g * mean diagonal is not positive definite; raising the damping", damping)
        damping = max(damping * 10, 1e-6)
    raise RuntimeError("the Gram matrix stays singular however large the damping")


def _relative_error(weight, new_kept, gram, kept, removed) -> float:
    """sqrt(||W' x - W x||^2 / ||W x||^2) summed over the tokens of ``gram``."""
    w = weight.double()
    diff = torch.zeros_like(w)
    if new_kept is not None:
        diff[:, kept] = new_kept - w[:, kept]
    diff[:, removed] = -w[:, removed]
    energy = float(((w @ gram) * w).sum())
    error = float(((diff @ gram) * diff).sum())
    return math.sqrt(error / energy) if energy > 0 else 0.0


@torch.no_grad()
def repair(
    model: nn.Module,
    family: Family,
    windows: torch.Tensor,
    check: int,
    keep: dict,
    damping: float,
    batch_size: int,
    affine: bool = False,
) -> tuple[dict[tuple[int, str], torch.Tensor], list[Outcome]]:
    """Repair every layer in order; ``keep[(layer, kind)]`` lists the current positions of the
    units that stay (all others of that layer and kind are removed).  The last ``check``
    windows only judge each update.  Returns {(layer, kind): new weight of the kept columns}
    (projections whose update was applied) and one Outcome per projection that lost units."""
    device = next(model.parameters()).device
    fit, held = windows[: windows.shape[0] - check], windows[windows.shape[0] - check :]
    batches = [part[s : s + batch_size].to(device) for part in (fit, held) for s in range(0, part.shape[0], batch_size)]
    fit_rows = math.ceil(fit.shape[0] / batch_size)
    captured = [capture_layer_inputs(model, family, ids) for ids in batches]
    hidden = [h for h, _ in captured]
    shapes = layer_shapes(model, family)
    layers = list(get_module(model, family.layers))
    updated, outcomes = {}, []
    progress = Progress("reconstruct", len(layers), "layers")
    for index, (layer, shape) in enumerate(zip(layers, shapes)):
        calls = [c[1][index] for c in captured]
        for kind in (HEAD, CHANNEL):
            positions = list(keep[(index, kind)])
            if len(positions) == shape.count(kind):
                continue  # nothing removed here this iteration
            target = output_projection(layer, family, kind)
            kept = _columns(kind, shape, positions).to(target.weight.device)
            removed_mask = torch.ones(target.in_features, dtype=torch.bool, device=kept.device)
            removed_mask[kept] = False
            removed = removed_mask.nonzero().squeeze(1)
            outcome = Outcome(
                index,
                PROJECTIONS[kind],
                target.in_features,
                len(positions),
                0,
                damping,
                float("nan"),
                float("nan"),
                False,
            )
            if positions:
                fit_gram, check_gram, tokens = _gram(layer, family, kind, hidden, calls, fit_rows, affine)
                weight, fitted = target.weight, kept
                if affine:  # the intercept is one more kept input, whose weight is the bias
                    bias = target.bias if target.bias is not None else torch.zeros_like(target.weight[:, 0])
                    weight = torch.cat([target.weight, bias.unsqueeze(1)], dim=1)
                    fitted = torch.cat([kept, torch.tensor([target.in_features], device=kept.device)])
                new_kept, used = solve(weight, fit_gram, fitted, removed, damping)
                before = _relative_error(weight, None, check_gram, fitted, removed)
                after = _relative_error(weight, new_kept, check_gram, fitted, removed)
                outcome.tokens, outcome.damping, outcome.error_before, outcome.error_after = tokens, used, before, after
                outcome.applied = after < before
                if outcome.applied:
                    target.weight[:, kept] = new_kept[:, : len(kept)].to(target.weight.dtype)
                    if affine:
                        target.bias = nn.Parameter(new_kept[:, -1].to(target.weight.dtype), requires_grad=False)
                    updated[(index, kind)] = target.weight[:, kept].clone()
            target.weight[:, removed] = 0  # the removal itself, so that later layers see the pruned model
            outcomes.append(outcome)
        hidden = [_run_layer(layer, h, call) for h, call in zip(hidden, calls)]
        progress.advance()
    return updated, outcomes
