"""The evaluation's outputs: one long table (results.parquet / results.json), a markdown
report, and a plot of the pruned model's speed relative to its parent."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from bonsai.artifacts import write_text_atomic
from bonsai.stages.reports.render import frame_markdown, pyplot, save

RESULTS = "results.parquet"
RESULTS_JSON = "results.json"
REPORT = "report.md"
SPEED_PLOT = "speed.png"
SCHEMA = {
    "model": pl.Utf8,
    "kind": pl.Utf8,
    "name": pl.Utf8,
    "value": pl.Float64,
    "stderr": pl.Float64,
    "unit": pl.Utf8,
}


def results_table(
    perplexity: dict[str, dict], harness: dict[str, pl.DataFrame], speed: dict[str, list[dict]]
) -> pl.DataFrame:
    rows = []
    for model, ppl in perplexity.items():
        rows.append(
            {
                "model": model,
                "kind": "perplexity",
                "name": ppl["data"],
                "value": ppl["perplexity"],
                "stderr": None,
                "unit": "perplexity",
            }
        )
    for model, table in harness.items():
        for r in table.iter_rows(named=True):
            rows.append(
                {
                    "model": model,
                    "kind": "task",
                    "name": f"{r['task']}/{r['metric']}/{r['filter']}",
                    "value": r["value"],
                    "stderr": r["stderr"],
                    "unit": r["metric"],
                }
            )
    for model, measured in speed.items():
        for r in measured:
            shape = f" b{r['batch']} x {r['tokens']}" if r["batch"] is not None else ""
            rows.append(
                {
                    "model": model,
                    "kind": "speed",
                    "name": r["metric"] + shape,
                    "value": r["value"],
                    "stderr": None,
                    "unit": r["unit"],
                }
            )
    return pl.DataFrame(rows, schema=SCHEMA)


def speed_ratios(results: pl.DataFrame, reference: str = "parent") -> pl.DataFrame:
    """Per model and speed measurement: value relative to the parent, oriented so that
    above 1 means faster (prefill tokens/s divided, decode ms/token inverted)."""
    speed = results.filter(pl.col("kind") == "speed", pl.col("name") != "parameters")
    base = speed.filter(pl.col("model") == reference).select("name", pl.col("value").alias("reference"))
    return (
        speed.filter(pl.col("model") != reference)
        .join(base, on="name")
        .with_columns(
            pl.when(pl.col("unit") == "ms/token")
            .then(pl.col("reference") / pl.col("value"))
            .when(pl.col("unit") == "MiB")
            .then(pl.col("value") / pl.col("reference"))
            .otherwise(pl.col("value") / pl.col("reference"))
            .alias("ratio")
        )
        .select("model", "name", "unit", "value", "reference", "ratio")
    )


def plot_speed(ratios: pl.DataFrame, path: Path) -> bool:
    rows = ratios.filter(pl.col("unit") != "MiB")
    if rows.height == 0:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    models = rows["model"].unique(maintain_order=True).to_list()
    names = rows["name"].unique(maintain_order=True).to_list()
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        part = rows.filter(pl.col("model") == model)
        values = [part.filter(pl.col("name") == n)["ratio"].item() if n in part["name"].to_list() else 0 for n in names]
        ax.bar([x + i * width for x in range(len(names))], values, width, label=model)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(names))], names, rotation=20, ha="right")
    ax.set_ylabel("speed-up over parent (x)")
    ax.legend()
    save(fig, path)
    return True


def write(out: Path, results: pl.DataFrame, protocols: dict[str, str], engine: str = "torch") -> str:
    """Write results.parquet/json, speed.png and report.md into ``out``; return the markdown.
    ``engine``: what the speed section timed."""
    out.mkdir(parents=True, exist_ok=True)
    results.write_parquet(out / RESULTS)
    write_text_atomic(out / RESULTS_JSON, json.dumps(results.to_dicts(), indent=1))
    parts = ["# Evaluation", ""]
    ppl = results.filter(pl.col("kind") == "perplexity")
    if ppl.height:
        parts += ["## Perplexity", "", frame_markdown(ppl.select("model", "name", "value")), ""]
        parts += [f"Protocol: {p}" for p in dict.fromkeys(protocols.values())] + [""]
    tasks = results.filter(pl.col("kind") == "task")
    if tasks.height:
        parts += ["## Harness tasks", "", frame_markdown(tasks.select("model", "name", "value", "stderr")), ""]
    speed = results.filter(pl.col("kind") == "speed")
    if speed.height:
        parts += [
            f"## Speed and size ({engine})",
            "",
            frame_markdown(speed.select("model", "name", "value", "unit")),
            "",
        ]
        ratios = speed_ratios(results)
        if ratios.height:
            parts += [
                "Relative to the parent (above 1 is faster; weights: fraction of the parent's size):",
                "",
                frame_markdown(ratios.select("model", "name", "ratio")),
                "",
            ]
            if plot_speed(ratios, out / SPEED_PLOT):
                parts += [f"![speed-up over the parent]({SPEED_PLOT})", ""]
    markdown = "\n".join(parts)
    write_text_atomic(out / REPORT, markdown)
    return markdown
