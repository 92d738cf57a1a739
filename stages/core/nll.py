"""The utility U of a (sub-)model: minus its mean next-token negative log-likelihood.

Logits come from the model's own forward (so family quirks such as logit soft-capping
apply) and are upcast to float32 one row at a time: a float16 model that overflows gives a
non-finite NLL for that row, which callers record rather than let it poison a mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def row_nll(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL per row, float64, shape (rows,).  Each row scores len-1 tokens."""
    logits = model(input_ids=input_ids, use_cache=False).logits
    targets = input_ids[:, 1:]
    out = torch.empty(input_ids.shape[0], dtype=torch.float64)
    for row in range(input_ids.shape[0]):
        nll = F.cross_entropy(logits[row, :-1].float(), targets[row], reduction="sum")
        out[row] = nll.double().cpu()
    return out


def batches(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(start + size, total)


@torch.no_grad()
def mean_nll(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device) -> tuple[float, int]:
    """(mean NLL per token, tokens scored) over non-overlapping windows."""
    total, tokens = 0.0, 0
    for start, stop in batches(windows.shape[0], batch_size):
        ids = windows[start:stop].to(device)
        total += float(row_nll(model, ids).sum())
        tokens += ids.shape[0] * (ids.shape[1] - 1)
    return total / max(tokens, 1), tokens
