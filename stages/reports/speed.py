"""Wall-clock speed of models against each other: prefill throughput, decode latency, size.

Timings are measurements, not artifacts: taken fresh each time, never asserted in tests.
Models are measured *interleaved*: every repeat times each model once, alternating which goes
first, and each figure is the median over repeats.  A machine whose speed drifts (a job
starting beside it, thermal throttling) then slows both models alike, so their ratio holds,
where timings taken minutes apart can differ by more than the pruning gained.  Ids are random
because content does not change the cost.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bonsai.stages.core.devices import resolve_device, resolve_dtype
from bonsai.stages.core.errors import UserError
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


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved(jobs: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int) -> dict:
    """Median seconds per job over ``repeats`` rounds that run every job once, in an order that
    alternates round by round, after ``warmup`` untimed rounds."""
    names = list(jobs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(warmup + repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            seconds = _seconds(jobs[name], device)
            if round_ >= warmup:
                times[name].append(seconds)
    return {n: statistics.median(t) for n, t in times.items()}


def _ids(vocab: int, batch: int, length: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)


def prefill_jobs(models: dict[str, nn.Module], batch: int, tokens: int, device: torch.device) -> dict:
    ids = _ids(min(m.config.vocab_size for m in models.values()), batch, tokens, device)
    return {name: (lambda m=m: m(input_ids=ids, use_cache=False)) for name, m in models.items()}


def decode_jobs(models: dict[str, nn.Module], prompt: int, tokens: int, device: torch.device) -> dict:
    """generate() of ``tokens`` new tokens after a ``prompt``-token prompt (batch 1, greedy, KV
    cache on), and the prompt's prefill alone, which is subtracted per model afterwards."""
    ids = _ids(min(m.config.vocab_size for m in models.values()), 1, prompt, device)
    mask = torch.ones_like(ids)
    jobs = {}
    for name, m in models.items():
        jobs[(name, "generate")] = lambda m=m: m.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=m.config.eos_token_id,
        )
        jobs[(name, "prompt")] = lambda m=m: m(input_ids=ids, attention_mask=mask)
    return jobs


@torch.no_grad()
def measure_models(models: dict[str, nn.Module], cfg: SpeedConfig, device: torch.device, label: str = "speed") -> dict:
    """Rows of (metric, batch, tokens, value, unit) per model name, measured interleaved."""
    limit = min(getattr(m.config, "max_position_embeddings", None) or 1 << 30 for m in models.values())
    rows: dict[str, list[dict]] = {}
    for name, m in models.items():
        params = sum(p.numel() for p in m.parameters())
        size = sum(p.numel() * p.element_size() for p in m.parameters())
        rows[name] = [
            {"metric": "parameters", "batch": None, "tokens": None, "value": float(params), "unit": "count"},
            {"metric": "weights", "batch": None, "tokens": None, "value": size / 2**20, "unit": "MiB"},
        ]
    shapes = list(dict.fromkeys((b, min(s, limit)) for b, s in cfg.shapes))  # short contexts clamp shapes
    progress = Progress(f"{label}: {', '.join(models)}", len(shapes) + 1, "measurements", every_s=10.0)
    for batch, tokens in shapes:
        seconds = interleaved(prefill_jobs(models, batch, tokens, device), device, cfg.repeats, cfg.warmup)
        for name in models:
            rows[name].append(
                {
                    "metric": "prefill",
                    "batch": batch,
                    "tokens": tokens,
                    "value": batch * tokens / seconds[name],
                    "unit": "tokens/s",
                }
            )
        progress.advance()
    prompt = min(cfg.prompt_tokens, limit - cfg.decode_tokens)
    seconds = interleaved(decode_jobs(models, prompt, cfg.decode_tokens, device), device, cfg.repeats, cfg.warmup)
    add_decode_rows(rows, seconds, cfg.decode_tokens)
    progress.advance()
    return rows


def measure(model_dirs: dict[str, str], cfg: SpeedConfig, device: str = "auto") -> dict[str, list[dict]]:
    """Load every model (same device and dtype) and measure them interleaved."""
    dev = resolve_device(device)
    dtype = resolve_dtype(cfg.dtype, dev)
    models = {name: load_model(directory, dtype, dev) for name, directory in model_dirs.items()}
    return measure_models(models, cfg, dev)


