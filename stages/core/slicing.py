"""Physically remove KV groups and MLP channels from a live model, in place.

Slicing copies the kept rows and columns exactly (``index_select``), so slicing in several
steps gives the same bytes as slicing once: a resumed run that re-slices the parent
straight to iteration k's state computes exactly what the uninterrupted run did.
"""

from __future__ import annotations

import torch
from torch import nn

from bonsai.stages.core.families.base import Family
from bonsai.stages.core.families.remote_code import EmptyAttention, get_module
from bonsai.stages.core.units import KeepState, LayerShape, layer_shapes


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool) -> nn.Linear:
    """A new nn.Linear holding ``weight`` and ``bias`` (their storage, not copies)."""
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=bias is not None, device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(weight.contiguous(), requires_grad=requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.contiguous(), requires_grad=requires_grad)
    return new


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    bias = linear.bias.index_select(0, rows) if linear.bias is not None else None
    return linear_from(linear.weight.index_select(0, rows), bias, linear.weight.requires_grad)


def _keep_cols(linear: nn.Linear, cols: torch.Tensor) -> nn.Linear:
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    return linear_from(linear.weight.index_select(1, cols), bias, linear.weight.requires_grad)


def _expand(positions: tuple[int, ...], width: int, device: torch.device) -> torch.Tensor:
    """Unit positions to feature indices: unit i covers features [i*width, (i+1)*width)."""
    base = torch.tensor(positions, dtype=torch.long, device=device).unsqueeze(1) * width
    return (base + torch.arange(width, device=device)).reshape(-1)


@torch.no_grad()
def slice_model(model: nn.Module, family: Family, keep: KeepState) -> None:
    """Keep, in every layer, the KV groups and channels at the given *current* positions."""
    shapes = layer_shapes(model, family)
    for index, (layer, shape) in enumerate(zip(get_module(model, family.layers), shapes)):
        slice_layer(layer, family, shape, index, keep.groups[index], keep.channels[index])


@torch.no_grad()
def slice_layer(layer: nn.Module, family: Family, shape: LayerShape, index: int, groups, channels) -> None:
    """Keep, in decoder layer ``index``, the KV groups ``groups`` and channels ``channels``
    (current positions): its sliced projections are new modules, the old ones are left as they were."""
    attention = get_module(layer, family.attention)
    device = getattr(attention, family.attention_out).weight.device
    if len(groups) != shape.groups or tuple(groups) != tuple(range(shape.groups)):
        if not groups:
            out = getattr(attention, family.attention_out)
            names = list(family.query) + list(family.key_value) + [family.attention_out]
            biases = {n: getattr(attention, n).bias is not None for n in names}
            empty = EmptyAttention(out.out_features, shape.head_dim, index, family.layout(), biases)
            empty.to(device=device, dtype=out.weight.dtype)
            if out.bias is not None:
                getattr(empty, family.attention_out).bias.copy_(out.bias)
            set_module(layer, family.attention, empty)
        else:
            q_rows = _expand(groups, shape.per_group * shape.head_dim, device)
            kv_rows = _expand(groups, shape.head_dim, device)
            for name in family.query:
                setattr(attention, name, _keep_rows(getattr(attention, name), q_rows))
            for name in family.key_value:
                setattr(attention, name, _keep_rows(getattr(attention, name), kv_rows))
            out = family.attention_out
            setattr(attention, out, _keep_cols(getattr(attention, out), q_rows))
    if len(channels) != shape.channels or tuple(channels) != tuple(range(shape.channels)):
        mlp = get_module(layer, family.mlp)
        device = getattr(mlp, family.mlp_out).weight.device
        rows = torch.tensor(channels, dtype=torch.long, device=device)
        for name in family.mlp_in:
            setattr(mlp, name, _keep_rows(getattr(mlp, name), rows))
        setattr(mlp, family.mlp_out, _keep_cols(getattr(mlp, family.mlp_out), rows))


def set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    """root.<dotted> = module."""
    parent, _, name = dotted.rpartition(".")
    setattr(get_module(root, parent) if parent else root, name, module)
