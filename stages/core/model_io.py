"""Loading the models a run works on, and the one model a process keeps sliced in memory."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bonsai.artifacts import ArtifactRef, kill_point
from bonsai.stages.core.devices import dtype_name, resolve_device, resolve_dtype
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.families.remote_code import get_module
from bonsai.stages.core.model_dirs import inspect_model_dir, needs_remote_code
from bonsai.stages.core.slicing import slice_model
from bonsai.stages.core.units import HEAD, KeepState, layer_shapes, output_projection, read_keep_state

log = logging.getLogger("bonsai.model")


@contextlib.contextmanager
def no_progress_bars():
    """transformers draws a bar for every local load and save (a second or two each); in the log
    files of nightly runs it is a line of carriage returns per stage.  Restored afterwards."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_model(path: str | os.PathLike, dtype: torch.dtype, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    info = inspect_model_dir(path)
    kwargs = {"device_map": {"": str(device)}} if device.type == "cuda" else {}
    with no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(
            info.path, dtype=dtype, trust_remote_code=info.remote_code, **kwargs
        )
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=needs_remote_code(path))
    except Exception as exc:  # the tokenizers library raises bare Exceptions for broken files
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise UserError(f"{path}: no usable tokenizer next to the model ({first})") from None


class ModelCache:
    """Keeps the one model a process works on, sliced and repaired to the state last asked for.

    Consecutive stages of an iteration ask for the same state, and the next iteration for a
    subset of it, so between repairs the parent is loaded once and only ever sliced further.  A
    repair writes into the model and invalidates it; the next stage reloads the parent, slices
    it and applies every repair in order (a fraction of a second for SmolLM2).  Anything else
    reloads it too.
    A narrower dtype asked of a float32 model is a cast copy of it, kept beside it until the
    model changes: the evaluation's bfloat16 model on a CPU (devices.model_dtype).
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._model: nn.Module | None = None
        self._state: KeepState | None = None
        self._full: KeepState | None = None
        self._repairs: tuple[str, ...] = ()
        self._copy: tuple[tuple, nn.Module] | None = None  # (what it is a copy of, the cast copy)

    def get(
        self,
        parent: ArtifactRef,
        state: KeepState | None,
        dtype: torch.dtype,
        device: torch.device,
        repairs: Sequence[ArtifactRef] = (),
    ):
        info = inspect_model_dir(parent.path)
        key = (parent.digest, dtype, str(device))
        if self._key is not None and self._key[1] == torch.float32 and dtype != torch.float32:
            if self._key[::2] == key[::2]:  # the float32 model of this parent is here: cast a copy
                return self._cast(parent, state, dtype, device, repairs), info.family
        wanted = state
        digests = tuple(r.digest for r in repairs)
        if (
            self._key != key
            or (wanted is not None and not self._state.contains(wanted))
            or (wanted is None and self._state != self._full)
            or digests[: len(self._repairs)] != self._repairs
        ):
            self.clear()
            log.info("loading %s (%s, %s)", parent.path, dtype_name(dtype), device)
            self._model = load_model(parent.path, dtype, device)
            self._full = self._state = KeepState.full(layer_shapes(self._model, info.family))
            self._key = key
        if wanted is not None and wanted != self._state:
            slice_model(self._model, info.family, wanted.positions(self._state))
            self._state = wanted
            kill_point("slice")
        for repair in repairs[len(self._repairs) :]:
            apply_repair(self._model, info.family, self._state, repair)
        self._repairs = digests
        return self._model, info.family

    def _cast(self, parent, state, dtype, device, repairs) -> nn.Module:
        model, _ = self.get(parent, state, torch.float32, device, repairs)
        made_of = (self._state, self._repairs, dtype)
        if self._copy is None or self._copy[0] != made_of:
            self._copy = None  # the old copy's memory first
            self._copy = (made_of, copy.deepcopy(model).to(dtype))
        return self._copy[1]

    def invalidate(self) -> None:
        """The model is about to change in place (the repair writes into it): the next ``get`` reloads."""
        self._key = None

    def clear(self) -> None:
        self._key = self._model = self._state = self._full = self._copy = None
        self._repairs = ()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


REPAIRS_FILE = "weights.safetensors"


def repair_tensors(updated: dict, state: KeepState) -> dict[str, torch.Tensor]:
    """The tensors a repair artifact holds: per repaired projection (``updated``: {(layer, kind):
    reconstruction.Repaired}), its kept columns' weights, the parent indices of the units those
    columns belong to, and its whole new bias when the repair fitted one."""
    out = {}
    for (layer, kind), repaired in sorted(updated.items()):
        out[f"layers.{layer}.{kind}.weight"] = repaired.weight.contiguous().cpu()
        out[f"layers.{layer}.{kind}.units"] = torch.tensor(state.units(kind)[layer], dtype=torch.long)
        if repaired.bias is not None:
            out[f"layers.{layer}.{kind}.bias"] = repaired.bias.contiguous().cpu()
    return out


@torch.no_grad()
def apply_repair(model: nn.Module, family, state: KeepState, repair: ArtifactRef) -> None:
    """Write a repair artifact's weights into a model sliced to ``state`` (a subset of the
    state the repair was made at: only the columns of the units still present are taken)."""
    from safetensors.torch import load_file

    tensors = load_file(str(repair.file(REPAIRS_FILE)))
    layers = get_module(model, family.layers)
    shapes = layer_shapes(model, family)
    for name in sorted(n for n in tensors if n.endswith(".weight")):
        _, layer, kind, _ = name.split(".")
        layer = int(layer)
        stored = tensors[name.replace(".weight", ".units")].tolist()
        where = {u: i for i, u in enumerate(stored)}
        positions = [where[u] for u in state.units(kind)[layer]]
        shape = shapes[layer]
        width = shape.per_group * shape.head_dim if kind == HEAD else 1
        columns = (torch.tensor(positions, dtype=torch.long).unsqueeze(1) * width + torch.arange(width)).reshape(-1)
        target = output_projection(layers[layer], family, kind)
        target.weight.copy_(tensors[name].index_select(1, columns).to(target.weight.dtype))
        bias = tensors.get(name.replace(".weight", ".bias"))
        if bias is not None:
            if target.bias is None:
                zeros = torch.zeros(bias.shape, dtype=target.weight.dtype, device=target.weight.device)
                target.bias = nn.Parameter(zeros, requires_grad=False)
            target.bias.data.copy_(bias.to(device=target.bias.device, dtype=target.bias.dtype))


@dataclass(frozen=True)
class PrunedModel:
    """The model a stage works on, as a value: the parent, the selection so far (the last select
    artifact; None: the whole parent) and the repairs made since, applied in order.  Stages list
    them among their inputs, so an artifact's key names the model it was computed on."""

    parent: ArtifactRef
    selection: ArtifactRef | None = None
    repairs: tuple[ArtifactRef, ...] = ()

    @property
    def changes(self) -> list[ArtifactRef]:
        """What makes it differ from the parent: the selection (when there is one), then the repairs."""
        return ([self.selection] if self.selection is not None else []) + list(self.repairs)

    def then(self, selection: ArtifactRef, repair: ArtifactRef | None = None) -> PrunedModel:
        """This model after a select stage, and the repair that followed it if one did."""
        return PrunedModel(self.parent, selection, self.repairs + ((repair,) if repair is not None else ()))

    def load(self, dtype: str, device: str):
        """(model, family, device): the parent sliced to the selection's keep-state, the repairs
        written in order.  The process's ModelCache serves it when the stage before worked on
        the same model or a larger one (the next iteration only slices further)."""
        dev = resolve_device(device)
        state = read_keep_state(self.selection) if self.selection is not None else None
        model, family = shared_models().get(self.parent, state, resolve_dtype(dtype, dev), dev, self.repairs)
        return model, family, dev


_shared: ModelCache | None = None


def shared_models() -> ModelCache:
    """The process's model cache (created on first use, never at import)."""
    global _shared
    if _shared is None:
        _shared = ModelCache()
    return _shared
