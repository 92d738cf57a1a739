"""Before any work: check the inputs, fingerprint them, and claim the run directory.

Only light modules are imported here, so that a wrong path or option is reported at once,
before torch, transformers and Prefect are loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from bonsai.artifacts import ArtifactRef, RunDir, RunLocked, RunMismatch, external_ref
from bonsai.stages.checkpoints import inspect_model_dir, model_digest
from bonsai.stages.config import PruneConfig
from bonsai.stages.data import describe, source_digest
from bonsai.stages.errors import UserError


@dataclass(frozen=True)
class Prepared:
    run: RunDir
    parent: ArtifactRef
    data: ArtifactRef
    config: PruneConfig  # dtype resolved: "auto" becomes what this device uses


def prepare(model: str, data: str, out: str, config: PruneConfig) -> Prepared:
    """Check every input before any work starts; each problem is one UserError line."""
    info = inspect_model_dir(model)
    raw = json.loads((Path(info.path) / "config.json").read_text())
    limit = raw.get("max_position_embeddings")
    if limit and config.seq_len > limit:
        raise UserError(f"--seq-len {config.seq_len} exceeds the model's context ({limit} tokens)")
    from bonsai.stages.devices import dtype_name, resolve_device, resolve_dtype  # imports torch

    device = resolve_device(config.device)
    config = replace(config, dtype=dtype_name(resolve_dtype(config.dtype, device)))
    run = RunDir(out)
    parent = external_ref("parent", info.path, model_digest(info.path))
    data_ref = ArtifactRef("data", key="text", path=describe(data), digest=source_digest(data))
    return Prepared(run, parent, data_ref, config)


def identity(p: Prepared) -> dict:
    return {"model": p.parent.digest, "data": p.data.digest, "config": p.config.identity()}


def open_run(p: Prepared, probe: bool = False) -> bool:
    """Lock the run directory and check it holds this run; True when resuming.  With
    ``probe``, only check (nothing is written and the lock is not kept)."""
    described = {"model": p.parent.path, "data": p.data.path}
    try:
        return p.run.probe(identity(p)) if probe else p.run.open(identity(p), described)
    except RunLocked as exc:
        raise UserError(f"--out {p.run.path} is in use by another bonsai process (pid {exc.pid}); "
                        f"wait for it to finish or stop it") from None
    except RunMismatch as exc:
        what = "; ".join(_readable(d) for d in exc.differences)
        raise UserError(f"--out {p.run.path} holds a different run ({what}); continue it with the same "
                        f"options, or pass a new --out to start a new run") from None


def _readable(difference: str) -> str:
    key = difference.split(":", 1)[0]
    if key == "model":
        return "a different --model"
    if key == "data":
        return "different --data"
    if key.startswith("config."):
        return f"--{key[len('config.'):].replace('_', '-')}{difference[len(key):]}"
    return difference
