"""Wall-clock speed of a model: prefill throughput, decode latency, size.

Timings are measurements, not artifacts: they are taken fresh each time (and never
asserted in tests).  Each number is the median of ``repeats`` timed runs after ``warmup``
untimed ones; ids are random because content does not change the cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from bonsai.stages.core.devices import resolve_device, resolve_dtype
from bonsai.stages.core.model_io import load_model
from bonsai.stages.core.progress import Progress


@dataclass(frozen=True, kw_only=True)
class SpeedConfig:
    shapes: tuple[tuple[int, int], ...] = ((1, 128), (8, 128), (1, 512), (8, 512))  # (batch, tokens)
    prompt_tokens: int = 32
    decode_tokens: int = 32
    repeats: int = 5
    warmup: int = 2
    dtype: str = "auto"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, repeats: int, warmup: int) -> float:
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def _ids(model: nn.Module, batch: int, length: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=g).to(device)


@torch.no_grad()
def prefill_tokens_per_s(
    model: nn.Module, batch: int, seq_len: int, device: torch.device, repeats: int = 5, warmup: int = 2
) -> float:
    ids = _ids(model, batch, seq_len, device)
    return batch * seq_len / _median_seconds(lambda: model(input_ids=ids, use_cache=False), device, repeats, warmup)


@torch.no_grad()
def decode_ms_per_token(
    model: nn.Module, prompt: int, tokens: int, device: torch.device, repeats: int = 5, warmup: int = 2
) -> float:
    """generate() of ``tokens`` new tokens after a ``prompt``-token prompt, minus the prompt's
    prefill, per new token (batch 1, greedy, KV cache on)."""
    ids = _ids(model, 1, prompt, device)
    mask = torch.ones_like(ids)

    def generate():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=model.config.eos_token_id,
        )

    total = _median_seconds(generate, device, repeats, warmup)
    prefill = _median_seconds(lambda: model(input_ids=ids, attention_mask=mask), device, repeats, warmup)
    return 1000.0 * max(total - prefill, 0.0) / tokens


def measure(model_dir: str, cfg: SpeedConfig, device: str = "auto") -> list[dict]:
    """Rows of (metric, batch, tokens, value, unit) for one model directory."""
    dev = resolve_device(device)
    model = load_model(model_dir, resolve_dtype(cfg.dtype, dev), dev)
    limit = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    params = sum(p.numel() for p in model.parameters())
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = [
        {"metric": "parameters", "batch": None, "tokens": None, "value": float(params), "unit": "count"},
        {"metric": "weights", "batch": None, "tokens": None, "value": size / 2**20, "unit": "MiB"},
    ]
    shapes = list(dict.fromkeys((b, min(s, limit)) for b, s in cfg.shapes))  # short contexts clamp shapes
    progress = Progress(f"speed: {model_dir}", len(shapes) + 1, "measurements", every_s=10.0)
    for batch, tokens in shapes:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        value = prefill_tokens_per_s(model, batch, tokens, dev, cfg.repeats, cfg.warmup)
        rows.append({"metric": "prefill", "batch": batch, "tokens": tokens, "value": value, "unit": "tokens/s"})
        if dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated(dev) / 2**20
            rows.append({"metric": "peak memory", "batch": batch, "tokens": tokens, "value": peak, "unit": "MiB"})
        progress.advance()
    prompt = min(cfg.prompt_tokens, limit - cfg.decode_tokens)
    value = decode_ms_per_token(model, prompt, cfg.decode_tokens, dev, cfg.repeats, cfg.warmup)
    rows.append({"metric": "decode", "batch": 1, "tokens": cfg.decode_tokens, "value": value, "unit": "ms/token"})
    progress.advance()
    return rows
