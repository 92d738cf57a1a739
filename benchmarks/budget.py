"""The budget quality needs, and the command's start-up overhead.

    python benchmarks/budget.py grid [--seeds 0 1 2] [--masks 32 64 128 256] [--windows 2 4 8 16]
    python benchmarks/budget.py paired [--seeds 0 1 2]
    python benchmarks/budget.py repair [--seeds 0 1 2] [--samples 128 512]
    python benchmarks/budget.py variant NAME [--seeds 0 1 2] [--sparsity 0.2] -- FLAGS...
    python benchmarks/budget.py overhead [--repeats 5] [--code DIR]

``grid`` prunes SmolLM2-135M-Instruct to 20 % (p_iter 0.1, windows of 128 tokens, the repair
and every other option at the command's defaults) through the real ``bonsai prune`` command,
once per (sub-models per iteration, windows per sub-model) of the grid: ``--masks`` at 8
windows, ``--windows`` at 128 sub-models.  It reports held-out perplexity (the real-model
benchmark's protocol) and the command's wall time per setting, mean and spread over seeds,
with a plot.  ``paired`` runs the same setting (128 sub-models x 8 windows) with 0.1.0's
defaults (``--dtype float32``: what ``auto`` resolved to on a CPU then) and then with this
version's (``--dtype auto``), back to back per seed, and compares whole-command wall time and
held-out perplexity.  ``repair`` runs the CPU defaults (options.BUDGETS["cpu"]) with each
``--reconstruct-samples`` (the repair's windows per iteration), the repair's own share of the
time beside quality.  ``variant`` runs the CPU defaults with other flags, beside them.
``overhead`` is the command's wall time minus the time its stages record, with the temporary
server, beside the time a fresh interpreter takes only to import what the command needs before
its first stage (a floor no change to the command itself can go under).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import common
import polars as pl
import real_model
import torch

from bonsai.artifacts import RunDir
from bonsai.stages.core.model_io import load_model
from bonsai.stages.core.nll import mean_nll
from bonsai.stages.core.options import BUDGETS
from bonsai.stages.reports.render import pyplot, save

OUT = common.RESULTS / "budget"
# what `bonsai prune` imports before its first stage runs: the model's library and its torch, Prefect's
# flow engine, the artifact tables
FIRST_STAGE_IMPORTS = "import torch, transformers.modeling_utils, prefect.flows, prefect.task_engine, polars, pyarrow"


def command(
    model: str, train: str, out: Path, sparsity: float, masks: int, windows: int, seed: int, *flags: str
) -> list[str]:
    return common.prune_command(
        model,
        train,
        out,
        *("--sparsity", str(sparsity), "--prune-frac", "0.1"),
        *("--masks-per-iter", str(masks), "--calib-samples", str(windows), "--seq-len", "128"),
        *("--batch-size", "8", "--shard-size", "16", "--calib-pool", "1024", "--device", "cpu"),
        *("--reconstruct-samples", "128"),  # what every table's runs used (the CPU default is 512 since 0.8.0)
        *("--rival", "none"),  # likewise (the default is auto since 0.6.0); a variant's --rival comes after
        *("--unit-order", "estimator"),  # likewise (auto, 0.7.0's default, follows the variant's --rival)
        *("--reconstruct-final-damping", "0.1"),  # likewise (0.01 since 0.9.0)
        *("--reconstruct-publish", "chain"),  # likewise (parent since 0.10.0)
        *("--seed", str(seed)),
        *flags,
    )


def timed_prune(cmd: list[str], run: Path) -> dict:
    """Runs the command; its wall time, its stages' time, and the pruned model's held-out perplexity."""
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    pruned = load_model(str(run / "model"), torch.float32, torch.device("cpu"))
    ppl = math.exp(mean_nll(pruned, real_model.Scorer("docs").windows, 16, torch.device("cpu"))[0])
    return {"wall_s": wall, "stage_s": stage_seconds(run), "perplexity": ppl}


def stage_seconds(run: Path, stage: str = "*") -> float:
    return sum(json.loads(m.read_text())["wall_s"] for m in run.glob(f"{stage}/*/manifest.json"))


def stage_split(run: Path) -> dict:
    """The time a run's evaluation took (the same work in every variant of the CPU defaults: a
    check that runs compared were on an equally fast machine) and its repair's."""
    return {"evaluate_s": stage_seconds(run, "evaluate"), "reconstruct_s": stage_seconds(run, "reconstruct")}