def llama_cpp_jobs(engines: dict, tokens: list[int], decode_tokens: int) -> tuple[dict, dict]:
    """(prefill jobs: ``tokens`` through each engine at once, decode jobs: the same, then
    ``decode_tokens`` more one at a time, as generation feeds them), from an empty KV cache."""

    def prefill(engine):
        engine.reset()
        engine.eval(tokens)

    def decode(engine):
        prefill(engine)
        for step in range(decode_tokens):
            engine.eval([tokens[step % len(tokens)]])

    return (
        {name: (lambda e=e: prefill(e)) for name, e in engines.items()},
        {name: (lambda e=e: decode(e)) for name, e in engines.items()},
    )


def measure_llama_cpp(files: dict[str, str], cfg: SpeedConfig, threads: int | None = None) -> dict[str, list[dict]]:
    """The same rows as ``measure_models`` for GGUF files run by llama.cpp (llama-cpp-python),
    interleaved the same way: prefill tokens/s of one sequence at each length of ``cfg.shapes``
    (llama.cpp's batch is one sequence here), decode ms/token after a ``cfg.prompt_tokens``
    prompt, and each file's size."""
    import os

    try:
        from llama_cpp import Llama
    except ImportError:
        raise UserError(
            "--engine llama.cpp needs llama-cpp-python: pip install --require-hashes --no-deps "
            "-r requirements-llamacpp.lock (README, 'Running the pruned model in llama.cpp')"
        ) from None
    limit = min(_gguf_context(path) for path in files.values())  # short contexts clamp shapes
    lengths = sorted({min(tokens, limit) for _, tokens in cfg.shapes})
    prompt = min(cfg.prompt_tokens, limit - cfg.decode_tokens)
    threads = threads or os.cpu_count() or 1
    context = max(lengths + [prompt + cfg.decode_tokens])
    engines = {
        name: Llama(model_path=path, n_ctx=context, n_batch=context, n_threads=threads, verbose=False)
        for name, path in files.items()
    }
    rows = {
        name: [{"metric": "weights", "batch": None, "tokens": None, "value": os.path.getsize(p) / 2**20, "unit": "MiB"}]
        for name, p in files.items()
    }
    vocab = min(e.n_vocab() for e in engines.values())
    progress = Progress(f"speed (llama.cpp): {', '.join(files)}", len(lengths) + 1, "measurements", every_s=10.0)
    cpu = torch.device("cpu")
    for length in lengths:
        ids = _ids(vocab, 1, length, cpu)[0].tolist()
        jobs, _ = llama_cpp_jobs(engines, ids, 0)
        seconds = interleaved(jobs, cpu, cfg.repeats, cfg.warmup)
        for name in files:
            row = {
                "metric": "prefill",
                "batch": 1,
                "tokens": length,
                "value": length / seconds[name],
                "unit": "tokens/s",
            }
            rows[name].append(row)
        progress.advance()
    ids = _ids(vocab, 1, prompt, cpu)[0].tolist()
    first, generate = llama_cpp_jobs(engines, ids, cfg.decode_tokens)
    jobs = {(n, "prompt"): j for n, j in first.items()} | {(n, "generate"): j for n, j in generate.items()}
    seconds = interleaved(jobs, cpu, cfg.repeats, cfg.warmup)
    add_decode_rows(rows, seconds, cfg.decode_tokens)
    progress.advance()
    return rows


def add_decode_rows(rows: dict[str, list[dict]], seconds: dict, decode_tokens: int) -> None:
    """Decode ms/token per model from interleaved timings of its prompt alone and of the prompt
    plus ``decode_tokens`` generated tokens (torch and llama.cpp time decode the same way)."""
    for name in rows:
        per_token = 1000.0 * max(seconds[(name, "generate")] - seconds[(name, "prompt")], 0.0) / decode_tokens
        rows[name].append(
            {"metric": "decode", "batch": 1, "tokens": decode_tokens, "value": per_token, "unit": "ms/token"}
        )


def _gguf_context(path: str) -> int:
    import gguf

    fields = gguf.GGUFReader(path).fields
    architecture = fields["general.architecture"].contents()
    return int(fields[f"{architecture}.context_length"].contents())


def speedup(parent: float, pruned: float, unit: str) -> float:
    """Above 1 is faster: throughputs divide, latencies invert."""
    return parent / pruned if unit in ("ms/token", "s") else pruned / parent


def ratio_text(value: float) -> str:
    return f"{value:.2f}x"


def speedup_text(value: float) -> str:
    """A speed ratio (above 1 is faster) in words: "1.14x faster", or "1.08x slower", never
    "0.93x faster"."""
    return f"{ratio_text(value)} faster" if value >= 1 else f"{ratio_text(1 / value)} slower"
