"""The repair's fit: what its least squares aims at (reconstruction.py's ``aim``), and the sums
over the fit tokens it takes.

``model``: the projection's own output W x on the pruned model's input x, the kept columns
taking over the removed ones' share (0.2.0 onward).  ``stream``: the residual stream just after
the projection's sum in the model as it was before the repair (the parent, for the published
repair), so that each layer's fit also takes back what earlier layers' removals moved: with h
the pruned model's stream before the sum and h_ref, W x_ref the unrepaired model's,

    t = W x_ref + h_ref - h,   fitted by W_K' x_K   (a bias is in both streams and cancels).

Aiming at the unrepaired model's projection output W x_ref alone had measured no better than
``model`` (0.2.0, in every iteration); the stream aim measured far better for the published
repair (BENCHMARKS.md).  It carries a second stream of hidden states through the unrepaired
layers: each layer runs once more, and two more hidden-state tensors are kept (the unrepaired
stream after the layer and after its attention sum).  It needs each output projection summed
straight into the stream (not Gemma's normalised sums) and the shortcut passes, which keep what
follows each projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bonsai.stages.core.families.remote_code import get_module
from bonsai.stages.core.least_squares import BLOCK, add_gram, run_layer, symmetrize

AIMS = ("model", "stream")


def reference_layer(layer, family, hidden: torch.Tensor, call) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch through the unchanged ``layer``: (its output, the stream after its attention sum)."""
    attention: list[torch.Tensor] = []

    def keep(module, args, out):
        attention.append(out[0] if isinstance(out, tuple) else out)

    hook = get_module(layer, family.attention).register_forward_hook(keep)
    try:
        out = run_layer(layer, hidden, call)
    finally:
        hook.remove()
    return out, hidden + attention[0]


def stream_target(reference_after: torch.Tensor, partial_after: torch.Tensor) -> torch.Tensor:
    """t for one batch: the unrepaired stream after the sum minus the pruned one with the
    projection's product left out (its h plus the projection's bias), in float32."""
    return reference_after.float() - partial_after.float()


def add_cross(total: torch.Tensor, t: torch.Tensor, x: torch.Tensor, product: torch.dtype) -> None:
    """total (out x d, float64) += t^T x, a block of x's columns at a time."""
    t, x = t.reshape(-1, t.shape[-1]).to(product), x.reshape(-1, x.shape[-1]).to(product)
    for s in range(0, x.shape[1], BLOCK):
        total[:, s : s + BLOCK] += (t.T @ x[:, s : s + BLOCK]).double()


@dataclass
class Moments:
    """Sums over the fit tokens, for one projection W (out x d): G = sum x x^T of its
    pruned-model input x.  Least squares then needs no activations kept."""

    gram: torch.Tensor | None  # None: only the bias is fitted
    tokens: int
    sum: torch.Tensor | None = None  # sum x over the fit tokens, when a bias is fitted
    cross: torch.Tensor | None = None  # sum t x^T (out x d), for an aim other than W x (``stream``)

    def target_columns(self, weight: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """(sum (W x) x^T)[:, kept] = (W G)[:, kept], (out x k) float64, a block of W's rows at a
        time (no float64 copy of W); (sum t x^T)[:, kept] for an aimed fit."""
        if self.cross is not None:
            return self.cross.index_select(1, kept)
        out = torch.empty(weight.shape[0], len(kept), dtype=torch.float64, device=self.gram.device)
        for s in range(0, weight.shape[0], BLOCK):
            out[s : s + BLOCK] = (weight[s : s + BLOCK].double() @ self.gram).index_select(1, kept)
        return out


class Collect:
    """Fit moments from hooked projection inputs, and the held-out inputs themselves: the check
    takes its errors from those directly (a held-out Gram matrix would double the memory)."""

    def __init__(
        self, weight: torch.Tensor, fit: str = "weights", product: torch.dtype = torch.float32, aimed: bool = False
    ):
        d, dev = weight.shape[1], weight.device
        self.product = product  # the dtype of the Gram matrix's block products (summed in float64)
        gram = torch.zeros(d, d, dtype=torch.float64, device=dev) if fit != "bias" else None
        sums = torch.zeros(d, dtype=torch.float64, device=dev) if fit != "weights" else None
        cross = torch.zeros(weight.shape[0], d, dtype=torch.float64, device=dev) if aimed else None
        self.fit = Moments(gram, 0, sums, cross)
        self.held: list = []

    def add(self, fit: bool, x: torch.Tensor, t: torch.Tensor | None = None) -> None:
        """``t``: the aimed fit's target for these inputs."""
        x = x.reshape(-1, x.shape[-1])
        if not fit:
            self.held.append(x if t is None else (x, t))
            return
        if t is not None:
            add_cross(self.fit.cross, t, x, self.product)
        if self.fit.gram is not None:
            add_gram(self.fit.gram, x.to(self.product))
        if self.fit.sum is not None:
            self.fit.sum += x.float().sum(0).double()
        self.fit.tokens += x.shape[0]

    def moments(self) -> Moments:
        """The fit moments, once every input has been added."""
        if self.fit.gram is not None:
            symmetrize(self.fit.gram)
        return self.fit
