"""Sub-models scored as they will be used: a dropped unit's inputs imputed, not zeroed.

The repair (reconstruction.py) moves a removal onto the kept columns of the output projection,
W_K' = W_K + W_P G_PK (G_KK + lambda I)^-1.  Applied to an input x that is W_K x_K + W_P x^_P
with x^_P = G_PK (G_KK + lambda I)^-1 x_K: the removed inputs replaced by their damped
least-squares prediction from the kept ones.  So a sub-model is scored as the repair would
leave it by writing x^_P into the projection's input where the mask wrote zeros: no weight is
copied, as with the masks, and rows of one batch may still carry different sub-models.

With H = G + lambda I, block inversion gives G_PK (G_KK + lambda I)^-1 = -([H^-1]_PP)^-1 [H^-1]_PK,
so the rows of H^-1 that belong to a layer's candidates, computed once per iteration, serve
every sub-model: each needs one |P| x |P| solve per layer and a tokens x d x |P| product (about
3 % of its forward pass at SmolLM2's shapes).  With ``--reconstruct-fit weights+bias`` the same
holds for the centred moments, x^_P = mu_P + (x_K - mu_K) B; with ``bias`` (FLAP's
compensation) x^_P = mu_P.  Both are x^_P = offset - x_masked M^T, which is what ``Imputation``
holds.  This is the one-shot update from the current model's statistics; the repair itself
then runs layer after layer on the pruned model's inputs, so the two agree to first order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bonsai.stages.core.least_squares import damped_factor


@dataclass(frozen=True)
class LayerStatistics:
    """What one (layer, kind) output projection needs for any sub-model's imputation."""

    units: torch.Tensor  # (c,) positions of the candidate units, ascending
    width: int  # input columns per unit
    rows: torch.Tensor | None  # (c * width, d) the candidates' rows of H^-1; None: mean imputation only
    mean: torch.Tensor | None  # (d,) the inputs' mean, when the repair fits a bias

    def columns(self, units: torch.Tensor) -> torch.Tensor:
        return (units.unsqueeze(1) * self.width + torch.arange(self.width)).reshape(-1)


@dataclass(frozen=True)
class Imputation:
    """x[..., columns] = offset - x_masked @ weight (``weight`` None: the offset alone)."""

    columns: torch.Tensor  # (p,) input columns of the dropped units
    weight: torch.Tensor | None  # (d, p)
    offset: torch.Tensor | None  # (p,)

    def apply(self, x: torch.Tensor) -> None:
        """In place on ``x`` (..., d), whose dropped columns the mask has zeroed."""
        value = -(x @ self.weight) if self.weight is not None else x.new_zeros(*x.shape[:-1], len(self.columns))
        if self.offset is not None:
            value = value + self.offset
        x[..., self.columns] = value


def inverse_rows(gram: torch.Tensor, damping: float, columns: torch.Tensor) -> torch.Tensor:
    """Rows ``columns`` of (G + lambda I)^-1, lambda = damping * mean diag G (raised as the
    repair raises it while G + lambda I is not positive definite); ``gram`` is consumed."""
    factor, _ = damped_factor(gram, damping)
    selector = torch.zeros(gram.shape[0], len(columns), dtype=gram.dtype, device=gram.device)
    selector[columns, torch.arange(len(columns))] = 1.0
    return torch.cholesky_solve(selector, factor).T.contiguous()


def imputation(stats: LayerStatistics, dropped: torch.Tensor, dtype: torch.dtype) -> Imputation | None:
    """The imputation of a sub-model that drops ``stats.units[dropped]`` (a bool mask over them)."""
    if not bool(dropped.any()):
        return None
    local = dropped.nonzero().squeeze(1)
    columns = stats.columns(stats.units[local])
    weight = offset = None
    if stats.rows is not None:
        rows = stats.rows[stats.columns(local)].double()  # [H^-1]_P.
        m = torch.linalg.solve(rows[:, columns], rows)  # ([H^-1]_PP)^-1 [H^-1]_P.; its P columns are I
        weight = m.T.to(dtype).contiguous()
        if stats.mean is not None:  # centred: x^_P = -(x_masked - mu) M^T
            offset = (stats.mean.double() @ m.T).to(dtype)
    elif stats.mean is not None:
        offset = stats.mean[columns].to(dtype)
    return Imputation(columns.to(stats.units.device), weight, offset)
