"""Adapt stage: LoRA (or full) fine-tuning of the pruned model, with cached-teacher distillation.

The student is the pruned export (its per-layer shapes, zero-width layers included, are
what peft wraps).  Batches follow a seeded order fixed in advance, so the data position is
just the step number.  Every ``checkpoint_every`` steps the trainable weights, optimizer,
scheduler, RNG states and loss history are written to the run's work area (a new
directory, renamed into place), so a killed run resumes at its last checkpoint and ends
with exactly the bytes an uninterrupted run writes.  A non-finite loss stops training; the
last good checkpoint stays where it is.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bonsai.artifacts import ArtifactRef, Store, kill_point
from bonsai.stages.calibration import load_windows
from bonsai.stages.core.devices import DTYPES, dtype_name, resolve_device, stored_dtype
from bonsai.stages.core.distill import distill_kl, task_loss
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.model_dirs import WEIGHT_SUFFIXES
from bonsai.stages.core.model_io import load_model, no_progress_bars, shared_models
from bonsai.stages.core.progress import Progress
from bonsai.stages.core.rng import derived_seed, generator
from bonsai.stages.logits import TeacherCache

VERSION = "1"
MODEL = "model"
ADAPTER = "adapter"
HISTORY = "training.parquet"


@dataclass(frozen=True, kw_only=True)
class AdaptConfig:
    steps: int
    batch_size: int
    lr: float
    lora_rank: int
    lora_alpha: int
    distill_weight: float
    top_k: int
    full_finetune: bool
    seed: int
    checkpoint_every: int
    warmup_steps: int
    precision: str = "float32"  # float32, or bfloat16/float16 autocast over float32 weights
    max_grad_norm: float = 1.0


def schedule(cfg: AdaptConfig):
    """Linear warm-up, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def batch_order(windows: int, cfg: AdaptConfig) -> list[list[int]]:
    """Window ids of every step's batch: seeded permutations, one per pass over the data."""
    order: list[int] = []
    epoch = 0
    while len(order) < cfg.steps * cfg.batch_size:
        order += torch.randperm(windows, generator=generator(cfg.seed, "adapt-order", epoch)).tolist()
        epoch += 1
    return [order[s * cfg.batch_size : (s + 1) * cfg.batch_size] for s in range(cfg.steps)]


