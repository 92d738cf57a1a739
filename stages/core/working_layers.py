"""Working copies of a decoder layer, for the repair's passes (reconstruction.py).

The repair runs every calibration batch through each layer, twice under the stream aim, with
the model's weights in float32 (the least squares needs them wide) and the passes under
autocast to bfloat16 on a CPU.  Autocast casts each weight again at every call: a product with
a freshly cast weight took 3-8 % longer than with a weight kept in bfloat16 at SmolLM2's shapes
(benchmarks/cast_once.py).  So each layer's passes run on a copy whose projections' weights are
cast once (their biases stay as they are, which autocast casts as before: the same products).
A copy may also be sliced to the units its pass keeps, where nothing reads the removed units'
inputs (the stream aim's fit takes the kept columns alone): the removed heads' and channels'
products are then not computed at all.

A copy shares everything but the modules on the way to its projections (the layer, its
attention and MLP blocks: new objects with their own child and hook tables) and the
projections themselves, so hooks and stand-ins set on the copy leave the model alone.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from bonsai.stages.core.families.base import Family
from bonsai.stages.core.families.remote_code import get_module
from bonsai.stages.core.slicing import linear_from, set_module, slice_layer
from bonsai.stages.core.units import HEAD, LayerShape, output_projection


def _detached(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` with tables of its own (children, parameters, hooks)."""
    new = copy.copy(module)
    new.__dict__ = {k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in module.__dict__.items()}
    return new


def _owned_path(root: nn.Module, dotted: str) -> None:
    """Give ``root`` (a detached copy) its own copies of the modules along ``dotted``."""
    for part in dotted.split("."):
        child = _detached(getattr(root, part))
        setattr(root, part, child)
        root = child


def _cast(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None) -> nn.Linear:
    """A new module: ``weight`` in ``dtype`` (None: the weight itself), ``bias`` as it is."""
    weight = weight.detach() if dtype is None else weight.detach().to(dtype)
    return linear_from(weight, None if bias is None else bias.detach(), requires_grad=False)


def _projections(family: Family) -> list[tuple[str, str]]:
    names = [*family.query, *family.key_value, family.attention_out]
    return [(family.attention, n) for n in names] + [(family.mlp, n) for n in (*family.mlp_in, family.mlp_out)]


@torch.no_grad()
def working_copy(
    layer: nn.Module,
    family: Family,
    shape: LayerShape,
    index: int,
    dtype: torch.dtype | None = None,
    keep: tuple[list[int], list[int]] | None = None,
) -> nn.Module:
    """A copy of decoder layer ``index`` whose projections' weights are in ``dtype`` (None: as
    they are), sliced to ``keep`` (the KV groups and channels, current positions) when given."""
    work = _detached(layer)
    for path in {family.attention, family.mlp}:
        _owned_path(work, path)
    if keep is not None:
        slice_layer(work, family, shape, index, *keep)
    for path, name in _projections(family):
        module = get_module(work, path)
        linear = getattr(module, name)
        setattr(module, name, _cast(linear.weight, linear.bias, dtype))
    return work


@torch.no_grad()
def refresh(work: nn.Module, layer: nn.Module, family: Family, kind: str, columns: torch.Tensor | None) -> None:
    """After ``layer``'s ``kind`` output projection changed: the copy's takes its new weight and
    bias (``columns``: the kept columns a sliced copy holds; None: all)."""
    source = output_projection(layer, family, kind)
    weight = source.weight if columns is None else source.weight.index_select(1, columns)
    updated = _cast(weight, source.bias, output_projection(work, family, kind).weight.dtype)
    path = family.attention if kind == HEAD else family.mlp
    name = family.attention_out if kind == HEAD else family.mlp_out
    set_module(work, f"{path}.{name}", updated)
