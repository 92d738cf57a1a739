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
REPAIR_AWARE_PLOT = "repair-aware.png"
PROJECTION = {HEAD: "attention_out", CHANNEL: "mlp_out"}  # the repair's name for a kind's output projection


def _current(run: Path, files) -> list[Path]:
    """Of artifact files (RUN/stage/key/name), those of the finished run: a run resumed after a
    stage's version changed also holds the earlier version's work."""
    current = _current_keys(run)
    return [f for f in files if current is None or (f.parent.parent.name, f.parent.name) in current]


def _current_keys(run: Path) -> set[tuple[str, str]] | None:
    """(stage, key) of the artifacts the result rests on; None until the run has finished.  The
    iterations' repairs are what the audit shows: where the published model was repaired once
    from the parent (--reconstruct-publish parent), the last iteration's own repair stands in
    for that one, which the result rests on instead (summary.json names it)."""
    keys = RunDir(run).lineage()
    if keys is None:
        return None
    repairs = {p.parent.name: json.loads(p.read_text()) for p in run.glob("reconstruct/*/manifest.json")}
    for key in [k for stage, k in keys if stage == "reconstruct" and _published_from_parent(repairs[k])]:
        final = repairs[key]["inputs"][2]["key"]  # the last iteration's selection
        chain = {
            ("reconstruct", k)
            for k, m in repairs.items()
            if m["inputs"][2]["key"] == final and not _published_from_parent(m)
        }
        if chain:  # under lsq-final the published repair is the only one
            keys = (keys - {("reconstruct", key)}) | chain
    return keys


def _published_from_parent(manifest: dict) -> bool:
    """A repair of the parent (no earlier selection or repair among its inputs) for a later
    iteration's selection: the published model's under --reconstruct-publish parent."""
    return manifest["config"]["iteration"] > 0 and len(manifest["inputs"]) == 3


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
        *[c for c in ("prior_only_jaccard", "reordered") if c in selected.columns],
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
    arbitrated = sorted(run.glob("arbitrate/*/arbitrate.parquet"))  # --rival: not in the result's lineage
    if arbitrated:
        kept = pl.concat([pl.read_parquet(f) for f in arbitrated]).filter(pl.col("kept"))
        kept = kept.select(pl.col("iteration").cast(pl.Int64), pl.col("ranking").alias("kept_ranking"))
        table = table.join(kept.unique("iteration", keep="last"), on="iteration", how="left")
    shift = removal_shift_table(run)
    if shift is not None:
        table = table.join(_shift_summary(shift), on="iteration", how="left")
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


def removal_shift_table(run: Path) -> pl.DataFrame | None:
    """Per iteration, layer and kind that lost units: how far the removal moved from Wanda's
    order (the same count removed from the group, lowest Wanda first; Jaccard 1: the same
    units), and, for the repair-aware prior (``--prior obs``), the error its saliencies
    predicted (their sum over the removed units) beside the repair's measured relative error
    of that projection after the refit."""
    removed, priors = _glob(run, "select/*/removed.parquet"), _glob(run, "priors/*/priors.parquet")
    if removed is None or priors is None:
        return None
    keys = ["iteration", "layer", "kind"]
    removed = removed.select(*keys, "unit").with_columns(pl.lit(True).alias("removed"))
    priors = priors.select(*keys, "unit", "wanda", "obs").join(removed, on=[*keys, "unit"], how="left")
    priors = priors.with_columns(
        pl.col("removed").fill_null(False),
        pl.col("wanda").rank("ordinal").over(keys).alias("wanda_rank"),
        pl.col("removed").fill_null(False).sum().over(keys).alias("count"),
    )
    by_wanda = pl.col("wanda_rank") <= pl.col("count")
    table = (
        priors.filter(pl.col("count") > 0)
        .group_by(keys)
        .agg(
            pl.col("count").first().alias("removed"),
            (pl.col("removed") & by_wanda).sum().alias("wanda_overlap"),
            (pl.col("removed") | by_wanda).sum().alias("wanda_union"),
            pl.col("obs").filter(pl.col("removed")).sum().alias("predicted_error"),
            pl.col("obs").is_not_null().any().alias("has_obs"),
        )
        .with_columns(
            pl.when(pl.col("has_obs")).then(pl.col("predicted_error")).alias("predicted_error"),
            pl.col("kind").replace_strict(PROJECTION, return_dtype=pl.Utf8).alias("projection"),
        )
        .drop("has_obs")
    )
    repairs = _glob(run, "reconstruct/*/repair.parquet")
    if repairs is not None:
        measured = repairs.select(
            "iteration", "layer", "projection", "error_before", pl.col("error_after").alias("measured_error")
        )
        table = table.join(measured, on=["iteration", "layer", "projection"], how="left")
    return table.sort(keys)


def _shift_summary(shift: pl.DataFrame) -> pl.DataFrame:
    """Per iteration: the removal's Jaccard overlap with Wanda's order (all groups pooled), and
    the rank correlation of predicted with measured post-repair error across layers."""
    aggs = [(pl.col("wanda_overlap").sum() / pl.col("wanda_union").sum()).alias("wanda_jaccard")]
    if "measured_error" in shift.columns and shift["predicted_error"].is_not_null().any():
        aggs.append(pl.corr("predicted_error", "measured_error", method="spearman").alias("predicted_error_spearman"))
    return shift.group_by("iteration").agg(aggs).with_columns(pl.col("iteration").cast(pl.Int64))


def plot_repair_aware(shift: pl.DataFrame, path: Path) -> None:
    """Predicted (the removed units' saliencies) against measured (the repair's relative error
    after the refit), one point per layer and projection, one colour per iteration."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    for ax, projection in zip(axes[0], PROJECTION.values()):
        part = shift.filter((pl.col("projection") == projection) & pl.col("measured_error").is_not_null())
        for it in sorted(part["iteration"].unique().to_list()):
            rows = part.filter(pl.col("iteration") == it)
            ax.scatter(rows["predicted_error"], rows["measured_error"], s=12, label=f"iteration {it}")
        ax.set_xscale("symlog")
        ax.set_xlabel("predicted: sum of the removed units' obs saliency")
        ax.set_ylabel("measured: relative error after the repair")
        ax.set_title(projection)
        if part.height:
            ax.legend(fontsize=7)
    save(fig, path)


def _layer_ticks(layers: int) -> list[int]:
    return list(range(0, layers, 1 if layers <= 16 else 5 if layers <= 80 else 10))


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
    repairs = repair_table(run)
    if repairs is not None:
        plot_repairs(repairs, where / REPAIRS_PLOT)
        plots.append(str(where / REPAIRS_PLOT))
    shift = removal_shift_table(run)
    if shift is not None and "measured_error" in shift.columns and shift["predicted_error"].is_not_null().any():
        plot_repair_aware(shift, where / REPAIR_AWARE_PLOT)
        plots.append(str(where / REPAIR_AWARE_PLOT))
    histories = sorted(run.glob("adapt/*/training.parquet"), key=lambda p: p.stat().st_mtime)
    if histories:
        plot_adaptation(pl.read_parquet(histories[-1]), where / ADAPTATION_PLOT)
        plots.append(str(where / ADAPTATION_PLOT))
    return {"iterations": iterations, "layers": layers, "repairs": repairs, "removal_shift": shift, "plots": plots}
