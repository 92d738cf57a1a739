"""Wall-clock prefill throughput.  Timings are measurements, not artifacts: they are taken
fresh each time and belong in reports and benchmarks, never in assertions."""

from __future__ import annotations

import time

import torch
from torch import nn


@torch.no_grad()
def prefill_tokens_per_s(model: nn.Module, batch: int, seq_len: int, device: torch.device,
                         repeats: int = 5, warmup: int = 2) -> float:
    """Median tokens/s of full forward passes on random ids (content does not change cost)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=g).to(device)
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return batch * seq_len / times[len(times) // 2]
