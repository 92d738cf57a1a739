"""Parent against pruned model, side by side: size, held-out perplexity, prefill and decode
speed (measured interleaved, as medians), and their answers to the same prompts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from bonsai.artifacts import ArtifactRef, Store, external_ref
from bonsai.stages import perplexity
from bonsai.stages.core.data import source_digest
from bonsai.stages.core.devices import resolve_device, resolve_dtype
from bonsai.stages.core.model_dirs import model_digest
from bonsai.stages.core.model_io import load_model, load_tokenizer, shared_models
from bonsai.stages.reports.speed import SpeedConfig, measure_models, speedup


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    seq_len: int  # perplexity windows
    max_windows: int
    batch_size: int
    dtype: str
    speed: SpeedConfig = field(default_factory=lambda: SpeedConfig(shapes=((1, 256), (8, 128)), repeats=5, warmup=1))
    prompts: tuple[str, ...] = ()
    answer_tokens: int = 48


@torch.no_grad()
def answer(model, tokenizer, prompt: str, tokens: int, device: torch.device) -> str:
    """Greedy answer, through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def compare(
    parent_dir: str, pruned_dir: str, text: str, cfg: CompareConfig, store: Store, device: str = "auto"
) -> dict:
    """{"rows": one per model, "speedups": pruned against parent, "answers": (prompt, parent's,
    pruned's)}.  Perplexities are cached artifacts; speeds and answers are measured now."""
    shared_models().clear()
    dev = resolve_device(device)
    data = ArtifactRef("data", key="text", path=str(Path(text).resolve()), digest=source_digest(text))
    ppl_cfg = perplexity.PerplexityConfig(
        seq_len=cfg.seq_len, max_windows=cfg.max_windows, batch_size=cfg.batch_size, dtype=cfg.dtype
    )
    dirs = {"parent": parent_dir, "pruned": pruned_dir}
    ppl = {
        name: perplexity.run(external_ref("model", d, model_digest(d)), data, ppl_cfg, store, device).info()
        for name, d in dirs.items()
    }
    models = {name: load_model(d, resolve_dtype(cfg.dtype, dev), dev) for name, d in dirs.items()}
    measured = measure_models(models, cfg.speed, dev, label="speed, parent and pruned interleaved")
    rows = []
    for name in dirs:
        row = {"model": name, "perplexity": ppl[name]["perplexity"]}
        for m in measured[name]:
            key = m["metric"] + (f" {m['batch']}x{m['tokens']}" if m["metric"] == "prefill" else "")
            row[key] = m["value"]
        rows.append(row)
    speedups = {
        k: speedup(rows[0][k], rows[1][k], "ms/token" if k == "decode" else "tokens/s")
        for k in rows[0]
        if k.startswith(("prefill", "decode"))
    }
    tokenizer = load_tokenizer(parent_dir)
    answers = [(p, *(answer(models[n], tokenizer, p, cfg.answer_tokens, dev) for n in dirs)) for p in cfg.prompts]
    return {"rows": rows, "speedups": speedups, "answers": answers}
