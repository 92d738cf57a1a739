"""Perplexity stage: exp(mean next-token NLL) over non-overlapping windows of a text source.

Protocol (written next to the number): the source's documents are joined by blank lines and
tokenized under one BOS, cut into consecutive non-overlapping windows of ``seq_len`` tokens,
the first ``max_windows`` are scored, and each window scores its ``seq_len - 1`` next-token
predictions with no context carried over from the window before.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from bonsai.artifacts import ArtifactRef, Store
from bonsai.stages.calibration import cut_windows
from bonsai.stages.core.devices import resolve_device, resolve_dtype
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.model_io import load_model, load_tokenizer
from bonsai.stages.core.nll import mean_nll

VERSION = "2"
FILE = "perplexity.json"


@dataclass(frozen=True, kw_only=True)
class PerplexityConfig:
    seq_len: int
    max_windows: int
    batch_size: int
    dtype: str


def run(
    model: ArtifactRef, data: ArtifactRef, cfg: PerplexityConfig, store: Store, device: str = "auto"
) -> ArtifactRef:
    def build(out: Path) -> dict:
        tokenizer = load_tokenizer(model.path)
        windows, _ = cut_windows(tokenizer, data.path, cfg.seq_len, cfg.max_windows, joined=True)
        if not windows:
            raise UserError(f"{data.path}: too little text for one window of {cfg.seq_len} tokens")
        dev = resolve_device(device)
        lm = load_model(model.path, resolve_dtype(cfg.dtype, dev), dev)
        nll, tokens = mean_nll(lm, torch.tensor(windows, dtype=torch.long), cfg.batch_size, dev)
        result = {
            "perplexity": math.exp(nll) if nll < 700 else float("inf"),
            "nll": nll,
            "tokens": tokens,
            "windows": len(windows),
            "seq_len": cfg.seq_len,
            "protocol": f"{data.path}: documents joined by blank lines under one BOS; the first {len(windows)} "
            f"non-overlapping windows of {cfg.seq_len} tokens, each scoring its {cfg.seq_len - 1} "
            f"next tokens with no context across windows",
        }
        (out / FILE).write_text(json.dumps(result, indent=1, sort_keys=True))
        return result

    return store.produce("perplexity", VERSION, cfg, [model, data], build)
