"""Plain-text tables for the terminal."""

from __future__ import annotations

from bonsai.stages.reports.render import cell, frame_markdown


def table(headers: list[str], rows: list[list[object]]) -> str:
    """Numbers right-aligned, text left-aligned."""
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


def iteration_table(summary: dict) -> str:
    """One row per iteration of a prune summary; "like prior-only" is the overlap (Jaccard) of
    the iteration's removals with what the prior alone would have removed."""
    rows = summary["iterations"]
    columns = [
        ("iteration", "iteration"),
        ("sparsity", "sparsity"),
        ("total_sparsity", "of all params"),
        ("heads_left", "heads left"),
        ("channels_left", "channels left"),
        ("sub_models", "sub-models"),
        ("prior_only_jaccard", "like prior-only"),
        ("cv_kendall_tau", "CV tau"),
        ("model_params", "parameters"),
    ]
    shown = [(key, name) for key, name in columns if any(r.get(key) is not None for r in rows)]
    body = [[r.get(key) for key, _ in shown] for r in rows]
    return table([name for _, name in shown], body) + f"\n\npruned model: {summary['model']}"


def audit_markdown(result: dict) -> str:
    import polars as pl

    iterations = result["iterations"]
    wanted = [
        c
        for c in (
            "iteration",
            "sparsity",
            "total_sparsity",
            "sub_models",
            "non_finite",
            "cv_kendall_tau",
            "cv_r2_head",
            "cv_r2_channel",
            "prior_only_jaccard",
            "reordered",
            "wanda_jaccard",
            "predicted_error_spearman",
            "repaired",
            "repair_error_before",
            "repair_error_after",
            "utility_std",
            "utility_min",
            "utility_max",
            "calibration_perplexity",
            "heads_left",
            "channels_left",
        )
        if c in iterations.columns
    ]
    layers = result["layers"]
    last = layers["iteration"].max()
    per_layer = (
        layers.filter(pl.col("iteration") == -1)
        .select("layer", pl.col("heads").alias("heads_parent"), pl.col("channels").alias("channels_parent"))
        .join(layers.filter(pl.col("iteration") == last).select("layer", "heads", "channels"), on="layer")
        .sort("layer")
    )
    plots = "\n".join(f"![{p.rsplit('/', 1)[-1]}]({p})" for p in result["plots"])
    return "\n\n".join(
        [
            "# Audit",
            "## Iterations",
            frame_markdown(iterations.select(wanted)),
            "## Layers after the last iteration",
            frame_markdown(per_layer),
            *repairs_markdown(result.get("repairs")),
            "## Plots",
            plots,
        ]
    )


def repairs_markdown(repairs) -> list[str]:
    """The repair of the last iteration, per layer and projection (all iterations: --format json)."""
    if repairs is None:
        return []
    last = repairs.filter(repairs["iteration"] == repairs["iteration"].max())
    columns = ["layer", "projection", "inputs", "kept", "error_before", "error_after", "applied"]
    return [
        "## Repair of the last iteration (relative output error on held-out windows)",
        frame_markdown(last.select(columns)),
    ]
