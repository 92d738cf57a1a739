"""`bonsai export RUN --gguf [--type T]`: the run's pruned model (and its adapted one, if any) as
GGUF files that stock llama.cpp runs, in RUN/gguf/<model>-<type>.gguf.

    plan (the run, its parent's tokenizer, the family)  ->  gguf(model)  [->  gguf(adapted)]  ->  publish

Each file is an artifact of the run's store under a key of its inputs, so exporting again is
free, and a kill leaves no half-written file where a user looks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from bonsai.artifacts import ArtifactRef, RunDir, external_ref
from bonsai.flows.executors import Executor, Inline
from bonsai.flows.preflight import holding, run_parent
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.families import FAMILIES
from bonsai.stages.core.model_dirs import inspect_model_dir, model_digest
from bonsai.stages.core.model_source import ModelSource
from bonsai.stages.core.options import ExportOptions

log = logging.getLogger("bonsai.export")

GGUF_DIR = "gguf"


def gguf_families() -> str:
    return ", ".join(f.name for f in FAMILIES.values() if f.gguf)


def check_family(model_dir: str) -> None:
    family = inspect_model_dir(model_dir, flag=model_dir).family
    if not family.gguf:
        raise UserError(
            f"GGUF export: the {family.name} family has layers llama.cpp's deci architecture cannot express; "
            f"the families that export are {gguf_families()}"
        )


def tokenizer_source(source: ModelSource) -> ArtifactRef:
    """Where a GGUF export's tokenizer keys come from: the GGUF file the model came from, else
    its Hugging Face directory."""
    if source.gguf_file:
        return external_ref("tokenizer", source.gguf_file, source.file_digest)
    return external_ref("tokenizer", source.path, model_digest(source.path))


@dataclass(frozen=True)
class ExportPlan:
    run: RunDir
    models: list[tuple[str, ArtifactRef]]  # (file stem, model directory)
    tokenizer: ArtifactRef  # the parent's GGUF file, or its Hugging Face directory


def plan(run_dir: str) -> ExportPlan:
    """Check the run before any work; every problem is one UserError line."""
    run = RunDir(run_dir)
    recorded = run.recorded()
    if recorded is None:
        raise UserError(f"{run_dir}: not a bonsai run directory (no run.json)")
    model_dir = run.path / "model"
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{run_dir}: the run has no pruned model yet; finish `bonsai prune` first")
    check_family(str(model_dir))
    tokenizer = tokenizer_source(run_parent(recorded))
    stem = Path(recorded.get("described", {}).get("model", "model")).name.removesuffix(".gguf") or "model"
    models = [(f"{stem}-pruned", external_ref("model", model_dir, model_digest(str(model_dir))))]
    adapted = run.path / "adapted"
    if (adapted / "config.json").is_file():
        models.append((f"{stem}-adapted", external_ref("adapted", adapted, model_digest(str(adapted)))))
    return ExportPlan(run, models, tokenizer)


def export_stages(p: ExportPlan, options: ExportOptions, execute: Executor = Inline()) -> dict:
    from bonsai.stages import gguf

    written = {}
    for stem, model in p.models:
        cfg = gguf.GgufConfig(type=options.type, name=stem)
        ref = execute(f"gguf-{model.stage}", gguf.run, model, p.tokenizer, cfg, p.run.store, gguf_families())
        target = p.run.path / GGUF_DIR / gguf.file_name(cfg)
        execute(f"publish-gguf-{model.stage}", publish_file, ref.file(gguf.file_name(cfg)), target)
        written[stem] = {"file": str(target), "bytes": ref.info()["bytes"], "type": options.type}
        log.info("wrote %s (%.1f MiB)", target, ref.info()["bytes"] / 2**20)
    return written


def publish_file(source: Path, target: Path) -> None:
    """``target`` becomes ``source`` (a hard link where the filesystem allows), atomically."""
    import shutil
    import uuid

    target.parent.mkdir(parents=True, exist_ok=True)
    fresh = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        os.link(source, fresh)
    except OSError:
        shutil.copy2(source, fresh)
    os.replace(fresh, target)


def run_export(run_dir: str, options: ExportOptions, execute: Executor = Inline()) -> dict:
    p = plan(run_dir)
    with holding(p.run, run_dir):
        return export_stages(p, options, execute)
