"""Before any work: check the inputs, fingerprint them, and claim the run directory.

Only light modules are imported here, so that a wrong path or option is reported at once,
before torch, transformers and Prefect are loaded.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bonsai.artifacts import ArtifactRef, RunDir, RunLocked, RunMismatch, external_ref
from bonsai.stages.core.data import check_data, describe, source_digest
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.model_dirs import inspect_model_dir, model_digest
from bonsai.stages.core.model_source import ModelSource
from bonsai.stages.core.model_source import check as check_model
from bonsai.stages.core.model_source import resolve as resolve_model
from bonsai.stages.core.options import PruneOptions
from bonsai.stages.core.run_identity import RUN_FORMAT, recorded_identity


@dataclass(frozen=True)
class Prepared:
    run: RunDir
    parent: ArtifactRef  # the local model directory (a GGUF file's conversion, a hub snapshot)
    source: ModelSource  # what --model named
    data: ArtifactRef
    config: PruneOptions  # resolved for the device: dtype "auto" and the budget left out (options.BUDGETS)
    model_dtype: str  # what every other stage works in (devices.model_dtype), and a GGUF file's conversion

    def as_params(self) -> dict:
        """Plain values, for a flow parameter: the CLI prepares before Prefect starts and hands
        the flow this, so nothing is checked, resolved or hashed twice."""
        return {
            "out": str(self.run.path),
            "parent": asdict(self.parent),
            "source": asdict(self.source),
            "data": asdict(self.data),
            "config": asdict(self.config),
            "model_dtype": self.model_dtype,
        }

    @classmethod
    def from_params(cls, params: dict) -> Prepared:
        """What ``as_params`` gave, as it was prepared (the options are the resolved ones)."""
        return cls(
            _run_dir(params["out"]),
            ArtifactRef(**params["parent"]),
            ModelSource(**params["source"]),
            ArtifactRef(**params["data"]),
            PruneOptions(**params["config"]),
            params["model_dtype"],
        )


def check_inputs(model: str, data: str) -> None:
    """The refusals that cost nothing (a path that is not there, a GGUF file of an architecture
    not pruned here): made before a Prefect server starts or any file is hashed."""
    check_data(data)
    check_model(model)


def prepare(model: str, data: str, out: str, config: PruneOptions) -> Prepared:
    """Check every input before any work starts; each problem is one UserError line.  A GGUF
    file is converted here (once; the conversion is cached), in the pruning dtype."""
    check_data(data)  # a missing or unreadable --data is refused before a GGUF file is converted
    config, working = _resolved(config)
    source = resolve_model(model, dtype=lambda: working)
    data_ref = ArtifactRef("data", key="text", path=describe(data), digest=source_digest(data))
    info = inspect_model_dir(source.path)
    raw = json.loads((Path(info.path) / "config.json").read_text())
    limit = raw.get("max_position_embeddings")
    if limit and config.seq_len > limit:
        raise UserError(f"--seq-len {config.seq_len} exceeds the model's context ({limit} tokens)")
    parent = external_ref("parent", info.path, model_digest(info.path))
    return Prepared(_run_dir(out), parent, source, data_ref, config, working)


def _run_dir(out: str) -> RunDir:
    return RunDir(out, format=RUN_FORMAT, upgrade=recorded_identity)


def _resolved(config: PruneOptions) -> tuple[PruneOptions, str]:
    """(the options with ``dtype`` and the budget left out resolved for the device, the dtype of
    the model every stage but the evaluation works in) (imports torch)."""
    from bonsai.stages.core.devices import dtype_name, model_dtype, pruning_dtype, resolve_device

    device = resolve_device(config.device)
    evaluation = pruning_dtype(config.dtype, device)
    config = replace(config.for_device(device.type), dtype=dtype_name(evaluation))
    return config, dtype_name(model_dtype(evaluation, device))


def identity(p: Prepared) -> dict:
    return {"model": p.parent.digest, "data": p.data.digest, "config": p.config.identity()}


def open_run(p: Prepared, probe: bool = False) -> bool:
    """Lock the run directory and check it holds this run; True when resuming.  With
    ``probe``, only check (nothing is written and the lock is not kept)."""
    described = {**p.source.described(), "data": p.data.path, "model_dtype": p.model_dtype}
    try:
        return p.run.probe(identity(p)) if probe else p.run.open(identity(p), described)
    except RunLocked as exc:
        raise UserError(
            f"--out {p.run.path} is in use by another bonsai process (pid {exc.pid}); wait for it to finish or stop it"
        ) from None
    except RunMismatch as exc:
        what = "; ".join(_readable(d) for d in exc.differences)
        raise UserError(
            f"--out {p.run.path} holds a different run ({what}); continue it with the same "
            f"options, or pass a new --out to start a new run"
        ) from None


@contextlib.contextmanager
def holding(run: RunDir, run_dir: str):
    """The run's lock for the duration (commands that add to a finished run: adapt, export);
    another process holding it is one line."""
    try:
        run.lock.acquire()
    except RunLocked as exc:
        raise UserError(f"{run_dir} is in use by another bonsai process (pid {exc.pid})") from None
    try:
        yield run
    finally:
        run.lock.release()


def _readable(difference: str) -> str:
    key = difference.split(":", 1)[0]
    if key == "model":
        return "a different --model"
    if key == "data":
        return "different --data"
    if key.startswith("config."):
        return f"--{key[len('config.') :].replace('_', '-')}{difference[len(key) :]}"
    return difference


def run_parent(recorded: dict, flag: str = "the run's parent model") -> ModelSource:
    """The parent a run was pruned from, as run.json names it (a directory, a GGUF file, a hub
    id), resolved again; a GGUF file is converted in the run's dtype, so it is the same model."""
    spec = recorded.get("described", {}).get("model")
    if not spec:
        raise UserError(f"{flag}: run.json does not name it")
    dtype = recorded.get("described", {}).get("model_dtype")  # runs before it: the pruning dtype
    dtype = dtype or recorded.get("identity", {}).get("config", {}).get("dtype", "float32")
    return resolve_model(spec, dtype=lambda: dtype, flag=flag)
