"""Parent against pruned model: size, held-out perplexity and prefill speed, side by side."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bonsai.artifacts import ArtifactRef, Store, external_ref
from bonsai.stages import perplexity
from bonsai.stages.core.data import source_digest
from bonsai.stages.core.devices import resolve_device, resolve_dtype
from bonsai.stages.core.model_dirs import model_digest
from bonsai.stages.core.model_io import load_model, shared_models
from bonsai.stages.reports.speed import prefill_tokens_per_s


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    seq_len: int
    max_windows: int
    batch_size: int
    dtype: str
    speed_batch: int = 8


def compare(
    parent_dir: str, pruned_dir: str, text: str, cfg: CompareConfig, store: Store, device: str = "auto"
) -> list[dict]:
    """One row per model.  Perplexities are cached artifacts; speeds are measured now."""
    shared_models().clear()
    dev = resolve_device(device)
    data = ArtifactRef("data", key="text", path=str(Path(text).resolve()), digest=source_digest(text))
    ppl_cfg = perplexity.PerplexityConfig(
        seq_len=cfg.seq_len, max_windows=cfg.max_windows, batch_size=cfg.batch_size, dtype=cfg.dtype
    )
    rows = []
    for name, directory in (("parent", parent_dir), ("pruned", pruned_dir)):
        ref = external_ref("model", directory, model_digest(directory))
        ppl = perplexity.run(ref, data, ppl_cfg, store, device).info()
        model = load_model(directory, resolve_dtype(cfg.dtype, dev), dev)
        rows.append(
            {
                "model": name,
                "parameters": sum(p.numel() for p in model.parameters()),
                "perplexity": ppl["perplexity"],
                "prefill_tokens_per_s": prefill_tokens_per_s(model, cfg.speed_batch, cfg.seq_len, dev),
            }
        )
        del model
    for row in rows:
        row["speedup"] = row["prefill_tokens_per_s"] / rows[0]["prefill_tokens_per_s"]
    return rows
