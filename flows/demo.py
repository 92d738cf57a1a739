"""`bonsai demo`: the whole method on a laptop, with nothing to download.

A small GQA LLaMA is trained on the documentation that ships with Python (cached after
the first run), pruned to 50% of its attention+MLP parameters with Bonsai, and compared
with its parent on held-out text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bonsai.artifacts import Store
from bonsai.flows.executors import Executor, Inline
from bonsai.flows.prune import run_prune
from bonsai.stages import tiny_parent
from bonsai.stages.core.options import PruneOptions
from bonsai.stages.core.paths import cache_dir
from bonsai.stages.reports.audit import audit
from bonsai.stages.reports.compare import CompareConfig, compare
from bonsai.stages.reports.terminal import iteration_table, table


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    sparsity: float = 0.5
    prune_frac: float = 0.1
    masks_per_iter: int = 60
    calib_samples: int = 8
    seq_len: int = 128
    batch_size: int = 16
    shard_size: int = 20
    calib_pool: int = 256
    eval_windows: int = 64
    parent_steps: int = 240


def run_demo(out: str, settings: DemoSettings, execute: Executor = Inline()) -> dict:
    parents = Store(cache_dir() / "parents")
    parent = execute("tiny-parent", tiny_parent.run, tiny_parent.TinyParentConfig(steps=settings.parent_steps), parents)
    run_dir = Path(out) / "run"
    config = PruneOptions(
        sparsity=settings.sparsity,
        prune_frac=settings.prune_frac,
        masks_per_iter=settings.masks_per_iter,
        calib_samples=settings.calib_samples,
        seq_len=settings.seq_len,
        batch_size=settings.batch_size,
        shard_size=settings.shard_size,
        calib_pool=settings.calib_pool,
        device="cpu",
    )
    summary = run_prune(
        str(parent.file(tiny_parent.MODEL)), str(parent.file(tiny_parent.TRAIN_TEXT)), str(run_dir), config, execute
    )
    rows = execute(
        "compare",
        compare,
        str(parent.file(tiny_parent.MODEL)),
        summary["model"],
        str(parent.file(tiny_parent.HELDOUT_TEXT)),
        CompareConfig(
            seq_len=settings.seq_len, max_windows=settings.eval_windows, batch_size=settings.batch_size, dtype="float32"
        ),
        Store(run_dir),
        "cpu",
    )
    plots = audit(str(run_dir))["plots"]
    sparsity = summary["iterations"][-1]["sparsity"]
    report = "\n".join(
        [
            f"Bonsai demo: a {parent.info()['parameters']:,}-parameter LLaMA trained on Python's own "
            f"documentation, pruned to {sparsity:.0%} of its attention+MLP parameters.",
            "",
            table(
                ["model", "parameters", "held-out perplexity", "prefill tokens/s", "speed-up"],
                [[r["model"], r["parameters"], r["perplexity"], r["prefill_tokens_per_s"], r["speedup"]] for r in rows],
            ),
            "",
            "Iterations:",
            iteration_table(summary),
            "",
            f"Plots: {', '.join(plots)}",
            f"Audit tables: {run_dir}/<stage>/<key>/*.parquet (see README, 'Auditing a run'); "
            f"`bonsai audit {run_dir}`.",
        ]
    )
    return {"report": report, "rows": rows, "summary": summary}
