"""The repair-aware prior: per unit, the output error its removal leaves after the repair.

The repair (core/reconstruction.py) refits the kept columns of an output projection W by least
squares on G = sum x x^T.  Removing one input j with every other one kept and refitted leaves
the error ||W[:, j]||^2 / [G^-1]_jj (the Schur complement of G_jj: what the other inputs cannot
predict of x_j, weighted by what W does with it): the Optimal Brain Surgeon saliency of a
column.  A head group (a KV group's columns B of the attention output) leaves
tr(W_B ([G^-1]_BB)^-1 W_B^T), its block form.  A unit whose output its neighbours predict
well is cheap to remove *because* the repair will take it over; the Wanda prior cannot see
that.  G is damped as the repair damps it (lambda = damping * mean diag G), and centred
(the covariance) when the repair fits a bias, whose intercept then carries the mean.

Removing one unit at a time misses that two units which predict each other are each cheap
alone and dear together, so the units are scored in the greedy order of their removal, up
to as many as the masks stage makes candidates (``unit_errors``).

The prior is the root of the mean error per token, which grows like an activation times a
weight (the scale Wanda's prior has), so that the Gumbel sampling of the masks stage sees
differences of the same size.  Layers are visited in order on the current model, one
layer's two Gram matrices at a time: the memory of one repair step, not of all layers.
"""

from __future__ import annotations

import torch
from torch import nn

from bonsai.stages.core.families.base import Family
from bonsai.stages.core.least_squares import damped_inverse, layer_grams
from bonsai.stages.core.units import HEAD


def _scores(w: torch.Tensor, inverse: torch.Tensor, width: int, units: torch.Tensor) -> torch.Tensor:
    """tr(W_B ([H^-1]_BB)^-1 W_B^T) for each unit u in ``units``, B its ``width`` columns."""
    if width == 1:
        return (w[:, units] ** 2).sum(0) / inverse.diagonal()[units]
    cols = (units.unsqueeze(1) * width + torch.arange(width)).reshape(-1)
    blocks = torch.stack([inverse[u * width : (u + 1) * width, u * width : (u + 1) * width] for u in units.tolist()])
    columns = w[:, cols].T.reshape(len(units), width, -1)  # (units, width, out): W_B^T per unit
    solved = torch.cholesky_solve(columns, torch.linalg.cholesky(blocks))  # ([H^-1]_BB)^-1 W_B^T
    return (columns * solved).sum((1, 2))


def unit_errors(weight: torch.Tensor, gram: torch.Tensor, width: int, damping: float, steps: int = 0) -> torch.Tensor:
    """Per unit of ``width`` consecutive input columns, a squared output error (summed over the
    tokens ``gram`` was summed over; ``gram``, d x d float64, is consumed).

    With ``steps`` 0: what removing the unit alone leaves after the least-squares refit of all
    the other columns.  With ``steps`` k: k units are removed one at a time, each the one whose
    removal adds least to the error left after refitting the rest (the OBS update of W and of
    H^-1), and each gets that increase; the others get the larger of their score after the k
    removals and the largest increase recorded, so that the k cheapest units by this measure
    are the greedy set.  One-at-a-time scores miss that two units predicting each other are
    each cheap alone and dear together; the greedy order does not."""
    d = gram.shape[0]
    if d == 0:
        return gram.new_zeros(0)
    inverse = damped_inverse(gram, damping)
    w = weight.double().clone() if steps else weight.double()
    units = d // width
    alive = torch.ones(units, dtype=torch.bool)
    out = torch.zeros(units, dtype=torch.float64)
    for _ in range(min(steps, units)):
        index = alive.nonzero().squeeze(1)
        scores = _scores(w, inverse, width, index)
        pick = int(index[int(torch.argmin(scores))])
        out[pick] = scores.min()
        alive[pick] = False
        block = torch.arange(pick * width, (pick + 1) * width)
        update = torch.linalg.solve(inverse[block][:, block], inverse[block])  # ([H^-1]_BB)^-1 H^-1_B.
        w -= w[:, block] @ update  # the refit of the columns kept; W_B becomes 0
        inverse -= inverse[:, block] @ update
        w[:, block] = 0
    if alive.any():
        index = alive.nonzero().squeeze(1)
        floor = out[~alive].max() if steps and (~alive).any() else torch.zeros((), dtype=torch.float64)
        out[index] = torch.maximum(_scores(w, inverse, width, index), floor)
    return out


@torch.no_grad()
def repair_aware_priors(
    model: nn.Module,
    family: Family,
    windows: torch.Tensor,
    damping: float,
    centred: bool,
    batch_size: int,
    steps=lambda units: 0,
) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, kind): per current unit, sqrt(error per token)} for every layer, from one
    layer-by-layer pass of ``windows`` through the current model.  ``steps(units)``: how many
    of a group's units ``unit_errors`` removes greedily (the masks stage's candidates)."""
    out = {}
    for index, shape, targets, sums in layer_grams(model, family, windows, batch_size, "repair-aware prior"):
        for kind, acc in sums.items():
            gram = acc.gram_matrix(centred)
            width = shape.per_group * shape.head_dim if kind == HEAD else 1
            errors = unit_errors(targets[kind].weight.detach(), gram, width, damping, steps(shape.count(kind)))
            out[(index, kind)] = (errors.clamp_min(0.0) / max(acc.tokens, 1)).sqrt()
    return out