def first_repair(run: Path) -> pl.DataFrame:
    """The first iteration's repair table (stages/reconstruct.py): its removal does not depend on
    any repair, so runs of one seed repair the same removal there (under --rival, the kept
    removal's repair, which may be the rival's: another removal)."""
    lineage = RunDir(run).lineage()
    for path in run.glob("reconstruct/*/manifest.json"):
        if lineage and ("reconstruct", path.parent.name) not in lineage:
            continue
        if json.loads(path.read_text())["config"]["iteration"] == 0:
            return pl.read_parquet(path.parent / "repair.parquet")
    raise SystemExit(f"{run}: no first repair")


def paired_auto() -> list[dict]:
    """The paired runs' 0.2.0 side (128 x 8, the CPU default since): the grid's 128 x 8 point and
    the repair comparison's 128-window point, so neither runs it again."""
    paired_file = OUT / "paired.json"
    rows = json.loads(paired_file.read_text()) if paired_file.is_file() else []
    keep = ("seed", "wall_s", "stage_s", "perplexity")
    return [{k: r[k] for k in keep} for r in rows if r["defaults"].startswith("0.2.0")]


def begin(file: str) -> tuple[str, str, Path, list[dict]]:
    """(the model, the calibration text, a subcommand's results file, its rows so far)."""
    common.setup_logging()
    OUT.mkdir(parents=True, exist_ok=True)
    rows_file = OUT / file
    rows = json.loads(rows_file.read_text()) if rows_file.is_file() else []
    return real_model.model(), common.texts()[0], rows_file, rows


def grid(args) -> None:
    model, train, rows_file, rows = begin("rows.json")
    for r in paired_auto():
        if (128, 8, r["seed"]) not in {(x["masks"], x["windows"], x["seed"]) for x in rows}:
            rows.append({"masks": 128, "windows": 8, **r})
    done = {(r["masks"], r["windows"], r["seed"]) for r in rows}
    settings = [(m, 8) for m in args.masks] + [(128, w) for w in args.windows if w != 8 or 128 not in args.masks]
    for seed in args.seeds:
        for masks, per in settings:
            if (masks, per, seed) in done:
                continue
            run = OUT / f"masks{masks}-windows{per}-seed{seed}"
            measured = timed_prune(command(model, train, run, 0.2, masks, per, seed), run)
            rows.append({"masks": masks, "windows": per, "seed": seed, **measured})
            rows_file.write_text(json.dumps(rows, indent=1))
            print(rows[-1], flush=True)
    frame = pl.DataFrame(rows).with_columns(tokens=pl.col("masks") * pl.col("windows") * 128)
    summary = (
        frame.group_by("masks", "windows", "tokens")
        .agg(
            pl.col("perplexity").mean().alias("mean"),
            pl.col("perplexity").std().alias("sd"),
            pl.len().alias("seeds"),
            pl.col("wall_s").mean().alias("wall_s"),
        )
        .sort("tokens", "masks")
    )
    print(common.markdown(list(summary.columns), summary.rows()))
    plot(frame, common.PLOTS / "budget-smollm2.png")


def paired(args) -> None:
    model, train, rows_file, rows = begin("paired.json")
    done = {(r["defaults"], r["seed"]) for r in rows}
    for seed in args.seeds:
        for defaults, flags in (("0.1.0 (float32)", ("--dtype", "float32")), ("0.2.0 (auto)", ())):
            if (defaults, seed) in done:
                continue
            run = OUT / f"paired-{'float32' if flags else 'auto'}-seed{seed}"
            measured = timed_prune(command(model, train, run, 0.2, 128, 8, seed, *flags), run)
            dtype = json.loads((run / "run.json").read_text())["identity"]["config"]["dtype"]
            rows.append({"defaults": defaults, "seed": seed, "dtype": dtype, **measured})
            rows_file.write_text(json.dumps(rows, indent=1))
            print(rows[-1], flush=True)
    frame = pl.DataFrame(rows)
    print(common.markdown(list(frame.columns), frame.rows()))
    summary = frame.group_by("defaults").agg(
        pl.col("perplexity").mean().alias("perplexity"),
        (pl.col("perplexity").max() - pl.col("perplexity").min()).alias("seed spread"),
        pl.col("wall_s").mean().alias("wall_s"),
    )
    print(common.markdown(list(summary.columns), summary.sort("defaults").rows()))
    by_seed = frame.pivot(on="defaults", index="seed", values="wall_s")
    ratios = by_seed["0.2.0 (auto)"] / by_seed["0.1.0 (float32)"]
    print(f"wall-time ratio per seed: {', '.join(f'{r:.2f}' for r in ratios)}; mean {ratios.mean():.2f}")


