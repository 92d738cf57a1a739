"""For every supported family: virtual masks equal physical slicing, the export reloads with
stock transformers alone (no bonsai importable) and gives the masked parent's logits, and
layers pruned to zero heads or zero channels still run, in forward and in generate()."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bonsai.stages.core.families import FAMILIES, family_for_model_type, supported_model_types
from bonsai.stages.core.model_io import load_model
from bonsai.stages.core.slicing import slice_model
from bonsai.stages.core.units import KeepState, layer_shapes

import tiny
from tiny import awkward_state, export_state, ids_for, masked_logits, reload_elsewhere

SPECS = list(tiny.SPECS)


@pytest.mark.parametrize("spec", SPECS)
def test_masked_parent_equals_sliced_model(zoo, spec):
    model = load_model(zoo[spec], torch.float32, torch.device("cpu"))
    family = family_for_model_type(model.config.model_type)
    state = awkward_state(layer_shapes(model, family))
    ids = ids_for(model)
    expected = masked_logits(model, family, state, ids)
    slice_model(model, family, state)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert (got - expected).abs().max().item() < family.tolerance
    shapes = layer_shapes(model, family)
    assert shapes[0].groups == 0 and shapes[1].channels == 0
    assert [s.groups for s in shapes[2:]] == [len(g) for g in state.groups[2:]]


def test_slicing_in_steps_equals_slicing_once(zoo):
    """Resumed runs re-slice the parent straight to a later state: the bytes must agree."""
    once = load_model(zoo["llama-gqa"], torch.float32, torch.device("cpu"))
    steps = load_model(zoo["llama-gqa"], torch.float32, torch.device("cpu"))
    family = FAMILIES["llama"]
    full = KeepState.full(layer_shapes(once, family))
    middle = KeepState(full.groups, tuple(c[: len(c) - 10] for c in full.channels))
    final = KeepState(tuple(g[1:] for g in full.groups), tuple(c[5 : len(c) - 10] for c in full.channels))
    slice_model(once, family, final.positions(full))
    slice_model(steps, family, middle.positions(full))
    slice_model(steps, family, final.positions(middle))
    for (name, a), (_, b) in zip(once.state_dict().items(), steps.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.fixture(scope="module")
def exports(zoo, tmp_path_factory):
    """Every family pruned awkwardly, exported, and reloaded in a clean interpreter."""
    root = tmp_path_factory.mktemp("exports")
    cases, jobs = {}, []
    for spec in SPECS:
        model = load_model(zoo[spec], torch.float32, torch.device("cpu"))
        family = family_for_model_type(model.config.model_type)
        state = awkward_state(layer_shapes(model, family))
        ids = ids_for(model)
        directory = export_state(root / spec, zoo[spec], state, family, model)
        torch.save(ids, root / f"{spec}-ids.pt")
        jobs.append((directory, root / f"{spec}-ids.pt", root / f"{spec}-out.pt"))
        slice_model(model, family, state)  # the in-process sliced model, for the parameter count
        cases[spec] = {
            "expected": masked_logits(load_model(zoo[spec], torch.float32, torch.device("cpu")), family, state, ids),
            "directory": directory,
            "family": family,
            "out": root / f"{spec}-out.pt",
            "params": sum(p.numel() for p in model.parameters()),
            "model_type": model.config.model_type,
        }
    reload_elsewhere(root, jobs)
    return cases


@pytest.mark.parametrize("spec", SPECS)
def test_export_reloads_without_bonsai_and_matches_masked_parent(exports, spec):
    case = exports[spec]
    config = json.loads((case["directory"] / "config.json").read_text())
    assert config["model_type"] == f"bonsai_{case['model_type']}"
    assert config["layer_num_key_value_heads"][0] == 0 and config["layer_intermediate_sizes"][1] == 0
    out = torch.load(case["out"])
    assert out["class"] == "BonsaiForCausalLM"
    assert (out["logits"] - case["expected"]).abs().max().item() < 1e-4
    assert out["generated"].shape == (1, 10)
    assert out["params"] == case["params"]


def test_unsupported_model_type_names_supported_ones(tmp_path):
    from bonsai.stages.core.errors import UserError
    from bonsai.stages.core.model_dirs import inspect_model_dir

    directory = tmp_path / "gpt2"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (directory / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError) as err:
        inspect_model_dir(directory)
    message = str(err.value)
    assert "'gpt2' is not supported" in message and "stages/core/families/" in message
    for name in supported_model_types():
        assert name in message


def test_families_command_lists_every_family_with_its_tolerance():

    out = subprocess.run(
        [sys.executable, "-m", "bonsai.flows.cli", "families"], capture_output=True, text=True, check=True
    ).stdout
    for family in FAMILIES.values():
        line = next(r for r in out.splitlines() if r.strip().startswith(family.name + " "))
        assert f"{family.tolerance:g}" in line and family.attention_out in line and family.mlp_out in line


def test_every_registered_family_and_model_type_has_a_tiny_spec():
    import transformers

    covered = {getattr(transformers, config_class)().model_type for config_class, _ in tiny.SPECS.values()}
    assert covered == set(supported_model_types())
    assert {family_for_model_type(t).name for t in covered} == set(FAMILIES)
