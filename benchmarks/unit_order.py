"""Which part of FLAP's removal wins under the repair: how many units it takes from each layer,
or which units it takes within a layer?

    python benchmarks/unit_order.py RUN [RUN ...]

For every arbitrate artifact of each finished ``--rival flap --unit-order estimator`` run, two
removals that mix the iteration's two candidates are formed from the same model and budget:
FLAP's count per (layer, kind) with the regression's units (its scored candidates lowest
importance first, then Wanda's order), and the regression's count per (layer, kind) with
FLAP's units (lowest fluctuation first: what ``--unit-order flap`` removes).  Each is repaired
as the run repaired its candidates and scored on the windows the arbitrate stage judged: one
JSON row per iteration beside the stage's two losses.  The mixed removals' artifacts go to a
store of their own (benchmarks/results/unit-order), never into the run's.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import common
import polars as pl
from judge import candidates

from bonsai.artifacts import ArtifactRef, RunDir, Store
from bonsai.stages import importance, reconstruct, select
from bonsai.stages.arbitrate import ArbitrateConfig, judged_windows
from bonsai.stages.core.nll import mean_nll

OUT = common.RESULTS / "unit-order"
KEY = ["layer", "kind", "unit"]


@dataclass(frozen=True, kw_only=True)
class MixConfig:
    iteration: int
    mix: str  # which count and which order


def manifest(ref: ArtifactRef) -> dict:
    return json.loads(ref.file("manifest.json").read_text())


def input_of(runs: RunDir, ref: ArtifactRef, index: int) -> ArtifactRef:
    """The ``index``-th input of ``ref``, from the run's store."""
    given = manifest(ref)["inputs"][index]
    return runs.store.lookup(given["stage"], given["key"])


def take(counts: pl.DataFrame, order: pl.DataFrame) -> pl.DataFrame:
    """``counts`` (layer, kind, n) units of each group, lowest ``key`` of ``order`` first."""
    ranked = order.sort("key", "unit").with_columns(pl.int_range(pl.len()).over("layer", "kind").alias("slot"))
    return ranked.join(counts, on=["layer", "kind"]).filter(pl.col("slot") < pl.col("n")).select(KEY)


def counts(removal: ArtifactRef) -> pl.DataFrame:
    return pl.read_parquet(removal.file(select.REMOVED)).group_by("layer", "kind").agg(pl.len().alias("n"))


def mixes(runs: RunDir, own: ArtifactRef, rival: ArtifactRef) -> dict[str, pl.DataFrame]:
    """The two mixed removals of one iteration, by name."""
    priors = pl.read_parquet(input_of(runs, own, 0).file("priors.parquet"))  # the units present now
    scored = importance.read(input_of(runs, own, 1)).select(*KEY, "importance")
    flap = pl.read_parquet(input_of(runs, rival, 0).file("priors.parquet")).select(*KEY, pl.col("flap").alias("key"))
    # the regression's order: its scored candidates (shifted below every prior), then Wanda's
    regression = priors.select(*KEY, "wanda").join(scored, on=KEY, how="left")
    shifted = pl.when(pl.col("importance").is_not_null()).then(pl.col("importance") - 1e12).otherwise("wanda")
    regression = regression.select(*KEY, shifted.alias("key"))
    return {
        "flap_counts_regression_units": take(counts(rival), regression),
        "regression_counts_flap_units": take(counts(own), flap),
    }


def as_importance(units: pl.DataFrame, present: pl.DataFrame) -> pl.DataFrame:
    """A removal as an importance table for the select stage: its units first, the rest never
    reached within the same budget."""
    table = present.select(*KEY, "params").join(units.with_columns(pl.lit(True).alias("in")), on=KEY, how="left")
    first = pl.when(pl.col("in")).then(-1.0).otherwise(1e9).alias("importance")
    return table.with_columns(first, pl.lit(0.0).alias("prior_norm")).drop("in")


def probe(run: Path, store: Store) -> list[dict]:
    runs = RunDir(run)
    rows = []
    for path in sorted(run.glob("arbitrate/*/manifest.json")):
        m = json.loads(path.read_text())
        cfg = ArbitrateConfig(**{**m["config"], "rankings": tuple(m["config"]["rankings"])})
        before, calibration, pairs = candidates(runs, m)
        (own, own_repair), (rival, _) = pairs
        priors = input_of(runs, own, 0)
        present = pl.read_parquet(priors.file("priors.parquet"))
        row = {"run": run.name, "iteration": cfg.iteration, "kept": m["info"]["kept"]}
        row |= {f"nll_{name}": round(m["info"][f"nll_{name}"], 5) for name in cfg.rankings}
        for name, units in mixes(runs, own, rival).items():
            table = as_importance(units, present)
            mixed = store.produce(
                "importance",
                "mix-1",
                MixConfig(iteration=cfg.iteration, mix=name),
                [own, rival],
                lambda out, table=table: table.write_parquet(out / importance.FILE),
            )
            chosen = select.run(priors, mixed, before.selection, select.SelectConfig(**manifest(own)["config"]), store)
            repair_cfg = reconstruct.ReconstructConfig(**manifest(own_repair)["config"])
            repaired = reconstruct.run(before, calibration, chosen, repair_cfg, store)
            model, _, device = before.then(chosen, repaired).load(cfg.dtype, "cpu")
            row[f"nll_{name}"] = round(mean_nll(model, judged_windows(calibration, cfg), cfg.batch_size, device)[0], 5)
            row[f"{name}_heads"] = chosen.info()["removed_heads"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished --rival flap --unit-order estimator runs")
    store = Store(OUT)
    for run in parser.parse_args().runs:
        probe(run, store)


if __name__ == "__main__":
    main()
