"""A repair aimed at the parent's stream (core/repair_fit.py): each update is the damped least
squares of the unrepaired stream's drift on the pruned model's inputs, read back here from the
two models by hooks."""

from __future__ import annotations

import pytest
import torch

from bonsai.stages.core import reconstruction
from bonsai.stages.core.families import family_for_model_type
from bonsai.stages.core.model_io import load_model
from bonsai.stages.core.reconstruction import repair
from bonsai.stages.core.units import CHANNEL, HEAD, layer_shapes

from tiny import ids_for

DAMPING = 0.01


def _keep(shapes) -> dict:
    """Layer 0 loses every other head and channel, layer 1 every other channel: layer 1's MLP
    is fitted on a stream that layer 0's removal has moved."""
    keep = {(i, kind): list(range(s.count(kind))) for i, s in enumerate(shapes) for kind in (HEAD, CHANNEL)}
    for layer, kind in ((0, HEAD), (0, CHANNEL), (1, CHANNEL)):
        keep[(layer, kind)] = keep[(layer, kind)][::2]
    return keep


def _read(model, ids) -> dict[str, torch.Tensor]:
    """Layer 1's MLP: the down projection's input and output, and the stream before its sum."""
    layer, seen = model.model.layers[1], {}
    hooks = [
        layer.mlp.down_proj.register_forward_hook(lambda m, a, o: seen.update(x=a[0], out=o)),
        layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.update(stream=a[0])),
    ]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return {k: v.reshape(-1, v.shape[-1]).double() for k, v in seen.items()}


def test_a_stream_aimed_update_is_the_least_squares_fit_of_the_parents_stream(zoo, monkeypatch):
    parent = load_model(zoo["llama"], torch.float32, torch.device("cpu"))
    model = load_model(zoo["llama"], torch.float32, torch.device("cpu"))
    family = family_for_model_type(model.config.model_type)
    keep = _keep(layer_shapes(model, family))
    fits = []  # (the parent's weight, the kept columns, the update) per projection, before the check
    plain = reconstruction.fit_projection

    def recorded(weight, moments, kept, damping, fit):
        original = weight.double().clone()
        new, shift, used = plain(weight, moments, kept, damping, fit)
        fits.append((original, kept, new))
        return new, shift, used

    monkeypatch.setattr(reconstruction, "fit_projection", recorded)
    windows, check = ids_for(model, rows=24, length=16), 4
    _, outcomes = repair(model, family, windows, check, keep, DAMPING, 4, aim="stream")
    assert [(o.layer, o.projection) for o in outcomes] == [(0, "attention_out"), (0, "mlp_out"), (1, "mlp_out")]

    fitted = windows[:-check]
    pruned, reference = _read(model, fitted), _read(parent, fitted)
    # the stream aim fits on a copy sliced to the kept units: its weight and inputs are the kept columns'
    weight, kept, new = fits[-1]
    columns = torch.tensor(keep[(1, CHANNEL)])
    assert torch.equal(kept, torch.arange(len(columns)))
    x = pruned["x"][:, columns]
    target = reference["out"] + reference["stream"] - pruned["stream"]  # W x_ref + h_ref - h
    gram = x.T @ x
    lam = DAMPING * gram.diagonal().mean()
    expected = torch.linalg.solve(gram + lam * torch.eye(len(kept), dtype=gram.dtype), x.T @ target + lam * weight.T).T
    assert torch.allclose(new, expected, rtol=1e-3, atol=1e-5)
    # layer 0's heads see the parent's own inputs: aimed or not, their fit is the plain one
    aimed_heads = fits[0][2]
    repair(load_model(zoo["llama"], torch.float32, torch.device("cpu")), family, windows, check, keep, DAMPING, 4)
    assert torch.allclose(aimed_heads, fits[3][2], rtol=1e-3, atol=1e-5)


def test_an_aim_needs_sums_into_the_stream(zoo):
    model = load_model(zoo["llama"], torch.float32, torch.device("cpu"))
    family = family_for_model_type(model.config.model_type)
    keep = _keep(layer_shapes(model, family))
    with pytest.raises(ValueError, match="aim 'stream' needs"):
        repair(model, family, ids_for(model, rows=8, length=16), 2, keep, DAMPING, 4, aim="stream", fit="weights+bias")
