"""Export stage: the physically sliced model as a directory stock tools load.

The parent is reloaded in the dtype it was saved in (slicing copies values exactly, so the
export loses no precision to the pruning dtype), sliced to the final keep-state, and saved
with ``save_pretrained`` (safetensors, sharded like any checkpoint), its tokenizer, a config
carrying the per-layer sizes, and ``modeling_bonsai.py`` (see families/remote_code.py).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bonsai.artifacts import ArtifactRef, Store, kill_point
from bonsai.stages.core.devices import dtype_name, stored_dtype
from bonsai.stages.core.families import EXPORT_PREFIX, Family
from bonsai.stages.core.families.remote_code import get_module
from bonsai.stages.core.model_dirs import inspect_model_dir
from bonsai.stages.core.model_io import (
    PrunedModel,
    apply_repair,
    load_model,
    load_tokenizer,
    no_progress_bars,
    shared_models,
)
from bonsai.stages.core.reconstruction import add_bias
from bonsai.stages.core.slicing import slice_model
from bonsai.stages.core.units import HEAD, KINDS, KeepState, layer_shapes, output_projection, read_keep_state

VERSION = "1"
MODEL = "model"
CODE_FILE = "modeling_bonsai.py"
_TEMPLATE = Path(__file__).parent / "core" / "families" / "remote_code.py"
_BASE_LINE = 'BASE_MODEL_TYPE = "llama"'


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    max_shard_size: str = "5GB"


def run(pruned: PrunedModel, cfg: ExportConfig, store: Store) -> ArtifactRef:
    """``pruned`` as a model directory: the parent sliced to its selection's keep-state, its
    repairs written into the kept columns, in the parent's own dtype."""
    parent = pruned.parent

    def build(out: Path) -> dict:
        shared_models().clear()  # the pruning model is no longer needed; free its memory first
        info = inspect_model_dir(parent.path)
        dtype = stored_dtype(parent.path)
        model = load_model(parent.path, dtype, torch.device("cpu"))
        keep = read_keep_state(pruned.selection)
        slice_model(model, info.family, keep.positions(KeepState.full(layer_shapes(model, info.family))))
        before = output_biases(model, info.family)
        for repair in pruned.repairs:
            apply_repair(model, info.family, keep, repair)
        biased = uniform_output_biases(model, info.family, before)
        target = out / MODEL
        with no_progress_bars():
            model.save_pretrained(target, max_shard_size=cfg.max_shard_size)
        kill_point("export")
        base = info.model_type.removeprefix(EXPORT_PREFIX)
        config = pruned_config(model.config.to_dict(), base, info.family, keep, dtype, biased)
        (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (target / CODE_FILE).write_text(remote_code(base))
        load_tokenizer(parent.path).save_pretrained(target)
        params = sum(p.numel() for p in model.parameters())
        provenance = {
            "parent": parent.path,
            "parent_digest": parent.digest,
            "parameters": params,
            "layer_num_key_value_heads": config["layer_num_key_value_heads"],
            "layer_intermediate_sizes": config["layer_intermediate_sizes"],
        }
        (target / "bonsai.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        return {"parameters": params, "dtype": dtype_name(dtype)}

    return store.produce("export", VERSION, cfg, [parent, *pruned.changes], build)


def output_biases(model, family: Family) -> dict[str, bool]:
    """Whether any layer's attention_out / mlp_out projection has a bias, by kind."""
    layers = get_module(model, family.layers)
    return {kind: any(output_projection(layer, family, kind).bias is not None for layer in layers) for kind in KINDS}


def uniform_output_biases(model, family: Family, before: dict[str, bool]) -> list[str]:
    """The output projections to which a repair gave a bias the parent has not (``before``: by
    kind, whether it had one): every layer's gets one, zero where the repair made none, so that
    one config field lists them and the remote code builds them.  Returns their names."""
    names = []
    for kind, has in output_biases(model, family).items():
        if has and not before[kind]:
            for layer in get_module(model, family.layers):
                projection = output_projection(layer, family, kind)
                if projection.bias is None:
                    add_bias(projection, torch.zeros(projection.out_features))
            names.append(family.attention_out if kind == HEAD else family.mlp_out)
    return names


def pruned_config(
    parent: dict, base: str, family: Family, keep: KeepState, dtype: torch.dtype, output_biases: Sequence[str] = ()
) -> dict:
    config = {k: v for k, v in parent.items() if not k.startswith("_")}
    config.update(
        model_type=EXPORT_PREFIX + base,
        architectures=["BonsaiForCausalLM"],
        auto_map={
            "AutoConfig": "modeling_bonsai.BonsaiConfig",
            "AutoModelForCausalLM": "modeling_bonsai.BonsaiForCausalLM",
        },
        layer_num_key_value_heads=[len(g) for g in keep.groups],
        layer_intermediate_sizes=[len(c) for c in keep.channels],
        bonsai_layout=family.layout(),
        dtype=dtype_name(dtype),
    )
    if output_biases:
        config["bonsai_output_biases"] = list(output_biases)
    config.pop("torch_dtype", None)
    return config


def remote_code(base_model_type: str) -> str:
    source = _TEMPLATE.read_text()
    if source.count(_BASE_LINE) != 1:
        raise RuntimeError(f"{_TEMPLATE} must contain the line {_BASE_LINE!r} exactly once")
    return source.replace(_BASE_LINE, f'BASE_MODEL_TYPE = "{base_model_type}"')


def publish(exported: ArtifactRef, destination: str | os.PathLike, subdir: str = MODEL) -> str:
    """Make ``destination`` (RUN/model) a copy of the artifact's ``subdir``, replaced atomically.

    Files are hard-linked where the filesystem allows (a 13 GB model is not copied); an
    edit to RUN/model then shows up as a corrupted artifact and is recomputed on the next run.
    """
    destination = Path(destination)
    scratch = destination.parent / ".tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    fresh = scratch / f"publish-{uuid.uuid4().hex[:8]}"
    shutil.copytree(exported.file(subdir), fresh, copy_function=_link_or_copy)
    if destination.exists():
        old = scratch / f"replaced-{uuid.uuid4().hex[:8]}"
        os.replace(destination, old)
        os.replace(fresh, destination)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(fresh, destination)
    return str(destination)


def unpublish(destination: str | os.PathLike) -> None:
    """Remove a published directory atomically (renamed out of the way first), if present."""
    destination = Path(destination)
    if destination.exists():
        scratch = destination.parent / ".tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        old = scratch / f"removed-{uuid.uuid4().hex[:8]}"
        os.replace(destination, old)
        shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
