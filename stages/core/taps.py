"""Taps on the inputs of each layer's output projections: virtual masks and statistics.

Zeroing a head's slice of the attention-output projection's input, or a channel of the
MLP-output projection's input, removes exactly that unit's contribution: the projection
is linear and its bias belongs to no unit.  So a sub-model is a multiplicative mask on two
activations per layer, applied by a forward pre-hook, with no copy of any weight.  Every
row of a batch may carry its own mask, so several sub-models share one forward pass.

The same hooks can accumulate activation statistics (sum |a|, sum a, sum a^2 per feature)
from which the priors are computed, per group of rows (per sub-model, for the
perturbed-prior estimator) or over all rows (for the priors of the unperturbed model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bonsai.stages.core.families.base import Family
from bonsai.stages.core.families.remote_code import get_module
from bonsai.stages.core.units import CHANNEL, HEAD, KINDS, LayerShape, layer_shapes, output_projection


@dataclass
class Stats:
    """Per-feature activation sums for ``groups`` groups of rows, in float64."""

    abs_sum: torch.Tensor  # (groups, features)
    sum: torch.Tensor
    sq_sum: torch.Tensor
    tokens: torch.Tensor  # (groups,)

    @classmethod
    def zeros(cls, groups: int, features: int, device: torch.device) -> Stats:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(groups, features), z(groups, features), z(groups, features), z(groups))

    def add(self, x: torch.Tensor, row_group: torch.Tensor | None) -> None:
        # norm reductions sum over the sequence without materialising |x| or x^2
        x = x.float()
        per_row = (
            torch.linalg.vector_norm(x, 1, dim=1),
            x.sum(1),
            torch.linalg.vector_norm(x, 2, dim=1).square(),
        )  # (rows, features) each
        tokens = torch.full((x.shape[0],), float(x.shape[1]), dtype=torch.float64, device=x.device)
        if row_group is None:
            row_group = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        for target, value in zip((self.abs_sum, self.sum, self.sq_sum), per_row):
            target.index_add_(0, row_group, value.double())
        self.tokens.index_add_(0, row_group, tokens)


class Taps:
    """Context manager holding the pre-hooks; set masks and groups per batch."""

    def __init__(self, model: nn.Module, family: Family, stat_groups: int = 0):
        self.family = family
        self.layers = list(get_module(model, family.layers))
        self.shapes: list[LayerShape] = layer_shapes(model, family)
        self.head_masks: list[torch.Tensor | None] = [None] * len(self.layers)
        self.channel_masks: list[torch.Tensor | None] = [None] * len(self.layers)
        self.row_group: torch.Tensor | None = None
        # per (layer, kind): (first row, end row, Imputation) for rows whose sub-model is scored
        # as repaired (core/compensation.py): dropped inputs imputed after the mask zeroes them
        self.imputations: dict[tuple[int, str], list] = {}
        self.stats: dict[tuple[int, str], Stats] | None = None
        if stat_groups:
            device = next(model.parameters()).device
            self.stats = {}
            for index, shape in enumerate(self.shapes):
                self.stats[(index, HEAD)] = Stats.zeros(
                    stat_groups, shape.groups * shape.per_group * shape.head_dim, device
                )
                self.stats[(index, CHANNEL)] = Stats.zeros(stat_groups, shape.channels, device)
        self._handles: list = []

    def targets(self, index: int) -> dict[str, nn.Linear]:
        return {kind: output_projection(self.layers[index], self.family, kind) for kind in KINDS}

    def __enter__(self) -> Taps:
        for index in range(len(self.layers)):
            for kind, module in self.targets(index).items():
                self._handles.append(module.register_forward_pre_hook(self._hook(index, kind)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, index: int, kind: str):
        masks = self.head_masks if kind == HEAD else self.channel_masks

        def hook(module, args):
            x = args[0]
            mask = masks[index]
            if mask is not None:
                # in place when no graph is recorded: the projection's input is a temporary
                # of the layer's forward (per-family parity tests check masked == sliced)
                x = x.mul_(mask) if not torch.is_grad_enabled() else x * mask
                for first, end, imputation in self.imputations.get((index, kind), ()):
                    imputation.apply(x[first:end])
            if self.stats is not None:
                self.stats[(index, kind)].add(x, self.row_group)
            return (x, *args[1:]) if mask is not None else None

        return hook

    def set_masks(self, head_rows: list[torch.Tensor] | None, channel_rows: list[torch.Tensor] | None) -> None:
        """Per layer, a (rows, units) 0/1 tensor for heads (KV groups) and for channels."""
        for index, shape in enumerate(self.shapes):
            if head_rows is None:
                self.head_masks[index] = None
            else:
                width = shape.per_group * shape.head_dim
                self.head_masks[index] = head_rows[index].repeat_interleave(width, dim=1).unsqueeze(1)
            self.channel_masks[index] = None if channel_rows is None else channel_rows[index].unsqueeze(1)


def weight_terms(taps: Taps) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Per output projection: mean_o |W[o, f]| and ||W[:, f]||^2 for every input feature f."""
    out = {}
    for index in range(len(taps.shapes)):
        for kind, module in taps.targets(index).items():
            weight = module.weight.detach().float()
            out[(index, kind)] = (weight.abs().mean(0).double(), (weight * weight).sum(0).double())
    return out


def unit_priors(
    taps: Taps, group: int = 0, weights: dict | None = None
) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """Module-level priors per unit from the accumulated statistics (Appendix F).

    For a feature f feeding output projection W (out x features), over the tokens seen:
    - activation: mean |a_f|;
    - wanda: RMS(a_f) * mean_o |W[o, f]|  (the module analogue of |W| * ||X||);
    - fluctuation: Var(a_f) * ||W[:, f]||^2  (FLAP's fluctuation metric);
    - flap: the fluctuation standardised over the projection's features (zero mean, unit
      sample deviation: FLAP's AL-AM structure, which compares every layer's heads and channels
      on one scale), averaged over the unit's features.
    A channel is one feature.  A KV group spans per_group * head_dim features: activation,
    wanda and flap average over them (Eq. 5 flattens the head's features), fluctuation sums.
    """
    weights = weights if weights is not None else weight_terms(taps)
    out: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for index, shape in enumerate(taps.shapes):
        for kind in KINDS:
            stats = taps.stats[(index, kind)]
            col_abs_mean, col_sq_norm = weights[(index, kind)]
            n = stats.tokens[group].clamp_min(1.0)
            mean_abs = stats.abs_sum[group] / n
            mean = stats.sum[group] / n
            rms = (stats.sq_sum[group] / n).sqrt()
            var = (stats.sq_sum[group] / n - mean * mean).clamp_min(0.0)
            wanda = rms * col_abs_mean
            fluct = var * col_sq_norm
            units = shape.count(kind)
            width = shape.per_group * shape.head_dim if kind == HEAD else 1
            spread = fluct.std() if fluct.numel() > 1 else fluct.new_zeros(())
            standard = (fluct - fluct.mean()) / spread if spread > 0 else torch.zeros_like(fluct)
            out[(index, kind)] = {
                "activation": mean_abs.reshape(units, width).mean(1),
                "wanda": wanda.reshape(units, width).mean(1),
                "fluctuation": fluct.reshape(units, width).sum(1),
                "flap": standard.reshape(units, width).mean(1),
            }
    return out