def repair(args) -> None:
    model, train, rows_file, rows = begin("repair.json")
    budget = BUDGETS["cpu"]
    if (budget["masks_per_iter"], budget["calib_samples"]) == (128, 8):
        for r in paired_auto():
            if (128, r["seed"]) not in {(x["samples"], x["seed"]) for x in rows}:
                repair_s = stage_seconds(OUT / f"paired-auto-seed{r['seed']}", "reconstruct")
                rows.append({"samples": 128, **r, "reconstruct_s": repair_s})
    done = {(r["samples"], r["seed"]) for r in rows}
    for seed in args.seeds:
        for samples in args.samples:
            if (samples, seed) in done:
                continue
            run = OUT / f"repair{samples}-seed{seed}"
            flags = ("--reconstruct-samples", str(samples))
            cmd = command(model, train, run, 0.2, budget["masks_per_iter"], budget["calib_samples"], seed, *flags)
            measured = timed_prune(cmd, run)
            repair_s = stage_seconds(run, "reconstruct")
            rows.append({"samples": samples, "seed": seed, **measured, "reconstruct_s": repair_s})
            rows_file.write_text(json.dumps(rows, indent=1))
            print(rows[-1], flush=True)
    frame = pl.DataFrame(rows)
    print(common.markdown(list(frame.columns), frame.sort("samples", "seed").rows()))
    summary = frame.group_by("samples").agg(
        pl.col("perplexity").mean().alias("perplexity"),
        (pl.col("perplexity").max() - pl.col("perplexity").min()).alias("seed spread"),
        pl.col("wall_s").mean(),
        pl.col("reconstruct_s").mean(),
    )
    print(common.markdown(list(summary.columns), summary.sort("samples").rows()))


def variant(args) -> None:
    """The CPU defaults with other flags, as ``NAME``, beside the defaults' own runs (the paired
    runs' 0.2.0 side: the same command without the flags, on the same seeds)."""
    model, train, rows_file, rows = begin("variants.json")
    budget = BUDGETS["cpu"]
    done = {(r["name"], r["seed"]) for r in rows}
    flags = args.flags
    for seed in args.seeds:
        if (args.name, seed) in done:
            continue
        run = OUT / f"variant-{args.name}-seed{seed}"
        cmd = command(model, train, run, args.sparsity, budget["masks_per_iter"], budget["calib_samples"], seed, *flags)
        measured = timed_prune(cmd, run)
        row = {"name": args.name, "flags": " ".join(flags), "sparsity": args.sparsity, "seed": seed}
        rows.append({**row, **measured, **stage_split(run)})
        rows_file.write_text(json.dumps(rows, indent=1))
        print(rows[-1], flush=True)
    defaults = [{"name": "defaults", "flags": "", "sparsity": 0.2, **r} for r in paired_auto()]
    for r in defaults:
        r.update(stage_split(OUT / f"paired-auto-seed{r['seed']}"))
    for r in rows:
        r.setdefault("sparsity", 0.2)  # rows recorded before --sparsity
    columns = ("name", "flags", "sparsity", "seed", "wall_s", "evaluate_s", "reconstruct_s", "perplexity")
    frame = pl.DataFrame([{c: r.get(c) for c in columns} for r in defaults + rows])
    summary = (
        frame.group_by("name", "flags", "sparsity")
        .agg(
            pl.col("perplexity").mean().alias("perplexity"),
            pl.col("perplexity").std().alias("sd"),
            pl.len().alias("seeds"),
            pl.col("wall_s").mean(),
            pl.col("evaluate_s").mean(),
            pl.col("reconstruct_s").mean(),
        )
        .sort("perplexity")
    )
    print(common.markdown(list(summary.columns), summary.rows()))
    print(f"first iteration's repair, {args.name} against the defaults' (relative held-out output error after it):")
    header = ["seed", "projections", "defaults: mean", f"{args.name}: mean", "largest relative difference"]
    table = []
    for r in rows:
        if r["name"] == args.name:
            defaults_run = OUT / f"paired-auto-seed{r['seed']}"
            if not defaults_run.is_dir():  # `budget.py paired` not run here: nothing to compare with
                print(f"seed {r['seed']}: no defaults' run ({defaults_run}); not compared")
                continue
            ours = first_repair(OUT / f"variant-{args.name}-seed{r['seed']}")
            theirs = first_repair(defaults_run)
            if ours.select("layer", "projection", "kept").rows() != theirs.select("layer", "projection", "kept").rows():
                print(f"seed {r['seed']}: {args.name} repaired another removal first; not compared")
                continue
            change = (ours["error_after"] / theirs["error_after"] - 1).abs().max()
            table.append([r["seed"], ours.height, theirs["error_after"].mean(), ours["error_after"].mean(), change])
    print(common.markdown(header, table))


