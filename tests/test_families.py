"""For every supported family: virtual masks equal physical slicing, the export reloads with
stock transformers alone (no bonsai importable) and gives the masked parent's logits, and
layers pruned to zero heads or zero channels still run, in forward and in generate()."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import polars as pl
import pytest
import torch

import tiny
from bonsai.artifacts import Store, external_ref
from bonsai.stages import export
from bonsai.stages.families import FAMILIES, family_for_model_type, supported_model_types
from bonsai.stages.masking import Taps
from bonsai.stages.model_io import load_model
from bonsai.stages.slicing import slice_model
from bonsai.stages.units import KEEP_FILE, KeepState, layer_shapes, units_table

SPECS = list(tiny.SPECS)


def awkward_state(shapes) -> KeepState:
    """Layer 0 loses every head, layer 1 every channel, the rest keep odd subsets."""
    groups, channels = [], []
    for index, shape in enumerate(shapes):
        groups.append(() if index == 0 else tuple(range(shape.groups))[1:] or (0,))
        channels.append(() if index == 1 else tuple(range(0, shape.channels, 3)))
    return KeepState(tuple(groups), tuple(channels))


def masked_logits(model, family, state: KeepState, ids: torch.Tensor) -> torch.Tensor:
    shapes = layer_shapes(model, family)
    heads = [torch.zeros(1, s.groups) for s in shapes]
    chans = [torch.zeros(1, s.channels) for s in shapes]
    for layer in range(len(shapes)):
        heads[layer][0, list(state.groups[layer])] = 1
        chans[layer][0, list(state.channels[layer])] = 1
    with Taps(model, family) as taps, torch.no_grad():
        taps.set_masks([h.expand(ids.shape[0], -1) for h in heads], [c.expand(ids.shape[0], -1) for c in chans])
        return model(input_ids=ids).logits


def ids_for(model, rows=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (rows, length), generator=g)


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
    final = KeepState(tuple(g[1:] for g in full.groups), tuple(c[5: len(c) - 10] for c in full.channels))
    slice_model(once, family, final.positions(full))
    slice_model(steps, family, middle.positions(full))
    slice_model(steps, family, final.positions(middle))
    for (name, a), (_, b) in zip(once.state_dict().items(), steps.state_dict().items()):
        assert torch.equal(a, b), name


_RELOAD = textwrap.dedent(
    """
    import sys, json, torch
    class NoBonsai:  # prove the export needs nothing from this project
        def find_spec(self, name, path=None, target=None):
            if name == "bonsai" or name.startswith("bonsai."):
                raise ImportError("bonsai is not installed here")
    sys.meta_path.insert(0, NoBonsai())
    from transformers import AutoModelForCausalLM
    for directory, ids_file, out_file in zip(*[iter(sys.argv[1:])] * 3):
        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()
        ids = torch.load(ids_file)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            generated = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
        torch.save({"logits": logits, "generated": generated, "class": type(model).__name__,
                    "params": sum(p.numel() for p in model.parameters())}, out_file)
    """
)


def reload_elsewhere(tmp_path, jobs: list[tuple]) -> None:
    """Load each (directory, ids file, output file) in one interpreter that has no bonsai."""
    script = tmp_path / "reload.py"
    script.write_text(_RELOAD)
    args = [str(x) for job in jobs for x in job]
    subprocess.run([sys.executable, "-I", str(script), *args], check=True, capture_output=True, timeout=600)


def export_state(tmp_path, model_dir, state: KeepState, family, model):
    """Run the export stage on a hand-made keep-state; returns the exported directory."""
    store = Store(tmp_path / "run")
    parent = external_ref("parent", model_dir, "0" * 64)
    table = units_table(layer_shapes(model, family), KeepState.full(layer_shapes(model, family)))
    kept = [
        unit in state.units(kind)[layer] for layer, kind, unit in table.select("layer", "kind", "unit").iter_rows()
    ]
    table = table.with_columns(pl.Series("kept", kept), pl.lit(None, pl.Int32).alias("removed_iteration"))
    select = store.produce("select", "test", {}, [parent], lambda out: table.write_parquet(out / KEEP_FILE))
    ref = export.run(parent, select, export.ExportConfig(), store)
    return ref.file(export.MODEL)


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
        cases[spec] = {"expected": masked_logits(load_model(zoo[spec], torch.float32, torch.device("cpu")),
                                                 family, state, ids),
                       "directory": directory, "family": family, "out": root / f"{spec}-out.pt",
                       "params": sum(p.numel() for p in model.parameters()), "model_type": model.config.model_type}
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
    from bonsai.stages.errors import UserError
    from bonsai.stages.checkpoints import inspect_model_dir

    directory = tmp_path / "gpt2"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (directory / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError) as err:
        inspect_model_dir(directory)
    message = str(err.value)
    assert "'gpt2' is not supported" in message and "stages/families/" in message
    for name in supported_model_types():
        assert name in message


def test_families_command_lists_every_family_with_its_tolerance():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "bonsai.flows.cli", "families"], capture_output=True, text=True,
                         check=True).stdout
    for family in FAMILIES.values():
        line = next(l for l in out.splitlines() if l.strip().startswith(family.name + " "))
        assert f"{family.tolerance:g}" in line and family.attention_out in line and family.mlp_out in line
