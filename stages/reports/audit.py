"""What happened in a run, iteration by iteration, from its Parquet tables and manifests.

Read-only: nothing is loaded but tables.  Two tables (``iterations``: one row per
iteration; ``layers``: heads and channels left per layer after each iteration) and two
plots (heads and channels per layer against the parent, like the paper's Figure 4; and
sparsity with calibration perplexity over iterations).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl

from bonsai.artifacts import RunDir
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.units import CHANNEL, HEAD
from bonsai.stages.reports.render import pyplot, save

LAYERS_PLOT = "layers.png"
PROGRESS_PLOT = "progress.png"
ADAPTATION_PLOT = "adaptation.png"
SCALES_PLOT = "scales.png"
REPAIRS_PLOT = "repairs.png"
CONVERGENCE_PLOT = "convergence.png"


def _current(run: Path, files) -> list[Path]:
    """Of artifact files (RUN/stage/key/name), those of the finished run: a run resumed after a
    stage's version changed also holds the earlier version's work."""
    current = _current_keys(run)
    return [f for f in files if current is None or (f.parent.parent.name, f.parent.name) in current]


def _current_keys(run: Path) -> set[tuple[str, str]] | None:
    """(stage, key) of the artifacts the result rests on, and of adaptive sampling's settle
    decisions, which the result does not read: those made by this version of the stage that rest
    only on the result's artifacts and on their own round's importance fit (an earlier round's
    fit, itself not among the result's: it is a stepping stone, not returned).  None until the
    run has finished."""
    from bonsai.stages import importance, settle

    lineage = RunDir(run).lineage()
    if lineage is None:
        return None
    versions = {"importance": importance.VERSION, "settle": settle.VERSION}
    aside = {}
    for stage, version in versions.items():
        for manifest in run.glob(f"{stage}/*/manifest.json"):
            info = json.loads(manifest.read_text())
            if (stage, manifest.parent.name) not in lineage and info.get("version") == version:
                aside[(stage, manifest.parent.name)] = [(i["stage"], i["key"]) for i in info["inputs"]]
    current, grew = set(lineage), True
    while grew:  # a settle artifact rests on its round's importance and on the round before it
        found = {k for k, inputs in aside.items() if k not in current and all(i in current for i in inputs)}
        current |= found
        grew = bool(found)
    return set(lineage) | {k for k in current if k[0] == "settle"}


def _glob(run: Path, pattern: str) -> pl.DataFrame | None:
    files = _current(run, sorted(run.glob(pattern)))
    return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed") if files else None


def iteration_table(run: Path) -> pl.DataFrame:
    selected = _glob(run, "select/*/iteration.parquet")
    if selected is None:
        raise UserError(f"{run}: no iteration has finished yet (see `bonsai status {run}`)")
    table = selected.select(
        "iteration",
        "target_sparsity",
        "sparsity",
        "total_sparsity",
        "heads_left",
        "channels_left",
        "candidates",
        "removed_heads",
        "removed_channels",
        *[c for c in ("prior_only_jaccard",) if c in selected.columns],
    ).sort("iteration")
    utilities = _glob(run, "evaluate/*/utilities.parquet")
    if utilities is not None:
        spread = utilities.group_by("iteration").agg(
            pl.len().alias("sub_models"),
            (~pl.col("finite")).sum().alias("non_finite"),
            pl.col("utility").filter(pl.col("finite")).mean().alias("utility_mean"),
            pl.col("utility").filter(pl.col("finite")).std().alias("utility_std"),
            pl.col("utility").filter(pl.col("finite")).min().alias("utility_min"),
            pl.col("utility").filter(pl.col("finite")).max().alias("utility_max"),
        )
        table = table.join(spread.with_columns(pl.col("iteration").cast(pl.Int64)), on="iteration", how="left")
    fits = _glob(run, "importance/*/fit.parquet")
    if fits is not None:
        wanted = (
            "iteration",
            "estimator",
            "alpha",
            "cv_kendall_tau",
            "cv_r2_head",
            "cv_r2_channel",
            "nonzero_corrections_head",
            "nonzero_corrections_channel",
        )
        table = table.join(
            fits.select(c for c in wanted if c in fits.columns).with_columns(pl.col("iteration").cast(pl.Int64)),
            on="iteration",
            how="left",
        )
    rounds = _glob(run, "settle/*/convergence.parquet")
    if rounds is not None:
        settled = rounds.group_by("iteration").agg(
            pl.len().alias("rounds"),
            *(
                pl.col(c).sort_by("round").last().alias(c)
                for c in ("bootstrap_change", "bootstrap_regret")
                if c in rounds.columns  # runs made before the regret have no such column
            ),
        )
        table = table.join(settled.with_columns(pl.col("iteration").cast(pl.Int64)), on="iteration", how="left")
    repairs = _glob(run, "reconstruct/*/repair.parquet")
    if repairs is not None:
        summary = repairs.group_by("iteration").agg(
            pl.col("applied").sum().alias("repaired"),
            pl.col("error_before").mean().alias("repair_error_before"),
            pl.when(pl.col("applied"))
            .then(pl.col("error_after"))
            .otherwise(pl.col("error_before"))
            .mean()
            .alias("repair_error_after"),
        )
        table = table.join(summary.with_columns(pl.col("iteration").cast(pl.Int64)), on="iteration", how="left")
    priors = [json.loads(f.read_text()) for f in _current(run, sorted(run.glob("priors/*/manifest.json")))]
    baselines = {m["config"]["iteration"]: m["info"].get("baseline_nll") for m in priors}
    return table.with_columns(
        pl.col("iteration")
        .map_elements(
            lambda it: math.exp(baselines[it]) if baselines.get(it) is not None else None, return_dtype=pl.Float64
        )
        .alias("calibration_perplexity")
    )


def layer_table(run: Path) -> pl.DataFrame:
    """Per iteration (-1: the parent) and layer: KV groups, query heads and channels left."""
    keep = _glob(run, "select/*/keep.parquet")
    if keep is None:
        raise UserError(f"{run}: no iteration has finished yet")
    per_group = _query_heads_per_group(run)
    parent = keep.filter(pl.col("iteration") == keep["iteration"].min()).with_columns(
        pl.lit(True).alias("kept"), pl.lit(-1, keep.schema["iteration"]).alias("iteration")
    )
    rows = (
        pl.concat([parent, keep])
        .group_by("iteration", "layer")
        .agg(
            (pl.col("kept") & (pl.col("kind") == HEAD)).sum().alias("kv_groups"),
            (pl.col("kept") & (pl.col("kind") != HEAD)).sum().alias("channels"),
        )
    )
    return rows.with_columns((pl.col("kv_groups") * per_group).alias("heads")).sort("iteration", "layer")


def _query_heads_per_group(run: Path) -> int:
    parent = (RunDir(run).recorded() or {}).get("described", {}).get("model")
    try:
        config = json.loads((Path(parent) / "config.json").read_text())
        return config["num_attention_heads"] // config.get("num_key_value_heads", config["num_attention_heads"])
    except (TypeError, OSError, ValueError, KeyError):
        return 1


def plot_layers(layers: pl.DataFrame, path: Path) -> None:
    plt = pyplot()
    parent = layers.filter(pl.col("iteration") == -1).sort("layer")
    final = layers.filter(pl.col("iteration") == layers["iteration"].max()).sort("layer")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, column, title in zip(axes, ("heads", "channels"), ("attention heads", "MLP channels")):
        ax.bar(parent["layer"], parent[column], color="lightgray", label="parent")
        ax.bar(final["layer"], final[column], color="tab:green", label="pruned")
        ax.set_xlabel("layer")
        ax.set_xticks(parent["layer"].to_list())
        ax.set_title(f"{title} left per layer")
    axes[0].legend()
    save(fig, path)


def plot_progress(iterations: pl.DataFrame, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    ax.plot(iterations["iteration"], iterations["sparsity"], marker="o", color="tab:green")
    ax.set_xlabel("iteration")
    ax.set_xticks(iterations["iteration"].to_list())
    ax.set_ylabel("attention+MLP sparsity", color="tab:green")
    right = ax.twinx()
    right.plot(iterations["iteration"], iterations["calibration_perplexity"], marker="s", color="tab:blue")
    right.set_yscale("log")
    right.set_ylabel("calibration perplexity at start (log)", color="tab:blue")
    save(fig, path)


def plot_scales(scales: pl.DataFrame, path: Path) -> None:
    """The regression's measured scale of each group's prior, per layer, one line per iteration:
    where keeping a layer's candidate heads or channels is worth more (or nothing)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    colors = plt.get_cmap("viridis")
    iterations = sorted(scales["iteration"].unique().to_list())
    for ax, kind, title in zip(axes, (HEAD, CHANNEL), ("heads (KV groups)", "MLP channels")):
        pooled = scales.filter((pl.col("kind") == kind) & pl.col("layer").is_null()).sort("iteration")
        if pooled.height:  # one scale across layers (too few candidates per layer): one point per iteration
            ax.plot(pooled["iteration"], pooled["scale"], marker="o", color="tab:green")
            ax.axhline(0.0, color="black", linewidth=0.6)
            ax.set_xticks(iterations)
            ax.set_xlabel("iteration")
            ax.set_title(f"{title}: one scale across layers")
            continue
        for i, iteration in enumerate(iterations):
            part = scales.filter((pl.col("kind") == kind) & (pl.col("iteration") == iteration)).sort("layer")
            color = colors(i / max(1, len(iterations) - 1))
            ax.plot(part["layer"], part["scale"], marker="o", markersize=3, color=color, label=f"iteration {iteration}")
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xticks(_layer_ticks(int(scales["layer"].max() or 0) + 1))
        ax.set_xlabel("layer")
        ax.set_title(f"{title}: utility of keeping the candidates")
    axes[0].set_ylabel("scale (nats)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
            break
    save(fig, path)


def _layer_ticks(layers: int) -> list[int]:
    return list(range(0, layers, 1 if layers <= 16 else 5 if layers <= 80 else 10))


def plot_convergence(rounds: pl.DataFrame, path: Path) -> None:
    """Per iteration and round of adaptive sampling.  Left: the fraction of the removal (in
    parameters) that changed since the round before (solid) and that a resample of the
    sub-models would change (dashed).  Right: the mean regret of the removal under resampling
    (nats per token, log scale), open markers where the fit predicted nothing yet; an iteration
    stops at the round where either measure met its threshold on a fit that predicts."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    colors = plt.get_cmap("viridis")
    iterations = sorted(rounds["iteration"].unique().to_list())
    for i, iteration in enumerate(iterations):
        part = rounds.filter(pl.col("iteration") == iteration).sort("round")
        color = colors(i / max(1, len(iterations) - 1))
        left.plot(
            part["sub_models"], part["change_since_last_round"], marker="o", color=color, label=f"iteration {iteration}"
        )
        left.plot(part["sub_models"], part["bootstrap_change"], linestyle="--", color=color)
        if "informative" in part.columns:  # runs made before the regret have neither column
            # a regret of exactly 0 (every resample agrees) is drawn at the axis' floor; an open
            # marker: a round whose fit predicted held-out pairs no better than their mean
            regret = part["bootstrap_regret"].clip(1e-7)
            right.plot(part["sub_models"], regret, color=color)
            measured = part["informative"].to_numpy()
            right.scatter(part["sub_models"].to_numpy()[measured], regret.to_numpy()[measured], color=color)
            right.scatter(
                part["sub_models"].to_numpy()[~measured], regret.to_numpy()[~measured], facecolors="none", color=color
            )
    left.set_xlabel("sub-models evaluated")
    left.set_ylabel("fraction of the removal that changes")
    left.set_title("solid: since the last round; dashed: under resampling", fontsize=9)
    left.legend(fontsize=7)
    right.set_yscale("log")
    right.set_xlabel("sub-models evaluated")
    right.set_ylabel("regret under resampling (nats/token)")
    right.set_title("what the removal loses against each resample's best", fontsize=9)
    save(fig, path)


def repair_table(run: Path) -> pl.DataFrame | None:
    """Per iteration, layer and projection that lost units: relative held-out output error of
    plain removal and after the least-squares repair, and whether the repair was applied."""
    table = _glob(run, "reconstruct/*/repair.parquet")
    return table.sort("iteration", "layer", "projection") if table is not None else None


def plot_repairs(repairs: pl.DataFrame, path: Path) -> None:
    """Error after / error before the repair, per layer (x) and iteration (y), one panel per
    projection: below 1 the repair helped; 1 where it was not applied; blank where the
    iteration removed nothing from that projection."""
    plt = pyplot()
    layers = int(repairs["layer"].max()) + 1
    iterations = sorted(repairs["iteration"].unique().to_list())
    fig, axes = plt.subplots(1, 2, figsize=(11, 1.8 + 0.3 * len(iterations)), squeeze=False, layout="constrained")
    for ax, projection in zip(axes[0], ("attention_out", "mlp_out")):
        grid = [[float("nan")] * layers for _ in iterations]
        for row in repairs.filter(pl.col("projection") == projection).iter_rows(named=True):
            before = row["error_before"]
            ratio = row["error_after"] / before if row["applied"] and before else 1.0
            grid[iterations.index(row["iteration"])][row["layer"]] = ratio
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, origin="lower")
        ax.set_yticks(range(len(iterations)), [str(i) for i in iterations])
        ax.set_xticks(_layer_ticks(layers))
        ax.set_xlabel("layer")
        ax.set_ylabel("iteration")
        ax.set_title(f"{projection}: error after / before repair")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_adaptation(history: pl.DataFrame, path: Path) -> None:
    """Task and distillation loss over the steps of the run's most recent adaptation."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    ax.plot(history["step"], history["task"], label="task cross-entropy", color="tab:green")
    if (history["distill"] > 0).any():
        right = ax.twinx()
        right.plot(history["step"], history["distill"], label="KL to teacher", color="tab:blue", alpha=0.7)
        right.set_ylabel("KL(student || teacher)", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("task loss (nats)", color="tab:green")
    save(fig, path)


def audit(run_dir: str, out: str | None = None) -> dict:
    run = Path(run_dir)
    if RunDir(run).recorded() is None:
        raise UserError(f"{run_dir}: not a bonsai run directory (no run.json)")
    iterations, layers = iteration_table(run), layer_table(run)
    where = Path(out) if out else run / "audit"
    where.mkdir(parents=True, exist_ok=True)
    plot_layers(layers, where / LAYERS_PLOT)
    plot_progress(iterations, where / PROGRESS_PLOT)
    plots = [str(where / LAYERS_PLOT), str(where / PROGRESS_PLOT)]
    scales = _glob(run, "importance/*/scales.parquet")
    if scales is not None:
        plot_scales(scales, where / SCALES_PLOT)
        plots.append(str(where / SCALES_PLOT))
    rounds = _glob(run, "settle/*/convergence.parquet")
    if rounds is not None:
        plot_convergence(rounds, where / CONVERGENCE_PLOT)
        plots.append(str(where / CONVERGENCE_PLOT))
    repairs = repair_table(run)
    if repairs is not None:
        plot_repairs(repairs, where / REPAIRS_PLOT)
        plots.append(str(where / REPAIRS_PLOT))
    histories = sorted(run.glob("adapt/*/training.parquet"), key=lambda p: p.stat().st_mtime)
    if histories:
        plot_adaptation(pl.read_parquet(histories[-1]), where / ADAPTATION_PLOT)
        plots.append(str(where / ADAPTATION_PLOT))
    return {"iterations": iterations, "layers": layers, "repairs": repairs, "plots": plots}
