"""`bonsai adapt`: post-pruning adaptation of a run's pruned model.

windows(adaptation data)  ->  logits(shard 0..k)   the parent, once, then released
                          ->  adapt                the student alone, checkpointed
                          ->  publish RUN/adapted (merged) and RUN/adapter (LoRA)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from bonsai.artifacts import ArtifactRef, RunDir, external_ref
from bonsai.flows.executors import Executor, Inline
from bonsai.flows.preflight import holding, run_parent
from bonsai.stages.core.data import describe, source_digest
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.model_dirs import inspect_model_dir, model_digest
from bonsai.stages.core.options import AdaptOptions

log = logging.getLogger("bonsai.adapt")


@dataclass(frozen=True)
class AdaptPlan:
    run: RunDir
    parent: ArtifactRef
    student: ArtifactRef
    data: ArtifactRef
    seq_len: int
    dtype: str


def plan(run_dir: str, options: AdaptOptions) -> AdaptPlan:
    """Check the run and the options before any work; every problem is one UserError."""
    run = RunDir(run_dir)
    recorded = run.recorded()
    if recorded is None:
        raise UserError(f"{run_dir}: not a bonsai run directory (no run.json)")
    if not (run.path / "model" / "config.json").is_file():
        raise UserError(f"{run_dir}: the run has no pruned model yet; finish `bonsai prune` first")
    described, identity = recorded.get("described", {}), recorded.get("identity", {})
    parent_dir = run_parent(recorded).path
    inspect_model_dir(parent_dir, flag="the run's parent model")
    parent_digest = model_digest(parent_dir)
    if parent_digest != identity.get("model"):
        raise UserError(
            f"the parent model at {parent_dir} changed since {run_dir} was pruned; the teacher must "
            f"be the model that was pruned"
        )
    student_dir = run.path / "model"
    config = json.loads((student_dir / "config.json").read_text())
    if options.top_k > config["vocab_size"]:
        raise UserError(f"--top-k {options.top_k} exceeds the vocabulary ({config['vocab_size']} tokens)")
    seq_len = options.seq_len or int(identity.get("config", {}).get("seq_len", 512))
    if seq_len > config.get("max_position_embeddings", seq_len):
        raise UserError(f"--seq-len {seq_len} exceeds the model's context ({config['max_position_embeddings']} tokens)")
    source = options.data or described.get("data")
    data = ArtifactRef("data", key="text", path=describe(source), digest=source_digest(source))
    from bonsai.stages.core.devices import dtype_name, resolve_device, resolve_dtype  # imports torch

    dtype = dtype_name(resolve_dtype(options.dtype, resolve_device(options.device)))
    return AdaptPlan(
        run,
        external_ref("parent", parent_dir, parent_digest),
        external_ref("student", student_dir, model_digest(student_dir)),
        data,
        seq_len,
        dtype,
    )


def adapt_stages(p: AdaptPlan, options: AdaptOptions, execute: Executor = Inline()) -> dict:
    # imported here, not at the top: `plan` must answer bad input before torch is loaded
    from bonsai.stages import adapt, calibration, export, logits

    store, device = p.run.store, options.device
    windows = execute(
        "adapt-windows",
        calibration.run,
        p.parent,
        p.data,
        calibration.CalibrationConfig(
            seq_len=p.seq_len, calib_pool=options.sequences, calib_samples=options.batch_size
        ),
        store,
    )
    teacher: list[ArtifactRef] = []
    if options.distill_weight > 0:
        shards = logits.shard_count(int(windows.info()["windows"]), options.logits_shard_size)
        teacher = execute.map(
            "logits",
            logits.run,
            [
                (
                    p.parent,
                    windows,
                    logits.LogitsConfig(
                        shard=i,
                        shard_size=options.logits_shard_size,
                        top_k=options.top_k,
                        batch_size=options.batch_size,
                        dtype=p.dtype,
                    ),
                    store,
                    device,
                )
                for i in range(shards)
            ],
        )
    cfg = adapt.AdaptConfig(
        steps=options.steps,
        batch_size=options.batch_size,
        lr=options.lr,
        lora_rank=options.lora_rank,
        lora_alpha=options.lora_alpha,
        distill_weight=options.distill_weight,
        top_k=options.top_k,
        full_finetune=options.full_finetune,
        seed=options.seed,
        checkpoint_every=options.checkpoint_every,
        warmup_steps=max(1, options.steps // 20),
        precision="float32" if p.dtype == "float32" else p.dtype,
    )
    adapted = execute("adapt", adapt.run, p.student, windows, teacher, cfg, store, device)
    merged = execute("publish-adapted", export.publish, adapted, p.run.path / "adapted", adapt.MODEL)
    adapter = None
    if not options.full_finetune:
        adapter = execute("publish-adapter", export.publish, adapted, p.run.path / "adapter", adapt.ADAPTER)
    else:
        export.unpublish(p.run.path / "adapter")  # a LoRA adapter from an earlier adaptation no longer applies
    cache_bytes = sum(int(t.info()["bytes"]) for t in teacher)
    cached = sum(int(t.info()["windows"]) for t in teacher)
    summary = {
        "adapted": merged,
        "adapter": adapter,
        **adapted.info(),
        "teacher_cache_bytes": cache_bytes,
        "teacher_cache_bytes_per_1000_sequences": 1000 * cache_bytes / cached if cached else None,
    }
    log.info("adapted model: %s (final loss %.4f)", merged, summary["final_loss"])
    return summary


def run_adapt(run_dir: str, options: AdaptOptions, execute: Executor = Inline()) -> dict:
    p = plan(run_dir, options)
    with holding(p.run, run_dir):
        return adapt_stages(p, options, execute)