def plot(frame: pl.DataFrame, path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    panels = (
        (left, "windows", "masks", "sub-models per iteration (8 windows each)"),
        (right, "masks", "windows", "windows per sub-model (128 sub-models)"),
    )
    top = 23.0  # runs above it (a collapsed selection) are marked at the edge with their value
    cpu = BUDGETS["cpu"]
    for ax, fixed, varied, label in panels:
        part = frame.filter(pl.col(fixed) == (8 if fixed == "windows" else 128))
        mean = (
            part.group_by(varied).agg(pl.col("perplexity").mean(), pl.col("perplexity").std().alias("sd")).sort(varied)
        )
        off = (mean["perplexity"] > top).to_list()
        sd = [0.0 if o else (v or 0.0) for o, v in zip(off, mean["sd"].to_list(), strict=True)]
        ax.errorbar(
            mean[varied],
            mean["perplexity"].clip(upper_bound=top),
            yerr=sd,
            marker="o",
            capsize=3,
            label="mean and sd of seeds",
        )
        inside = part.filter(pl.col("perplexity") <= top)
        ax.scatter(inside[varied], inside["perplexity"], s=10, alpha=0.6, label="one seed")
        for x, values in part.filter(pl.col("perplexity") > top).group_by(varied).agg("perplexity").iter_rows():
            average = mean.filter(pl.col(varied) == x)["perplexity"][0]
            text = f"off scale: mean {average:.1f}; seeds at {', '.join(f'{v:.1f}' for v in sorted(values))}"
            ax.annotate(text, (x, top), xytext=(6, -14), textcoords="offset points", fontsize=8, color="tab:red")
            ax.scatter([x], [top], marker="^", color="tab:red", s=30, zorder=3)
        default = cpu["masks_per_iter"] if varied == "masks" else cpu["calib_samples"]
        ax.axvline(default, color="grey", linestyle=":", label="CPU default")
        ax.set_xscale("log", base=2)
        ax.set_ylim(19.0, top + 0.3)
        ax.set_xlabel(label)
    left.set_ylabel("held-out perplexity at 20 %")
    left.legend(fontsize=8, loc="upper right")
    fig.suptitle("SmolLM2-135M-Instruct pruned to 20 %: held-out perplexity against the evaluation budget (3 seeds)")
    save(fig, path)


def overhead(args) -> None:
    """``--code DIR``: run another version of bonsai (a folder holding its ``bonsai`` package),
    for the figure before a change."""
    model, train, _ = common.parent()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # a temporary server each time
    if args.code:
        env["PYTHONPATH"] = args.code
    rows = []
    for repeat in range(args.repeats):
        run = OUT / f"overhead-{repeat}"
        start = time.perf_counter()
        result = subprocess.run(command(model, train, run, 0.1, 32, 16, 0), capture_output=True, text=True, env=env)
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
    g = sub.add_parser("grid")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    g.add_argument("--masks", type=int, nargs="+", default=[32, 64, 128, 256])
    g.add_argument("--windows", type=int, nargs="+", default=[2, 4, 8, 16])
    g.set_defaults(handler=grid)
    pr = sub.add_parser("paired")
    pr.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    pr.set_defaults(handler=paired)
    r = sub.add_parser("repair")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--samples", type=int, nargs="+", default=[128, 512])
    r.set_defaults(handler=repair)
    v = sub.add_parser("variant")
    v.add_argument("name", help="the variant's name in results/budget/variants.json")
    v.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    v.add_argument("--sparsity", type=float, default=0.2, help="the target (name the variant after it)")
    v.set_defaults(flags=[])  # what follows "--": the bonsai prune flags that differ
    v.set_defaults(handler=variant)
    o = sub.add_parser("overhead")
    o.add_argument("--repeats", type=int, default=5)
    o.add_argument("--code", default=None, help="a folder holding another version's bonsai package")
    o.set_defaults(handler=overhead)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.flags = argv[split + 1 :]
    args.handler(args)


if __name__ == "__main__":
    main()
