"""Forward-only repair of what a removal breaks: least-squares updates of the kept columns.

Removing heads and channels deletes columns of each layer's attention-output and MLP-output
projections, and with them part of every output.  The kept columns can take over much of it:
with G = sum over calibration tokens of x x^T, x the projection's input with all its units,

    W_K' = W_K + W_P G_PK (G_KK + lambda I)^-1,   lambda = damping * mean(diag(G_KK))

is the least-squares fit of the full output W x by the kept inputs, shrunk toward the current
W_K (not toward zero, which measured far worse).  With ``aim="stream"`` the fit aims instead at
the unrepaired model's residual stream after the projection's sum, undoing the earlier layers'
drift too (repair_fit.py; the published repair's).  Layers are repaired in order, each one's G collected
through the already repaired (and pruned) layers before it: every decoder layer's input
hidden states are kept between layers.  The pass that collects a projection's inputs replaces
the projection by its bias and keeps what follows it (for heads the attention module's output,
for channels the layer's output; not for Gemma 2, which normalises the MLP output before the
residual sum), and that is completed once with x_K W_K'^T after the update: the projection's
product is computed once, with its new weight, and the attention once per layer.  The pass ends
at the last layer that changes.  So an iteration costs about one forward pass over its windows
(it keeps the projection's inputs, tokens x width, until the layer is done).  The passes run on
a working copy of each layer (working_layers.py): weights cast once to the passes' dtype, and
under the stream aim, whose fit reads only the kept inputs, sliced to the kept units.
Held-out windows check each update (held_out_error.py): one that does not lower that
projection's output error there is not applied (the error is taken from their inputs, kept, not
from a second Gram matrix).  Memory beyond the model: one projection's G (float64, d x d), made into G_KK and its
Cholesky factor in its own storage, an out x k right-hand side, the windows' hidden states and
one layer's MLP-output inputs (BENCHMARKS.md measures it at LLaMA-2-7B's shapes).  Where keeping
those activations would take the repair past its memory bound, each layer is run again instead
(repair_memory.py).

The model is changed in place (removed columns zeroed, kept ones updated), which is exactly
the pruned model; ``repair`` returns the updated tensors and a table of what it did.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from bonsai.stages.core.families.base import Family
from bonsai.stages.core.families.remote_code import get_module
from bonsai.stages.core.held_out_error import errors_to_target, relative_errors
from bonsai.stages.core.least_squares import (
    BLOCK,
    MAX_RETRIES,
    capture_layer_inputs,
    run_layer,
)
from bonsai.stages.core.options import FINAL_TOKENS_PER_COLUMN, RECONSTRUCT_FITS
from bonsai.stages.core.progress import Progress
from bonsai.stages.core.repair_fit import AIMS, Collect, Moments, reference_layer, stream_target
from bonsai.stages.core.repair_memory import keeps_activations
from bonsai.stages.core.units import CHANNEL, HEAD, LayerShape, layer_shapes, output_projection
from bonsai.stages.core.working_layers import refresh, working_copy

log = logging.getLogger("bonsai.reconstruct")

PROJECTIONS = {HEAD: "attention_out", CHANNEL: "mlp_out"}
FITS = RECONSTRUCT_FITS  # what the repair fits (``fit_projection``)


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


@dataclass
class Repaired:
    """What a repair wrote into one projection."""

    weight: torch.Tensor  # the kept columns (out x k)
    bias: torch.Tensor | None  # the whole new bias, when the repair fitted one


def add_bias(linear: nn.Linear, shift: torch.Tensor) -> None:
    """linear.bias += shift, giving the projection a bias first if it had none (the export
    records that in the config: families/remote_code.py)."""
    if linear.bias is None:
        linear.bias = nn.Parameter(
            torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device),
            requires_grad=False,
        )
    linear.bias.data += shift.to(linear.bias.dtype)


class _Stop(Exception):
    """Raised by a hook once it has what it came for: the rest of the layer is not run."""


def _columns(kind: str, shape: LayerShape, positions: list[int]) -> torch.Tensor:
    width = shape.per_group * shape.head_dim if kind == HEAD else 1
    base = torch.tensor(positions, dtype=torch.long).unsqueeze(1) * width
    return (base + torch.arange(width)).reshape(-1)


@contextlib.contextmanager
def _replaced(module: nn.Module, forward):
    """``module`` computes ``forward`` instead of its own forward, for the duration."""
    module.forward = forward
    try:
        yield
    finally:
        del module.forward


def _forward_in(dtype: torch.dtype | None, device: torch.device):
    """Where the layer passes run: under autocast to ``dtype`` (None: the model's own dtype)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _bias_only(linear: nn.Linear):
    """A stand-in for ``linear`` that returns its bias (or zeros): the pass that collects its
    inputs skips its product, which the repair adds back once with the new weight."""

    def forward(x):
        out = x.new_zeros(*x.shape[:-1], linear.out_features)
        return out if linear.bias is None else out + linear.bias

    return forward


def _pass(layer, family, kind, batch, call, shortcut: bool, attention=None) -> tuple[torch.Tensor, object]:
    """One batch through ``layer`` for the ``kind`` projection: (its input, what the shortcut
    keeps).  Without ``shortcut`` the pass stops at the projection and keeps nothing.  With it,
    the projection returns only its bias (the repair adds x W'^T later, once): for heads the
    pass stops after the attention module and keeps the module's output; for channels it runs
    the whole layer and keeps the layer's output.  ``attention``: the attention module's output
    for this batch, returned instead of computing it again."""
    target, seen, kept = output_projection(layer, family, kind), [], []
    attention_module = get_module(layer, family.attention)

    def take_input(module, args):
        seen.append(args[0])
        if not shortcut:
            raise _Stop

    def take_attention(module, args, output):
        kept.append(output)
        raise _Stop

    with contextlib.ExitStack() as stack:
        stack.callback(target.register_forward_pre_hook(take_input).remove)
        if shortcut:
            stack.enter_context(_replaced(target, _bias_only(target)))
            if kind == HEAD:
                stack.callback(attention_module.register_forward_hook(take_attention).remove)
        if attention is not None:
            stack.enter_context(_replaced(attention_module, lambda *args, **kwargs: attention))
        try:
            kept.append(run_layer(layer, batch, call))
        except _Stop:
            pass
    return seen[0], (kept[0] if shortcut else None)


def _complete(partial, x: torch.Tensor, weight: torch.Tensor, columns: torch.Tensor | None, shift=None):
    """What a shortcut pass kept, with the projection's product added: ``partial`` + x_K W_K^T,
    and the bias change ``shift`` when the repair made one (the pass added the old bias); on the
    first element when ``partial`` is a module's tuple.  ``columns``: the kept columns, and
    ``weight`` W's kept columns; None: ``weight`` is all of W, zero off the kept columns, and x
    is taken whole (for narrow passes, where gathering x's columns costs more than multiplying
    the zeros)."""
    bias = shift.to(weight.dtype) if shift is not None else None
    product = nn.functional.linear(x if columns is None else x.index_select(-1, columns), weight, bias)
    if isinstance(partial, tuple):
        return (partial[0] + product, *partial[1:])
    return partial + product


def _run_with(layer, family, hidden: torch.Tensor, call, attention) -> torch.Tensor:
    if attention is None:
        return run_layer(layer, hidden, call)
    with _replaced(get_module(layer, family.attention), lambda *args, **kwargs: attention):
        return run_layer(layer, hidden, call)


def _compact(gram: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """G_KK moved into the first k*k elements of G's own storage, returned as a k x k view (G is
    destroyed).  Rows are moved in increasing order: row i goes to offset i*k <= kept[i]*d,
    below every row still to be read, so no copy of G is needed."""
    flat, k = gram.view(-1), len(kept)
    for i, row in enumerate(kept.tolist()):
        flat[i * k : (i + 1) * k] = gram[row].index_select(0, kept)
    return flat[: k * k].view(k, k)


def _factor(g: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
    """(the Cholesky factor of the symmetric g, whether it is positive definite).  On the CPU
    the factor overwrites g's lower triangle (LAPACK on g's own memory; the strict upper
    triangle keeps g); elsewhere it is a new tensor."""
    if g.device.type != "cpu":
        factor, info = torch.linalg.cholesky_ex(g)
        return factor, int(info) == 0
    from scipy.linalg import lapack  # here: scipy.linalg costs a command's start-up 0.4 s

    # g is C-ordered and symmetric: its transpose is the same matrix in Fortran order, whose
    # upper triangle is g's lower one; overwritten in place, no copy
    _, info = lapack.dpotrf(g.numpy().T, lower=0, clean=0, overwrite_a=1)
    return None, info == 0


def _restore(g: torch.Tensor, diagonal: torch.Tensor) -> None:
    """Undo a failed in-place factorization: the lower triangle from the upper, and the diagonal."""
    a = g.numpy()
    for i in range(a.shape[0] - 1):
        a[i + 1 :, i] = a[i, i + 1 :]
    g.diagonal().copy_(diagonal)


def solve(weight: torch.Tensor, moments: Moments, kept: torch.Tensor, damping: float) -> tuple[torch.Tensor, float]:
    """(W_K', damping used): ((W G)_K + lambda W_K) (G_KK + lambda I)^-1 in float64, which is
    W_K + W_P G_PK (G_KK + lambda I)^-1.
    The damping is raised tenfold (with a warning) until G_KK + lambda I is positive definite.
    Consumes ``moments.gram``: G_KK and its factor are made in G's own memory, so the solve
    needs the d x d sums and an out x k right-hand side, nothing more (at LLaMA-7B's MLP width,
    970 MB instead of four times that)."""
    order = torch.argsort(kept)
    if not torch.equal(order, torch.arange(len(kept), device=kept.device)):  # _compact needs them ascending
        new, used = solve(weight, moments, kept[order], damping)
        return new[:, torch.argsort(order)], used
    rhs = moments.target_columns(weight, kept)
    g = _compact(moments.gram, kept.to(moments.gram.device))
    diagonal = g.diagonal().clone()
    scale = float(diagonal.mean()) if len(kept) else 0.0
    added = 0.0  # lambda W_K already in rhs
    for _ in range(MAX_RETRIES + 1):
        lam = damping * scale
        for s in range(0, weight.shape[0], BLOCK):  # a block of W_K's rows at a time: no copy of W_K
            rhs[s : s + BLOCK].add_(weight[s : s + BLOCK].index_select(1, kept), alpha=lam - added)
        added = lam
        g.diagonal().copy_(diagonal + lam)
        factor, ok = _factor(g)
        if ok:
            # X (G_KK + lam I) = T_K + lam W_K  <=>  (G_KK + lam I) X^T = (T_K + lam W_K)^T
            if factor is not None:
                return torch.cholesky_solve(rhs.T, factor).T, damping
            from scipy.linalg import lapack

            lapack.dpotrs(g.numpy().T, rhs.numpy().T, lower=0, overwrite_b=1)
            return rhs, damping
        if factor is None:
            _restore(g, diagonal)
        log.warning("G_KK + %g * mean diagonal is not positive definite; raising the damping", damping)
        damping = max(damping * 10, 1e-6)
    raise RuntimeError("the Gram matrix stays singular however large the damping")


def fit_projection(
    weight: torch.Tensor, moments: Moments, kept: torch.Tensor, damping: float, fit: str
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(W_K', the bias change or None, damping used) for one projection under ``fit`` (FITS).

    With a bias, the least squares has an intercept: with mu = the inputs' mean over the fit
    tokens, W_K' is ``solve`` on the centred moments (G - n mu mu^T: the covariance, damped
    relative to its own diagonal) and the bias changes by W mu - W_K' mu_K, so the output's
    mean is kept exactly on the fit tokens; the intercept itself is not damped.  The bias
    alone (W_K' = W_K) changes by W_P mu_P.  Consumes ``moments.gram``."""
    if fit == "weights":
        new, used = solve(weight, moments, kept, damping)
        return new, None, used
    mean = moments.sum / max(moments.tokens, 1)
    if fit == "bias" or len(kept) == 0:
        new, used = weight.index_select(1, kept).double(), damping
    else:
        moments.gram.addr_(moments.sum, mean, alpha=-1.0)  # G - n mu mu^T, in place
        new, used = solve(weight, moments, kept, damping)
    shift = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    for s in range(0, weight.shape[0], BLOCK):
        shift[s : s + BLOCK] = weight[s : s + BLOCK].double() @ mean - new[s : s + BLOCK] @ mean.index_select(0, kept)
    return new, shift, used


def changed(keep: dict, shapes: list[LayerShape]) -> list[tuple[int, str]]:
    """(layer, kind) of the output projections that lose units under ``keep``."""
    return [(i, k) for i, shape in enumerate(shapes) for k in (HEAD, CHANNEL) if len(keep[(i, k)]) != shape.count(k)]


@torch.no_grad()
def repair(
    model: nn.Module,
    family: Family,
    windows: torch.Tensor,
    check: int,
    keep: dict,
    damping: float,
    batch_size: int,
    shortcut: bool | None = None,
    fit: str = "weights",
    forward_dtype: torch.dtype | None = None,
    final_damping: float | None = None,
    aim: str = "model",
) -> tuple[dict[tuple[int, str], Repaired], list[Outcome]]:
    """Repair every layer in order; ``keep[(layer, kind)]`` lists the current positions of the
    units that stay (all others of that layer and kind are removed).  The last ``check``
    windows only judge each update.  ``shortcut=False`` runs each layer again after its
    repair instead of completing the collecting passes' outputs (the same model: tests compare
    them); None: as repair_memory.py decides from the model's and the windows' sizes.
    ``fit``: what is fitted (FITS).  ``forward_dtype``: a narrower dtype than the model's for
    the layer passes and the Gram matrices' block products (autocast; the weights, the sums,
    the solve and the held-out check stay wide): bfloat16 on a CPU that multiplies it natively
    makes the repair 1.6x faster at the same held-out error (BENCHMARKS.md).  ``final_damping``:
    the damping of each projection with at least FINAL_TOKENS_PER_COLUMN fit tokens per kept
    column, in the last iteration, where no removal is chosen on the result.  Returns
    {(layer, kind): the kept columns' new weight and the projection's new bias} (projections
    whose update was applied) and one Outcome per projection that lost units.  ``aim``: what
    the fit aims at (repair_fit.py AIMS: the model's own output W x unless told)."""
    if aim not in AIMS:
        raise ValueError(f"aim {aim!r}: one of {AIMS}")
    aimed = aim != "model"
    if aimed and (fit != "weights" or shortcut is False or not family.mlp_out_adds_to_residual):
        raise ValueError(f"aim {aim!r} needs fit 'weights', the shortcut passes and outputs summed into the stream")
    device = next(model.parameters()).device
    model_dtype = next(model.parameters()).dtype
    lowered = forward_dtype if forward_dtype not in (None, model_dtype) else None
    product = lowered or torch.float32
    if shortcut is None:
        shortcut = aimed or keeps_activations(model, family, windows, lowered or model_dtype)
    fitted, held = windows[: windows.shape[0] - check], windows[windows.shape[0] - check :]
    batches = [
        part[s : s + batch_size].to(device) for part in (fitted, held) for s in range(0, part.shape[0], batch_size)
    ]
    fit_rows = math.ceil(fitted.shape[0] / batch_size)
    with _forward_in(lowered, device):
        captured = [capture_layer_inputs(model, family, ids) for ids in batches]
    hidden = [h for h, _ in captured]
    arguments = [c for _, c in captured]  # per batch, per layer
    del captured  # the first layer's inputs live on in ``hidden`` only, until replaced
    reference = [h.clone() for h in hidden] if aimed else None  # the unrepaired model's stream (repair_fit.py)
    shapes = layer_shapes(model, family)
    layers = list(get_module(model, family.layers))
    last = max((i for i, _ in changed(keep, shapes)), default=-1)  # later layers need no inputs: the pass ends there
    updated, outcomes = {}, []
    progress = Progress("reconstruct", last + 1, "layers")
    for index, (layer, shape) in enumerate(zip(layers[: last + 1], shapes)):
        calls = [c[index] for c in arguments]
        middle = []  # per batch: the unrepaired stream after the attention sum (its layer output: ``reference``)
        if aimed:
            unrepaired = working_copy(layer, family, shape, index, lowered) if lowered else layer
            for b, call in enumerate(calls):
                with _forward_in(lowered, device):
                    reference[b], after_attention = reference_layer(unrepaired, family, reference[b], call)
                middle.append(after_attention)
            del unrepaired
        # the passes run on a working copy (working_layers.py): weights cast once where the passes
        # are narrower than the model, and under the stream aim, whose fit reads the kept inputs
        # alone, sliced to the units this repair keeps
        sliced = aimed
        work = layer
        if sliced or (lowered and shortcut):  # running each layer again (for memory) makes no copy
            kept_units = (list(keep[(index, HEAD)]), list(keep[(index, CHANNEL)])) if sliced else None
            work = working_copy(layer, family, shape, index, lowered, kept_units)
        attention = None  # per batch: the attention module's output with the repaired heads
        outputs = None  # per batch: the layer's output with the repaired heads and channels
        for kind in (HEAD, CHANNEL):
            positions = list(keep[(index, kind)])
            target = output_projection(layer, family, kind)
            if len(positions) == shape.count(kind):
                continue  # nothing removed here this iteration
            kept = _columns(kind, shape, positions).to(target.weight.device)
            # what the fit sees: a sliced copy's inputs are the kept columns alone
            if sliced:
                fit_weight, fit_kept = target.weight.index_select(1, kept), torch.arange(len(kept), device=kept.device)
            else:
                fit_weight, fit_kept = target.weight, kept
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
            # the pass that collects the projection's inputs also gives what follows it (the
            # attention module's output, the layer's output), completed below with the new weight
            take = shortcut and (kind == HEAD or family.mlp_out_adds_to_residual)
            partial = []
            if positions or fit != "weights":  # with a bias, even a projection left with no inputs
                collect = Collect(fit_weight, fit, product, aimed)
                for b, (batch, call) in enumerate(zip(hidden, calls)):
                    with _forward_in(lowered, device):
                        x, part = _pass(work, family, kind, batch, call, take, attention[b] if attention else None)
                    t = None
                    if aimed:  # the pruned stream after the sum, the product left out: h + the bias
                        if kind == HEAD:
                            t = stream_target(middle[b], batch + (part[0] if isinstance(part, tuple) else part))
                            middle[b] = None
                        else:
                            t = stream_target(reference[b], part)
                    if take:
                        partial.append((x, part))
                        if attention:  # in this layer's output now: not needed again
                            attention[b] = None
                        if kind == CHANNEL:  # the layer's output is completed from this pass
                            hidden[b] = None
                    collect.add(b < fit_rows, x, t)
                tokens = collect.fit.tokens
                # less shrinkage only with data enough (BENCHMARKS.md, "The last repair shrinks less")
                enough = final_damping is not None and tokens >= FINAL_TOKENS_PER_COLUMN * len(kept)
                chosen = final_damping if enough else damping
                new_kept, shift, used = fit_projection(fit_weight, collect.moments(), fit_kept, chosen, fit)
                collect.fit.gram = None  # consumed by the solve: freed before the check's products
                if aimed:
                    before, after = errors_to_target(fit_weight, new_kept, collect.held, fit_kept)
                else:
                    before, after = relative_errors(target.weight, new_kept, collect.held, kept, shift)
                del collect  # the held-out inputs, before the next projection's
                outcome.tokens, outcome.damping, outcome.error_before, outcome.error_after = (
                    tokens,
                    used,
                    before,
                    after,
                )
                outcome.applied = after < before
                if not outcome.applied:
                    shift = None
                else:
                    target.weight[:, kept] = new_kept.to(target.weight.dtype)
                    if shift is not None:
                        add_bias(target, shift)
                    bias = target.bias.detach().clone() if shift is not None else None
                    updated[(index, kind)] = Repaired(target.weight[:, kept].clone(), bias)
            removed = torch.ones(target.in_features, dtype=torch.bool, device=kept.device)
            removed[kept] = False
            target.weight[:, removed] = 0  # the removal itself, so that later layers see the pruned model
            if work is not layer:
                refresh(work, layer, family, kind, kept if sliced else None)
            outcomes.append(outcome)
            if partial:
                # the copy's refreshed weight: all of W cast once, its removed columns zero, or a
                # sliced copy's kept columns (its inputs are those alone); without a copy, float32
                # passes multiply the kept columns (a float32 run's bytes stay 0.2.0's)
                if work is not layer:
                    weight, columns = output_projection(work, family, kind).weight, None
                else:
                    weight, columns = target.weight[:, kept], kept
                with _forward_in(lowered, device):
                    completed = [_complete(part, x, weight, columns, shift) for x, part in partial]
                attention, outputs = (completed, None) if kind == HEAD else (attention, completed)
            del partial
        if outputs is None:
            outputs = []
            for b, call in enumerate(calls):
                with _forward_in(lowered, device):
                    outputs.append(_run_with(work, family, hidden[b], call, attention[b] if attention else None))
                hidden[b] = None  # one batch's hidden states at a time live twice
                if attention:
                    attention[b] = None
        hidden = outputs
        del work  # before the next layer's copies are made
        progress.advance()
    return updated, outcomes
