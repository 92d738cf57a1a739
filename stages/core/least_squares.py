"""Gram matrices of the output projections' inputs, and what the repair's relatives share.

The repair (reconstruction.py), the repair-aware prior (saliency.py) and the compensated
scoring of sub-models (compensation.py) all start from G = sum x x^T of a projection's input x
over calibration tokens, summed in float64 from float32 products, a layer at a time: one
layer's two Gram matrices at once, never every layer's (at LLaMA-7B's shapes those would be
35 GB).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from bonsai.stages.core.families.base import Family
from bonsai.stages.core.families.remote_code import get_module
from bonsai.stages.core.progress import Progress
from bonsai.stages.core.units import KINDS, LayerShape, layer_shapes, output_projection

BLOCK = 1024  # columns (or rows) per product: no d x d float32 temporary beside the float64 sums
TRIANGLE_BLOCK = 256  # narrower blocks follow the diagonal closer; 128-512 measured within 10 %
MAX_RETRIES = 6  # each multiplies the damping by 10 when a damped G is not positive definite


def add_products(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total += a^T b: float32 products (half the time of float64, and within 2e-7 of it in norm
    on SmolLM2's activations) added to float64 sums, a block of columns at a time."""
    for s in range(0, b.shape[1], BLOCK):
        total[:, s : s + BLOCK] += (a.T @ b[:, s : s + BLOCK]).double()


def add_gram(total: torch.Tensor, a: torch.Tensor) -> None:
    """The upper block triangle of total += a^T a (what ``symmetrize`` completes): 46-64 % of
    the full product's time at widths 688-11,008, the same sums (equal to the bit where measured)."""
    d = a.shape[1]
    for s in range(0, d, TRIANGLE_BLOCK):
        e = min(s + TRIANGLE_BLOCK, d)
        total[:e, s:e] += (a[:, :e].T @ a[:, s:e]).double()


def symmetrize(total: torch.Tensor) -> None:
    """Copy the upper block triangle that ``add_gram`` fills onto the lower one, in place."""
    d = total.shape[0]
    for s in range(0, d, TRIANGLE_BLOCK):
        e = min(s + TRIANGLE_BLOCK, d)
        total[e:, s:e] = total[s:e, e:].T


def damped_factor(gram: torch.Tensor, damping: float) -> tuple[torch.Tensor, float]:
    """(the Cholesky factor of G + lambda I, the damping used), lambda = damping * mean diag G,
    raised tenfold as the repair's is until positive definite.  ``gram`` is consumed."""
    diagonal = gram.diagonal().clone()
    scale = max(float(diagonal.mean()), 1e-30)
    for _ in range(MAX_RETRIES + 1):
        gram.diagonal().copy_(diagonal + damping * scale)
        factor, info = torch.linalg.cholesky_ex(gram)
        if int(info) == 0:
            return factor, damping
        damping = max(damping * 10, 1e-6)
    raise RuntimeError("the Gram matrix stays singular however large the damping")


def damped_inverse(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """(G + lambda I)^-1 (see ``damped_factor``; ``gram`` is consumed)."""
    return torch.cholesky_inverse(damped_factor(gram, damping)[0])


class GramSums:
    """G = sum x x^T, sum x and the token count of one projection's inputs, as a pre-hook."""

    def __init__(self, width: int, device: torch.device):
        self.gram = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.total = torch.zeros(width, dtype=torch.float64, device=device)
        self.tokens = 0

    def hook(self, module, args) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        add_gram(self.gram, x)
        self.total += x.sum(0).double()
        self.tokens += x.shape[0]

    def gram_matrix(self, centred: bool) -> torch.Tensor:
        """G, or G - n mu mu^T (the covariance, times n) when ``centred``."""
        symmetrize(self.gram)
        if centred:
            self.gram.addr_(self.total, self.total / max(self.tokens, 1), alpha=-1.0)
        return self.gram


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


def run_layer(layer: nn.Module, hidden: torch.Tensor, call) -> torch.Tensor:
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def layer_grams(
    model: nn.Module, family: Family, windows: torch.Tensor, batch_size: int, label: str, layers=None
) -> Iterator[tuple[int, LayerShape, dict[str, nn.Linear], dict[str, GramSums]]]:
    """Per decoder layer in order, (index, shape, {kind: output projection}, {kind: its input
    sums}) over ``windows`` through the current model, unchanged: every layer's input hidden
    states are kept between layers, one layer's sums at a time.  ``layers``: the indices wanted
    (default all); the pass ends at the last of them."""
    device = next(model.parameters()).device
    batches = [windows[s : s + batch_size].to(device) for s in range(0, windows.shape[0], batch_size)]
    captured = [capture_layer_inputs(model, family, ids) for ids in batches]
    hidden = [h for h, _ in captured]
    arguments = [c for _, c in captured]
    del captured
    shapes = layer_shapes(model, family)
    wanted = set(range(len(shapes))) if layers is None else set(layers)
    last = max(wanted, default=-1)
    progress = Progress(label, last + 1, "layers")
    for index, (layer, shape) in enumerate(zip(get_module(model, family.layers), shapes)):
        if index > last:
            break
        targets = {kind: output_projection(layer, family, kind) for kind in KINDS}
        sums = {kind: GramSums(t.in_features, device) for kind, t in targets.items()} if index in wanted else {}
        handles = [targets[kind].register_forward_pre_hook(s.hook) for kind, s in sums.items()]
        try:
            hidden = [run_layer(layer, h, arguments[b][index]) for b, h in enumerate(hidden)]
        finally:
            for handle in handles:
                handle.remove()
        if sums:
            yield index, shape, targets, sums
        sums = None  # before the next layer's are made
        progress.advance()
