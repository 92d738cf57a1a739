"""Loading the models a run works on, and the one model a process keeps sliced in memory."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from bonsai.artifacts import ArtifactRef, kill_point
from bonsai.stages.core.devices import dtype_name, resolve_device, resolve_dtype
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.model_dirs import inspect_model_dir, needs_remote_code
from bonsai.stages.core.slicing import slice_model
from bonsai.stages.core.units import KeepState, layer_shapes, read_keep_state

log = logging.getLogger("bonsai.model")


def load_model(path: str | os.PathLike, dtype: torch.dtype, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    info = inspect_model_dir(path)
    kwargs = {"device_map": {"": str(device)}} if device.type == "cuda" else {}
    model = AutoModelForCausalLM.from_pretrained(info.path, dtype=dtype, trust_remote_code=info.remote_code, **kwargs)
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
    """Keeps the one model a process works on, sliced to the state last asked for.

    Consecutive stages of an iteration ask for the same state, and the next iteration for
    a subset of it, so the parent is loaded once per process and only ever sliced further.
    Asking for a state that is not a subset of the cached one reloads the parent.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._model: nn.Module | None = None
        self._state: KeepState | None = None
        self._full: KeepState | None = None

    def get(self, parent: ArtifactRef, state: KeepState | None, dtype: torch.dtype, device: torch.device):
        info = inspect_model_dir(parent.path)
        key = (parent.digest, dtype, str(device))
        wanted = state
        if (
            self._key != key
            or (wanted is not None and not self._state.contains(wanted))
            or (wanted is None and self._state != self._full)
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
        return self._model, info.family

    def clear(self) -> None:
        self._key = self._model = self._state = self._full = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def current_model(parent: ArtifactRef, previous: ArtifactRef | None, dtype: str, device: str):
    """(model, family, device) of an iteration: the parent sliced to the keep-state that the
    previous iteration's select stage wrote (the parent itself when there is none)."""
    dev = resolve_device(device)
    state = read_keep_state(previous) if previous is not None else None
    model, family = shared_models().get(parent, state, resolve_dtype(dtype, dev), dev)
    return model, family, dev


_shared: ModelCache | None = None


def shared_models() -> ModelCache:
    """The process's model cache (created on first use, never at import)."""
    global _shared
    if _shared is None:
        _shared = ModelCache()
    return _shared
