"""Working copies of a decoder layer (core/working_layers.py): the repair's passes run on them, so
each must compute what the layer itself computes, and leave the layer alone."""

from __future__ import annotations

import pytest
import torch

from bonsai.stages.core.families import family_for_model_type
from bonsai.stages.core.families.remote_code import get_module
from bonsai.stages.core.least_squares import capture_layer_inputs, run_layer
from bonsai.stages.core.model_io import load_model
from bonsai.stages.core.units import CHANNEL, HEAD, layer_shapes, output_projection
from bonsai.stages.core.working_layers import refresh, working_copy

from tiny import ids_for


def _layer(zoo, spec: str):
    model = load_model(zoo[spec], torch.float32, torch.device("cpu"))
    family = family_for_model_type(model.config.model_type)
    ids = ids_for(model, rows=3, length=12)
    hidden, calls = capture_layer_inputs(model, family, ids)
    return model, family, get_module(model, family.layers)[0], layer_shapes(model, family)[0], hidden, calls[0]


@pytest.mark.parametrize("spec", ["llama", "llama-gqa", "qwen3", "phi"])
def test_a_sliced_copy_computes_the_layer_with_its_units_removed(zoo, spec):
    model, family, layer, shape, hidden, call = _layer(zoo, spec)
    groups, channels = [g for g in range(shape.groups) if g % 2 == 0], list(range(0, shape.channels, 3))
    copy = working_copy(layer, family, shape, 0, keep=(groups, channels))
    with torch.no_grad():
        sliced = run_layer(copy, hidden, call)
        width = shape.per_group * shape.head_dim
        heads = output_projection(layer, family, HEAD).weight
        for g in set(range(shape.groups)) - set(groups):
            heads[:, g * width : (g + 1) * width] = 0
        mlp_out = output_projection(layer, family, CHANNEL).weight
        mlp_out[:, sorted(set(range(shape.channels)) - set(channels))] = 0
        masked = run_layer(layer, hidden, call)
    assert torch.allclose(sliced, masked, rtol=1e-5, atol=1e-6)
    assert output_projection(copy, family, CHANNEL).in_features == len(channels)


def test_a_cast_copy_gives_the_bits_autocast_gives(zoo):
    """Weights cast once are the weights autocast casts at every call: the same products."""
    _, family, layer, shape, hidden, call = _layer(zoo, "llama-gqa")
    copy = working_copy(layer, family, shape, 0, dtype=torch.bfloat16)
    assert output_projection(copy, family, CHANNEL).weight.dtype == torch.bfloat16
    assert output_projection(layer, family, CHANNEL).weight.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(run_layer(copy, hidden, call), run_layer(layer, hidden, call))


def test_hooks_and_stand_ins_on_a_copy_leave_the_layer_alone(zoo):
    _, family, layer, shape, hidden, call = _layer(zoo, "llama")
    before = {name: module for name, module in layer.named_modules()}
    copy = working_copy(layer, family, shape, 0, dtype=torch.bfloat16, keep=([0], [0, 1]))
    seen = []
    output_projection(copy, family, CHANNEL).register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    get_module(copy, family.attention).forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("stand-in"))
    with torch.no_grad():
        run_layer(layer, hidden, call)
    assert seen == []
    assert {name: module for name, module in layer.named_modules()} == before
    assert output_projection(layer, family, CHANNEL).in_features == shape.channels


def test_a_refreshed_copy_takes_the_layers_new_weight(zoo):
    _, family, layer, shape, hidden, call = _layer(zoo, "llama")
    kept = torch.tensor([0, 2, 5])
    copy = working_copy(layer, family, shape, 0, dtype=torch.bfloat16, keep=(list(range(shape.groups)), kept.tolist()))
    target = output_projection(layer, family, CHANNEL)
    with torch.no_grad():
        target.weight.mul_(2.0)
    refresh(copy, layer, family, CHANNEL, kept)
    mine = output_projection(copy, family, CHANNEL)
    assert mine.weight.dtype == torch.bfloat16
    assert torch.equal(mine.weight, target.weight[:, kept].to(torch.bfloat16))