def prepare_student(student: ArtifactRef, cfg: AdaptConfig, device: torch.device):
    model = load_model(student.path, torch.float32, device)
    model.train()
    if cfg.full_finetune:
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):  # peft draws LoRA's initial A from the global RNG
        torch.manual_seed(derived_seed(cfg.seed, "lora-init"))
        return get_peft_model(
            model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear")
        )


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(work: Path, step: int, model, optimizer, scheduler, history: list[dict]) -> None:
    fresh = work / f".checkpoint-{step}.partial"
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir()
    save_file(
        {n: p.detach().contiguous().cpu() for n, p in _trainable(model).items()}, str(fresh / "trainable.safetensors")
    )
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()},
        fresh / "state.pt",
    )
    (fresh / "progress.json").write_text(json.dumps({"step": step, "history": history}))
    os.replace(fresh, work / f"checkpoint-{step:08d}")
    for old in sorted(work.glob("checkpoint-*"))[:-1]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(work: Path, model, optimizer, scheduler) -> tuple[int, list[dict]]:
    found = sorted(work.glob("checkpoint-*"))
    if not found:
        return 0, []
    latest = found[-1]
    weights = load_file(str(latest / "trainable.safetensors"))
    with torch.no_grad():
        for name, param in _trainable(model).items():
            param.copy_(weights[name])
    state = torch.load(latest / "state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    progress = json.loads((latest / "progress.json").read_text())
    return progress["step"], progress["history"]


def train(
    model: nn.Module,
    data: torch.Tensor,
    cfg: AdaptConfig,
    device: torch.device,
    teacher: TeacherCache | None = None,
    checkpoints: Path | None = None,
) -> list[dict]:
    """Train ``model``'s trainable weights on ``data`` (windows x tokens) for ``cfg.steps``
    steps, in the fixed order of ``batch_order``; returns the loss history, one row per step.

    With ``checkpoints``, the loop starts from the latest checkpoint there and writes one every
    ``cfg.checkpoint_every`` steps, so a killed call resumes to the same bytes.  A non-finite
    loss stops training with a UserError and leaves the last good checkpoint in place.
    """
    if checkpoints is not None:
        checkpoints.mkdir(parents=True, exist_ok=True)
    params = list(_trainable(model).values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(cfg))
    step, history = load_checkpoint(checkpoints, model, optimizer, scheduler) if checkpoints else (0, [])
    order = batch_order(data.shape[0], cfg)
    autocast = torch.autocast(device.type, dtype=DTYPES[cfg.precision], enabled=cfg.precision != "float32")
    progress = Progress("adapt", cfg.steps, "steps", every_s=10.0)
    progress.advance(step)
    while step < cfg.steps:
        ids = data[order[step]].to(device)
        with autocast:
            logits = model(input_ids=ids, use_cache=False).logits
        ce = task_loss(logits, ids)
        kl = torch.zeros((), device=device)
        if teacher is not None:
            target = {k: v.to(device) for k, v in teacher.targets(order[step]).items()}
            kl = distill_kl(logits[:, :-1], target["logprobs"], target["indices"], target["tail"])
        loss = ce + cfg.distill_weight * kl
        if not torch.isfinite(loss):
            found = sorted(checkpoints.glob("checkpoint-*")) if checkpoints else []
            last = int(found[-1].name.split("-")[1]) if found else 0
            raise UserError(
                f"the training loss became {loss.item()} at step {step}; the last good checkpoint "
                f"(step {last}) is kept in {checkpoints}; try a lower --lr"
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        history.append(
            {
                "step": step,
                "loss": loss.item(),
                "task": ce.item(),
                "distill": kl.item(),
                "lr": scheduler.get_last_lr()[0],
            }
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        progress.advance()
        if checkpoints is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            save_checkpoint(checkpoints, step, model, optimizer, scheduler, history)
            kill_point("adapt-checkpoint")
    return history


def run(
    student: ArtifactRef,
    windows: ArtifactRef,
    teacher: list[ArtifactRef],
    cfg: AdaptConfig,
    store: Store,
    device: str = "auto",
) -> ArtifactRef:
    inputs = [student, windows, *teacher]
    work = store.workdir("adapt", store.key("adapt", VERSION, cfg, inputs))

    def build(out: Path) -> dict:
        shared_models().clear()  # the teacher (or pruning model) must not share memory with training
        dev = resolve_device(device)
        cache = TeacherCache(teacher) if cfg.distill_weight > 0 else None
        model = prepare_student(student, cfg, dev)
        if cache is not None and cache.vocab_size != model.config.vocab_size:
            raise UserError(
                f"the cached teacher has a vocabulary of {cache.vocab_size} tokens and the student "
                f"{model.config.vocab_size}; they must come from the same parent"
            )
        data = load_windows(windows, list(range(int(windows.info()["windows"]))))
        history = train(model, data, cfg, dev, teacher=cache, checkpoints=work)
        pl.DataFrame(history).write_parquet(out / HISTORY)
        export(model, student, cfg, out)
        return {"steps": cfg.steps, "final_loss": history[-1]["loss"], "final_task_loss": history[-1]["task"]}

    ref = store.produce("adapt", VERSION, cfg, inputs, build)
    shutil.rmtree(work, ignore_errors=True)
    return ref


def export(model, student: ArtifactRef, cfg: AdaptConfig, out: Path) -> None:
    """The merged model in the student's format and dtype (same loading contract as the
    pruned model), and, for LoRA, the unmerged adapter."""
    model.eval()
    if not cfg.full_finetune:
        with warnings.catch_warnings():
            # peft reads zero-sized LoRA tensors as un-gathered ZeRO-3/FSDP shards; here they
            # are the real adapters of layers pruned to no heads or no channels
            warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape.*")
            model.save_pretrained(out / ADAPTER)
        model = model.merge_and_unload()
    with no_progress_bars():
        model.to(stored_dtype(student.path)).save_pretrained(out / MODEL)
    for item in Path(student.path).iterdir():  # config, remote code, tokenizer: as the student has them
        if item.is_file() and item.suffix not in WEIGHT_SUFFIXES and not item.name.endswith(".index.json"):
            shutil.copy2(item, out / MODEL / item.name)
    provenance = (
        json.loads((out / MODEL / "bonsai.json").read_text()) if (out / MODEL / "bonsai.json").is_file() else {}
    )
    provenance["adaptation"] = {
        "steps": cfg.steps,
        "lora_rank": None if cfg.full_finetune else cfg.lora_rank,
        "distill_weight": cfg.distill_weight,
        "dtype": dtype_name(stored_dtype(student.path)),
    }
    (out / MODEL / "bonsai.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
