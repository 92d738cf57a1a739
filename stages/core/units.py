"""Prunable units and which of them a (sliced) model still has.

A unit is a whole key/value group of attention heads (kind ``head``; under MHA one head)
or one MLP intermediate channel (kind ``channel``).  Units keep the index they had in the
parent for the whole run, so tables from different iterations join on (layer, kind, unit)
even though the live model is re-sliced between iterations.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
from torch import nn

from bonsai.stages.core.families.base import Family
from bonsai.stages.core.families.remote_code import get_module, head_dim_of

HEAD, CHANNEL = "head", "channel"
KINDS = (HEAD, CHANNEL)

UNIT_SCHEMA = {"layer": pl.Int32, "kind": pl.Utf8, "unit": pl.Int32, "params": pl.Int64}


@dataclass(frozen=True)
class LayerShape:
    groups: int  # KV groups present now
    per_group: int  # query heads per KV group
    head_dim: int
    channels: int  # MLP channels present now
    group_params: int  # parameters that go with one KV group
    channel_params: int  # parameters that go with one channel

    def count(self, kind: str) -> int:
        return self.groups if kind == HEAD else self.channels

    def params(self, kind: str) -> int:
        return self.group_params if kind == HEAD else self.channel_params


def output_projection(layer: nn.Module, family: Family, kind: str) -> nn.Linear:
    """The projection whose input columns are a layer's units of ``kind``: attention-output
    for heads, MLP-output for channels (masking, priors and repairs all act there)."""
    if kind == HEAD:
        return getattr(get_module(layer, family.attention), family.attention_out)
    return getattr(get_module(layer, family.mlp), family.mlp_out)


def _rows_params(linear: nn.Linear, rows: int) -> int:
    return rows * (linear.in_features + (1 if linear.bias is not None else 0))


def layer_shapes(model: nn.Module, family: Family) -> list[LayerShape]:
    """Shapes read from the modules themselves, so they are right for sliced models too."""
    config = model.config
    head_dim = head_dim_of(config)
    per_group = config.num_attention_heads // getattr(config, "num_key_value_heads", config.num_attention_heads)
    shapes = []
    for layer in get_module(model, family.layers):
        attention = get_module(layer, family.attention)
        mlp = get_module(layer, family.mlp)
        kv0 = getattr(attention, family.key_value[0])
        groups = kv0.out_features // head_dim
        group_params = sum(_rows_params(getattr(attention, n), per_group * head_dim) for n in family.query)
        group_params += sum(_rows_params(getattr(attention, n), head_dim) for n in family.key_value)
        group_params += getattr(attention, family.attention_out).out_features * per_group * head_dim
        channels = getattr(mlp, family.mlp_out).in_features
        channel_params = sum(_rows_params(getattr(mlp, n), 1) for n in family.mlp_in)
        channel_params += getattr(mlp, family.mlp_out).out_features
        shapes.append(LayerShape(groups, per_group, head_dim, channels, group_params, channel_params))
    return shapes


@dataclass(frozen=True)
class KeepState:
    """Per layer, the parent's indices of the KV groups and channels still present."""

    groups: tuple[tuple[int, ...], ...]
    channels: tuple[tuple[int, ...], ...]

    @classmethod
    def full(cls, shapes: list[LayerShape]) -> KeepState:
        return cls(tuple(tuple(range(s.groups)) for s in shapes), tuple(tuple(range(s.channels)) for s in shapes))

    @classmethod
    def from_table(cls, table: pl.DataFrame, layers: int) -> KeepState:
        """From a keep table (layer, kind, unit, kept), as the select stage writes it."""
        kept = table.filter(pl.col("kept")).sort("layer", "kind", "unit")
        groups: list[list[int]] = [[] for _ in range(layers)]
        channels: list[list[int]] = [[] for _ in range(layers)]
        for layer, kind, unit in kept.select("layer", "kind", "unit").iter_rows():
            (groups if kind == HEAD else channels)[layer].append(unit)
        return cls(tuple(map(tuple, groups)), tuple(map(tuple, channels)))

    def units(self, kind: str) -> tuple[tuple[int, ...], ...]:
        return self.groups if kind == HEAD else self.channels

    def contains(self, other: KeepState) -> bool:
        return all(set(b) <= set(a) for kind in KINDS for a, b in zip(self.units(kind), other.units(kind)))

    def positions(self, within: KeepState) -> KeepState:
        """Where each unit of self sits among the units of ``within`` (for re-slicing)."""

        def locate(outer, inner):
            index = {u: i for i, u in enumerate(outer)}
            return tuple(index[u] for u in inner)

        return KeepState(
            tuple(locate(o, i) for o, i in zip(within.groups, self.groups)),
            tuple(locate(o, i) for o, i in zip(within.channels, self.channels)),
        )


def units_table(shapes: list[LayerShape], state: KeepState) -> pl.DataFrame:
    """One row per unit present now, in the canonical order (layer, kind, unit)."""
    rows = {"layer": [], "kind": [], "unit": [], "params": []}
    for layer, shape in enumerate(shapes):
        for kind in KINDS:
            for unit in state.units(kind)[layer]:
                rows["layer"].append(layer)
                rows["kind"].append(kind)
                rows["unit"].append(unit)
                rows["params"].append(shape.params(kind))
    return pl.DataFrame(rows, schema=UNIT_SCHEMA)


KEEP_FILE = "keep.parquet"


def read_keep_state(select_artifact) -> KeepState:
    """The cumulative keep-state a select-stage artifact wrote."""
    table = pl.read_parquet(select_artifact.file(KEEP_FILE))
    return KeepState.from_table(table, int(table["layer"].max()) + 1)
