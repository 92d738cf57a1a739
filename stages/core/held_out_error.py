"""The repair's held-out check: how much of a projection's output a removal loses, and how much
its update leaves lost, on windows the update was not fitted on (reconstruction.py applies an
update only where the second is smaller)."""

from __future__ import annotations

import math

import torch
from torch import nn


def relative_errors(
    weight: torch.Tensor, new_kept: torch.Tensor, held: list, kept, shift: torch.Tensor | None = None
) -> tuple[float, float]:
    """sqrt(sum ||W' x + b' - W x||^2 / sum ||W x||^2) over the held-out inputs, for W' the
    kept columns unchanged (plain removal, b' = 0) and ``new_kept`` with ``shift`` (the update),
    zero elsewhere; one pass.  Inputs narrower than float32 (the passes' dtype) go to
    ``_narrow_errors``; float32 ones are measured as since 0.2.0, so that a float32 run's repair
    tables keep their bytes and its resumed runs find their later work (tests/test_resume.py)."""
    if held and held[0].dtype != torch.float32:
        return _narrow_errors(weight, new_kept, held, kept, shift)
    w = weight.float()
    candidates = ((weight.index_select(1, kept).float(), None), (new_kept.float(), shift))
    errors, energy = [0.0, 0.0], 0.0
    for x in held:
        x = x.float()
        full = x @ w.T
        x_kept = x.index_select(1, kept)
        for i, (w_kept, b) in enumerate(candidates):
            out = x_kept @ w_kept.T if b is None else x_kept @ w_kept.T + b.float()
            errors[i] += float((out - full).double().square().sum())
        energy += float(full.double().square().sum())
    return _ratios(errors, energy)


def _narrow_errors(weight, new_kept, held, kept, shift) -> tuple[float, float]:
    """``relative_errors`` in the inputs' narrow dtype, each error the product of x with a weight
    difference (the removal's: W on the removed columns, zero on the kept; the update's: W' - W,
    formed in float32), so that rounding touches the difference itself, not the two outputs it
    is the difference of (three products of x whole: gathering its columns costs more).  Beside
    the three narrow weights, one float32 temporary of the kept columns' shape."""
    dtype = held[0].dtype
    full = weight.to(dtype)
    removal = full.clone()
    removal[:, kept] = 0
    update = -full
    update[:, kept] = (new_kept.float() - weight.index_select(1, kept).float()).to(dtype)
    bias = shift.to(dtype) if shift is not None else None
    errors, energy = [0.0, 0.0], 0.0

    def squared(out: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(out, dtype=torch.float32)) ** 2

    for x in held:
        errors[0] += squared(nn.functional.linear(x, removal))
        errors[1] += squared(nn.functional.linear(x, update, bias))
        energy += squared(nn.functional.linear(x, full))
    return _ratios(errors, energy)


def errors_to_target(weight: torch.Tensor, new_kept: torch.Tensor, held: list, kept) -> tuple[float, float]:
    """sqrt(sum ||x_K W_K^T - t||^2 / sum ||t||^2) over the held-out (x, t), for the kept columns
    unchanged and for ``new_kept``: the check of a fit aimed at a target t other than W x
    (repair_fit.py's ``stream``)."""
    w_old, w_new = weight.index_select(1, kept).float(), new_kept.float()
    errors, energy = [0.0, 0.0], 0.0
    for x, t in held:
        x_kept = x.float().index_select(1, kept)
        t = t.reshape(-1, t.shape[-1]).float()
        for i, w in enumerate((w_old, w_new)):
            errors[i] += float((nn.functional.linear(x_kept, w) - t).double().square().sum())
        energy += float(t.double().square().sum())
    return _ratios(errors, energy)


def _ratios(errors: list[float], energy: float) -> tuple[float, float]:
    if energy <= 0:
        return 0.0, 0.0
    before, after = (math.sqrt(e / energy) for e in errors)
    return before, after
