"""Select stage: remove the lowest-importance candidates, globally across layers.

Iteration l's budget is cumulative: after it, min(p, (l+1) p_iter) of the parent's
attention+MLP parameters are gone.  Candidates are removed in ascending importance until
the budget is met, so the last removal may overshoot it by at most one unit (Eq. 2's greedy
solution, as in the paper).  The output is the whole cumulative keep-state, not a delta:
any iteration's model is the parent sliced by one table.  ``prior_only_jaccard`` in the
summary says how far the removal moved from what the prior alone would have removed under
the same budget (1: the same units).

With ``order`` (``--unit-order flap``) the estimator decides how many heads and channels each
layer loses and another ranking, FLAP's fluctuation of the current model, which ones: the
lowest-scoring units of the layer, as many as the estimator took there.  The budget is the
same (a layer's units of one kind are the same size).  Measured on SmolLM2 with the repair
after each removal, the regression's per-layer counts were right and its units within a
layer, candidates drawn in Wanda's order and scored unrepaired, were not the ones the repair
recovers best (BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from bonsai.artifacts import ArtifactRef, Store
from bonsai.stages import importance as importance_stage
from bonsai.stages import priors as priors_stage
from bonsai.stages.core.plan import cumulative_target
from bonsai.stages.core.units import CHANNEL, HEAD, KEEP_FILE

VERSION = "2"
REMOVED = "removed.parquet"
SUMMARY = "iteration.parquet"


@dataclass(frozen=True, kw_only=True)
class SelectConfig:
    iteration: int
    sparsity: float
    prune_frac: float


def run(
    priors: ArtifactRef,
    importance: ArtifactRef,
    previous: ArtifactRef | None,
    cfg: SelectConfig,
    store: Store,
    order: ArtifactRef | None = None,
) -> ArtifactRef:
    """``order``: a priors artifact of the same model whose ``flap`` column picks the units
    within each layer (None: the estimator's own units)."""

    def build(out: Path) -> dict:
        keep, budget = current_keep(priors, previous, cfg)
        prunable = int(keep["params"].sum())
        removed_before = int(keep.filter(~pl.col("kept"))["params"].sum())
        target = cumulative_target(cfg.sparsity, cfg.prune_frac, cfg.iteration)
        ranked = rank(importance_stage.read(importance), keep)
        count, removed_params = _within_budget(ranked["params"], removed_before, budget)
        # what the prior alone would have removed under the same budget, for the audit
        by_prior = ranked.sort("prior_norm", "layer", "kind", "unit")
        prior_count, _ = _within_budget(by_prior["params"], removed_before, budget)
        jaccard = _jaccard(ranked.head(count), by_prior.head(prior_count))
        removal = ranked.head(count)
        extra = {}
        if order is not None:
            own = removal
            removal = within_layer(own, priors_stage.read(order), keep)
            extra["reordered"] = own.height - own.join(removal, on=["layer", "kind", "unit"], how="semi").height
        chosen = removal.with_row_index("rank").select(
            pl.lit(cfg.iteration, pl.Int32).alias("iteration"),
            pl.col("rank").cast(pl.Int32),
            "layer",
            "kind",
            "unit",
            "params",
            "importance",
        )
        chosen.write_parquet(out / REMOVED)
        gone = chosen.select("layer", "kind", "unit").with_columns(pl.lit(True).alias("gone"))
        keep = (
            keep.join(gone, on=["layer", "kind", "unit"], how="left")
            .with_columns(
                pl.when(pl.col("gone")).then(False).otherwise(pl.col("kept")).alias("kept"),
                pl.when(pl.col("gone"))
                .then(pl.lit(cfg.iteration, pl.Int32))
                .otherwise(pl.col("removed_iteration"))
                .alias("removed_iteration"),
            )
            .drop("gone")
            .sort("layer", "kind", "unit")
        )
        keep.insert_column(0, pl.lit(cfg.iteration, pl.Int32).alias("iteration")).write_parquet(out / KEEP_FILE)
        parent_params = int(priors.info()["model_params"]) + removed_before
        left = keep.filter(pl.col("kept"))
        summary = {
            "iteration": cfg.iteration,
            "target_sparsity": target,
            "sparsity": removed_params / prunable,
            "total_sparsity": removed_params / parent_params,
            "removed_params": removed_params,
            "prunable_params": prunable,
            "parent_params": parent_params,
            "model_params": parent_params - removed_params,
            "candidates": ranked.height,
            "removed_heads": int((chosen["kind"] == HEAD).sum()),
            "removed_channels": int((chosen["kind"] == CHANNEL).sum()),
            "heads_left": int((left["kind"] == HEAD).sum()),
            "channels_left": int((left["kind"] == CHANNEL).sum()),
            "prior_only_jaccard": jaccard,
            **extra,  # --unit-order flap: how many of the estimator's units another unit of their layer replaced
        }
        pl.DataFrame([summary]).write_parquet(out / SUMMARY)
        return summary

    inputs = [priors, importance] + [ref for ref in (previous, order) if ref is not None]
    return store.produce("select", VERSION, cfg, inputs, build)


def current_keep(priors: ArtifactRef, previous: ArtifactRef | None, cfg: SelectConfig) -> tuple[pl.DataFrame, float]:
    """(the keep-state before this iteration, the attention+MLP parameters removed after it)."""
    if previous is None:
        keep = (
            priors_stage.read(priors)
            .select("layer", "kind", "unit", "params")
            .with_columns(pl.lit(True).alias("kept"), pl.lit(None, pl.Int32).alias("removed_iteration"))
        )
    else:
        keep = pl.read_parquet(previous.file(KEEP_FILE)).drop("iteration")
    return keep, cumulative_target(cfg.sparsity, cfg.prune_frac, cfg.iteration) * int(keep["params"].sum())


def rank(importance: pl.DataFrame, keep: pl.DataFrame) -> pl.DataFrame:
    """Candidates still present, in removal order: ascending importance, ties by the prior."""
    present = keep.filter(pl.col("kept")).select("layer", "kind", "unit")
    return importance.join(present, on=["layer", "kind", "unit"], how="semi").sort(
        "importance", "prior_norm", "layer", "kind", "unit"
    )


def within_layer(removal: pl.DataFrame, order: pl.DataFrame, keep: pl.DataFrame) -> pl.DataFrame:
    """As many units of each (layer, kind) as ``removal`` takes there, the lowest ``flap`` of
    ``order`` among those still present (ties by unit), in ``removal``'s row schema (by layer,
    kind and unit): the estimator's importance where it removed the unit too, null elsewhere."""
    key = ["layer", "kind", "unit"]
    counts = removal.group_by("layer", "kind").agg(pl.len().alias("count"))
    present = keep.filter(pl.col("kept")).select(*key, "params")
    ranked = (
        present.join(order.select(*key, "flap"), on=key, how="left")
        .sort("layer", "kind", "flap", "unit", nulls_last=True)
        .with_columns(pl.int_range(pl.len()).over("layer", "kind").alias("slot"))
        .join(counts, on=["layer", "kind"])
        .filter(pl.col("slot") < pl.col("count"))
    )
    scored = removal.drop("params")
    picked = ranked.select(*key, "params").join(scored, on=key, how="left")
    return picked.select(removal.columns).sort("layer", "kind", "unit")


def removal(importance: pl.DataFrame, keep: pl.DataFrame, budget: float) -> pl.DataFrame:
    """The (layer, kind, unit, params) this iteration removes, in order, under ``budget``."""
    ranked = rank(importance, keep)
    count, _ = _within_budget(ranked["params"], int(keep.filter(~pl.col("kept"))["params"].sum()), budget)
    return ranked.head(count).select("layer", "kind", "unit", "params")


def _within_budget(params: pl.Series, removed: int, budget: float) -> tuple[int, int]:
    """How many units, in order, are removed until ``budget`` parameters are gone (the last
    one may overshoot), and the parameters removed then."""
    count = 0
    for value in params:
        if removed >= budget:
            break
        removed += int(value)
        count += 1
    return count, removed


def _jaccard(a: pl.DataFrame, b: pl.DataFrame) -> float | None:
    """Overlap of two removal sets: 1 when they are the same units."""
    key = ["layer", "kind", "unit"]
    union = pl.concat([a.select(key), b.select(key)]).unique().height
    return a.select(key).join(b.select(key), on=key, how="semi").height / union if union else None
