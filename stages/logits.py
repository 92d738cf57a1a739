"""Logits stage: the parent's top-k next-token log-probabilities, cached for distillation.

One artifact per shard of windows: ``logits.safetensors`` holds, for each window and each
of its first ``seq_len - 1`` positions, the ``top_k`` largest log-probabilities (float16),
their token ids (int32) and the log of the probability mass left outside them (float32);
``index.parquet`` says which windows the shard covers.  Together the shards' index tables
form the cache's index.  With the teacher's knowledge reduced to these tensors, training
never needs the parent in memory: it is loaded here, once, then released.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bonsai.artifacts import ArtifactRef, Store, kill_point
from bonsai.stages.calibration import load_windows
from bonsai.stages.core.model_io import PrunedModel
from bonsai.stages.core.nll import batches
from bonsai.stages.core.progress import Progress

VERSION = "1"
TENSORS = "logits.safetensors"
INDEX = "index.parquet"


@dataclass(frozen=True, kw_only=True)
class LogitsConfig:
    shard: int
    shard_size: int  # windows per shard
    top_k: int
    batch_size: int
    dtype: str


def shard_count(windows: int, shard_size: int) -> int:
    return math.ceil(windows / shard_size)


@torch.no_grad()
def top_k_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probs (..., k) float32, ids (..., k) int64, log tail mass (...)) of the softmax."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top, ids = logprobs.topk(k, dim=-1)
    covered = torch.logsumexp(top, dim=-1).clamp(max=0.0)  # log of the mass inside the top k
    tail = torch.log((-torch.expm1(covered)).clamp_min(1e-30))  # log(1 - exp(covered)), stably
    return top, ids, tail


def run(
    parent: ArtifactRef, windows: ArtifactRef, cfg: LogitsConfig, store: Store, device: str = "auto"
) -> ArtifactRef:
    def build(out: Path) -> dict:
        model, _, dev = PrunedModel(parent).load(cfg.dtype, device)
        total = int(windows.info()["windows"])
        first = cfg.shard * cfg.shard_size
        ids = list(range(first, min(first + cfg.shard_size, total)))
        tokens = load_windows(windows, ids)
        values, indices, tails = [], [], []
        progress = Progress(f"teacher logits (shard {cfg.shard})", len(ids), "windows")
        for start, stop in batches(len(ids), cfg.batch_size):
            logits = model(input_ids=tokens[start:stop].to(dev), use_cache=False).logits[:, :-1]
            top, idx, tail = top_k_logprobs(logits, cfg.top_k)
            values.append(top.half().cpu())
            indices.append(idx.int().cpu())
            tails.append(tail.cpu())
            progress.advance(stop - start)
            kill_point("logits")
        save_file(
            {"logprobs": torch.cat(values), "indices": torch.cat(indices), "tail": torch.cat(tails)},
            str(out / TENSORS),
            metadata={"vocab_size": str(model.config.vocab_size), "top_k": str(cfg.top_k)},
        )
        pl.DataFrame(
            {"shard": [cfg.shard] * len(ids), "window": ids}, schema={"shard": pl.Int32, "window": pl.Int32}
        ).write_parquet(out / INDEX)
        return {
            "windows": len(ids),
            "vocab_size": int(model.config.vocab_size),
            "bytes": (out / TENSORS).stat().st_size,
        }

    return store.produce("logits", VERSION, cfg, [parent, windows], build)


class TeacherCache:
    """Teacher targets for any window id, read from the shards through memory maps: only the
    rows a batch needs are read, so the cache may be far larger than memory."""

    def __init__(self, shards: list[ArtifactRef]):
        self.location: dict[int, tuple[int, int]] = {}
        self.handles = [safe_open(str(s.file(TENSORS)), framework="pt") for s in shards]
        self.vocab_size = int(shards[0].info()["vocab_size"]) if shards else None
        for number, shard in enumerate(shards):
            for row, window in enumerate(pl.read_parquet(shard.file(INDEX))["window"].to_list()):
                self.location[window] = (number, row)

    def targets(self, window_ids: list[int]) -> dict[str, torch.Tensor]:
        out = {}
        for key in ("logprobs", "indices", "tail"):
            rows = []
            for window in window_ids:
                number, row = self.location[window]
                rows.append(self.handles[number].get_slice(key)[row])
            out[key] = torch.stack(rows)
        return out
