"""Would another per-layer allocation of the last removal beat both candidates the judge saw?

    python benchmarks/allocation.py [--runs variant-final-damping-s30] [--seeds 0 1 2]
        [--blends flap:0.5 uniform:0.5]

Issue 23's item 4 asks for a per-layer sparsity refinement scored on the pruned model's
logits.  The arbitrate stage already scores two removals that way each iteration: the
estimator's (its per-layer counts, FLAP's units within a layer) and FLAP's (FLAP's counts and
units).  This screen asks, before any such search is built, whether allocations between or
beside those two score better, on the last iteration of finished ``budget.py variant`` runs:

- ``flap:A``: each (layer, kind) loses A x the estimator's count + (1 - A) x FLAP's;
- ``uniform:B``: the MLP channels' counts pulled toward the same count in every layer,
  B x the estimator's + (1 - B) x its mean over layers, heads as the estimator removed them;
- ``heads:H``: H x the estimator's count of heads in each layer, the budget's rest taken by
  channels in proportion to the estimator's channel counts.

The fractional counts are met under the same parameter budget by taking, in every layer, its
units in FLAP's order, the j-th at priority (j + 1/2) / count, lowest first.  Each allocation
is repaired with the kept candidate's repair config and scored on the windows the judge
scored (``judge_nll``, what the stage would compare) and on the held-out documentation
(budget.py's protocol); the two candidates are scored the same way.  Rows go to
results/allocation/rows.json (a row already there is not made again), the repairs to a store
of their own; every row of the runs asked for is printed as a table and plotted
(``kept``: the candidate the judge kept).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import common
import judge
import polars as pl
import real_model
import torch

from bonsai.artifacts import RunDir, Store
from bonsai.stages import priors as priors_stage
from bonsai.stages import reconstruct
from bonsai.stages.arbitrate import ArbitrateConfig, judged_windows
from bonsai.stages.core.model_io import PrunedModel
from bonsai.stages.core.nll import mean_nll
from bonsai.stages.core.plan import cumulative_target
from bonsai.stages.core.units import CHANNEL, KEEP_FILE
from bonsai.stages.reports.render import pyplot, save
from bonsai.stages.select import REMOVED

RUNS = common.RESULTS / "budget"
OUT = common.RESULTS / "allocation"
KEY = ["layer", "kind", "unit"]


def last_arbitration(run: Path) -> tuple[RunDir, dict]:
    runs = RunDir(run)
    manifests = [json.loads(p.read_text()) for p in run.glob("arbitrate/*/manifest.json")]
    return runs, max(manifests, key=lambda m: m["config"]["iteration"])


def targets(family: str, weight: float, counts: list[pl.DataFrame]) -> pl.DataFrame:
    """(layer, kind, target): the fractional count of units each (layer, kind) loses."""
    estimator, rival = counts
    if family == "flap":
        both = estimator.join(rival, on=["layer", "kind"], suffix="_rival")
        blended = weight * pl.col("count") + (1 - weight) * pl.col("count_rival")
        return both.select("layer", "kind", blended.cast(pl.Float64).alias("target"))
    if family == "uniform":
        mean = pl.col("count").mean().over("kind")
        pulled = pl.when(pl.col("kind") == CHANNEL).then(weight * pl.col("count") + (1 - weight) * mean)
        return estimator.select("layer", "kind", pulled.otherwise(pl.col("count")).cast(pl.Float64).alias("target"))
    if family == "heads":
        scaled = pl.when(pl.col("kind") == CHANNEL).then(pl.col("count")).otherwise(weight * pl.col("count"))
        return estimator.select("layer", "kind", scaled.cast(pl.Float64).alias("target"))
    raise SystemExit(f"unknown blend family {family!r}: flap, uniform or heads")


def allocate(keep: pl.DataFrame, flap: pl.DataFrame, target: pl.DataFrame, budget: float) -> pl.DataFrame:
    """The units removed: each (layer, kind)'s present units in FLAP's order, the j-th at
    priority (j + 1/2) / target, taken lowest first until ``budget`` parameters are gone."""
    removed = int(keep.filter(~pl.col("kept"))["params"].sum())
    ranked = (
        keep.filter(pl.col("kept"))
        .join(flap.select(*KEY, "flap"), on=KEY, how="left")
        .sort("layer", "kind", "flap", "unit", nulls_last=True)
        .with_columns(pl.int_range(pl.len()).over("layer", "kind").alias("slot"))
        .join(target.filter(pl.col("target") > 0), on=["layer", "kind"])
        .with_columns(((pl.col("slot") + 0.5) / pl.col("target")).alias("priority"))
        .sort("priority", "layer", "kind", "unit")
    )
    taken = 0
    for value in ranked["params"]:
        if removed >= budget:
            break
        removed += int(value)
        taken += 1
    return ranked.head(taken).select(*KEY, "params")


def blended_select(store: Store, pairs, flap_priors, iteration: int, family: str, weight: float, cfg: dict):
    """A select artifact (keep-state and removal) of the blended allocation."""
    selects = [chosen for chosen, _ in pairs]
    after = pl.read_parquet(selects[0].file(KEEP_FILE))
    keep = after.drop("iteration").with_columns(
        (pl.col("kept") | (pl.col("removed_iteration") == iteration)).alias("kept"),
        pl.when(pl.col("removed_iteration") == iteration)
        .then(None)
        .otherwise(pl.col("removed_iteration"))
        .alias("removed_iteration"),
    )
    groups = keep.select("layer", "kind").unique()
    counts = [
        groups.join(
            pl.read_parquet(s.file(REMOVED)).group_by("layer", "kind").agg(pl.len().alias("count")),
            on=["layer", "kind"],
            how="left",
        ).fill_null(0)
        for s in selects
    ]
    budget = cumulative_target(cfg["sparsity"], cfg["prune_frac"], iteration) * int(keep["params"].sum())
    flap = priors_stage.read(flap_priors)

    def build(out: Path) -> dict:
        removal = allocate(keep, flap, targets(family, weight, counts), budget)
        gone = removal.select(KEY).with_columns(pl.lit(True).alias("gone"))
        state = keep.join(gone, on=KEY, how="left").with_columns(
            pl.when(pl.col("gone")).then(False).otherwise(pl.col("kept")).alias("kept"),
            pl.when(pl.col("gone"))
            .then(pl.lit(iteration, pl.Int32))
            .otherwise(pl.col("removed_iteration"))
            .alias("removed_iteration"),
        )
        state = state.drop("gone").sort(KEY).select(after.drop("iteration").columns)
        state.insert_column(0, pl.lit(iteration, pl.Int32).alias("iteration")).write_parquet(out / KEEP_FILE)
        removal.write_parquet(out / REMOVED)
        channels = int((removal["kind"] == CHANNEL).sum())
        return {"removed_heads": removal.height - channels, "removed_channels": channels}

    config = {"family": family, "weight": weight, "iteration": iteration}
    return store.produce("select", "blend-1", config, [*selects, flap_priors], build)


def score(model: PrunedModel, windows: torch.Tensor, dtype: str, batch: int) -> float:
    loaded, _, device = model.load(dtype, "cpu")
    return mean_nll(loaded, windows, batch, device)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["variant-final-damping-s30"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--blends", nargs="*", default=["flap:0.5", "uniform:0.5"])
    args = parser.parse_args()
    common.setup_logging()
    docs = real_model.Scorer("docs").windows
    rows_file = OUT / "rows.json"
    rows = json.loads(rows_file.read_text()) if rows_file.is_file() else []
    done = {(r["run"], r["seed"], r["allocation"]) for r in rows}
    winners = {}  # (run, seed): the candidate the judge kept
    for name in args.runs:
        for seed in args.seeds:
            run = RUNS / f"{name}-seed{seed}"
            runs, manifest = last_arbitration(run)
            winners[(name, seed)] = manifest["info"]["kept"]
            arb = ArbitrateConfig(**{**manifest["config"], "rankings": tuple(manifest["config"]["rankings"])})
            before, calibration, pairs = judge.candidates(runs, manifest)
            held = judged_windows(calibration, arb)
            repair_manifest = pairs[0][1].manifest()
            repair_cfg = reconstruct.ReconstructConfig(**{"final_damping": None, **repair_manifest["config"]})
            flap_priors = runs.store.lookup(**_input(pairs[1][0], 0))
            store = Store(OUT / run.name)
            options = runs.recorded()["identity"]["config"]
            candidates = {f"{r}": pair for r, pair in zip(arb.rankings, pairs, strict=True)}
            for blend in args.blends:
                family, weight = blend.split(":")
                chosen = blended_select(store, pairs, flap_priors, arb.iteration, family, float(weight), options)
                candidates[blend] = (chosen, reconstruct.run(before, calibration, chosen, repair_cfg, store))
            for allocation, (chosen, repaired) in candidates.items():
                if (name, seed, allocation) in done:
                    continue
                model = before.then(chosen, repaired)
                info = chosen.info()
                rows.append(
                    {
                        "run": name,
                        "seed": seed,
                        "allocation": allocation,
                        "removed_heads": info["removed_heads"],
                        "removed_channels": info["removed_channels"],
                        "judge_nll": score(model, held, arb.dtype, arb.batch_size),
                        "perplexity": math.exp(score(model, docs, "float32", 16)),
                    }
                )
                rows_file.write_text(json.dumps(rows, indent=1))
                print(rows[-1], flush=True)
    kept = pl.DataFrame([{"run": r, "seed": s, "allocation": a} for (r, s), a in winners.items()])
    frame = pl.DataFrame(rows).join(kept.select("run", "seed"), on=["run", "seed"])  # the runs asked for
    frame = frame.join(kept.with_columns(kept=True), on=["run", "seed", "allocation"], how="left")
    frame = frame.with_columns(pl.col("kept").fill_null(False))
    print(common.markdown(frame.columns, frame.rows()))
    plot(frame, common.PLOTS / "allocation.png")


def _input(artifact, index: int) -> dict:
    inputs = artifact.manifest()["inputs"]
    return {"stage": inputs[index]["stage"], "key": inputs[index]["key"]}


def plot(frame: pl.DataFrame, path: Path) -> None:
    """One panel per run: each allocation's held-out perplexity (left) and judged loss (right)
    against the judge's winner of the same seed, one marker per seed."""
    plt = pyplot()
    names = frame["run"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 3.6 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        part = frame.filter(pl.col("run") == name)
        kept = part.filter(pl.col("kept")).select(
            "seed", pl.col("perplexity").alias("p0"), pl.col("judge_nll").alias("j0")
        )
        part = part.join(kept, on="seed").filter(~pl.col("kept"))
        labels = part["allocation"].unique(maintain_order=True).to_list()
        for ax, column, base, title in (
            (row[0], "perplexity", "p0", "held-out perplexity"),
            (row[1], "judge_nll", "j0", "judged loss (nats)"),
        ):
            for (seed,), runs in part.group_by("seed", maintain_order=True):
                xs = [labels.index(a) for a in runs["allocation"]]
                ax.scatter(xs, runs[column] - runs[base], label=f"seed {seed}")
            ax.axhline(0.0, color="grey", linewidth=0.8)
            ax.set_yscale("symlog", linthresh=0.1 if column == "perplexity" else 0.005)
            ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=20)
            ax.set_ylabel(f"{title}\nminus the judge's winner's", fontsize=8)
            ax.set_title(name, fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle("SmolLM2: the last removal under other per-layer allocations (above 0: worse)")
    save(fig, path)


if __name__ == "__main__":
    main()
