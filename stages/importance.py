"""Importance stage: one score per candidate unit; the lower, the sooner it is removed.

The estimators are listed once, in core/plan.py; each has an implementation here:

- ``regression`` (the default): sub-model utilities regressed on masks with a prior-informed
  model, one measured scale of the prior per (layer, kind) group plus per-unit corrections
  (core/group_scales.py), on the ``split`` sampling design (masks.py).
- ``paper-regression``: the paper's Eq. 3, an L1 (or L2) regression of utilities on masks
  with its penalty chosen by held-out Kendall tau (Appendix A.1; core/regression.py).
- ``perturbed-prior``: the prior averaged over the sampled sub-models that kept the unit
  (Figure 2, "perturbation, no regression").
- ``prior-only``: the prior of the unperturbed model (Figure 2, "no perturbation").
- ``flap``: FLAP's standardised fluctuation (An et al., AAAI 2024), the forward-only baseline.
- ``random``: a seeded uniform score; the floor any estimator must beat.

Priors are only comparable within a (layer, kind) group, so the prior-based estimators
divide by the group's mean prior before ranking globally; regression betas are already in
utility units and need no such step.  Ties (for example units Lasso set to exactly 0) are
broken by the normalised prior, then by position.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from bonsai.artifacts import ArtifactRef, Store, kill_point
from bonsai.stages import masks as masks_stage
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.group_scales import Groups, fit_group_scales
from bonsai.stages.core.regression import fit_importance
from bonsai.stages.core.rng import generator
from bonsai.stages.core.units import KINDS
from bonsai.stages.evaluate import PERTURBED_PRIORS, UTILITIES

VERSION = "3"
FILE = "importance.parquet"
CV_FILE = "cv.parquet"  # paper-regression: (alpha, fold) -> Kendall tau
PENALTIES_FILE = "penalties.parquet"  # regression: (kind, penalties) -> held-out squared error
FIT_FILE = "fit.parquet"
SCALES_FILE = "scales.parquet"
MIN_GROUP = 4  # candidates per layer below which a kind's scale is one across layers
FIT_SCHEMA = {
    "iteration": pl.Int32,
    "estimator": pl.Utf8,
    "penalty": pl.Utf8,
    "alpha": pl.Float64,
    "cv_kendall_tau": pl.Float64,
    "masks_used": pl.Int64,
    "masks_non_finite": pl.Int64,
    "intercept": pl.Float64,
    "utility_mean": pl.Float64,
    "utility_std": pl.Float64,
    # the group-scale regression's choices and held-out fit, per kind
    "lam_scale_head": pl.Float64,
    "lam_scale_channel": pl.Float64,
    "lam_correction_head": pl.Float64,
    "lam_correction_channel": pl.Float64,
    "cv_r2_head": pl.Float64,
    "cv_r2_channel": pl.Float64,
    "nonzero_corrections_head": pl.Int64,
    "nonzero_corrections_channel": pl.Int64,
}

log = logging.getLogger("bonsai.importance")


@dataclass(frozen=True, kw_only=True)
class ImportanceConfig:
    iteration: int
    estimator: str
    penalty: str
    alpha_grid: tuple[float, ...]
    cv_folds: int
    seed: int


def run(masks: ArtifactRef, evaluations: list[ArtifactRef], cfg: ImportanceConfig, store: Store) -> ArtifactRef:
    def build(out: Path) -> dict:
        cands, table = masks_stage.read(masks)
        info: dict = {"estimator": cfg.estimator, "candidates": cands.height}
        score = ESTIMATES[cfg.estimator](cands, table, evaluations, cfg, out, info)
        kill_point("importance")
        row = {name: info.get(name) for name in FIT_SCHEMA} | {"iteration": cfg.iteration}
        pl.DataFrame([row], schema=FIT_SCHEMA).write_parquet(out / FIT_FILE)
        cands.with_columns(pl.Series("importance", np.asarray(score, dtype=np.float64))).select(
            "iteration", "layer", "kind", "unit", "params", "prior", "prior_norm", "importance"
        ).write_parquet(out / FILE)
        return info

    return store.produce("importance", VERSION, cfg, [masks, *evaluations], build)


def usable_submodels(table: pl.DataFrame, evaluations: list[ArtifactRef]) -> pl.DataFrame:
    """The evaluated sub-models with their utility (all of them; ``finite`` says which count)."""
    scores = pl.concat([pl.read_parquet(e.file(UTILITIES)) for e in evaluations]).sort("mask")
    return table.join(scores.select("mask", "utility", "finite"), on="mask", how="inner").sort("mask")


def _usable(table: pl.DataFrame, evaluations: list[ArtifactRef], iteration: int, info: dict) -> pl.DataFrame:
    """The evaluated sub-models with a finite utility (warning about the others)."""
    joined = usable_submodels(table, evaluations)
    bad = int((~joined["finite"]).sum())
    if bad:
        log.warning(
            "iteration %d: %d of %d sub-models gave a non-finite loss (half-precision overflow?); "
            "they are left out of the regression",
            iteration,
            bad,
            joined.height,
        )
    usable = joined.filter(pl.col("finite"))
    if usable.height < max(4, joined.height // 2):
        raise UserError(
            f"iteration {iteration}: only {usable.height} of {joined.height} sub-models had a finite loss; "
            f"prune in --dtype bfloat16 or float32, or raise --masks-per-iter"
        )
    info.update(
        masks_used=usable.height,
        masks_non_finite=bad,
        utility_mean=float(usable["utility"].mean()),
        utility_std=float(usable["utility"].std() or 0.0),
    )
    return usable


def _paper_regression(cands, table, evaluations, cfg, out, info) -> np.ndarray:
    usable = _usable(table, evaluations, cfg.iteration, info)
    keep = masks_stage.keep_matrix(usable)
    utility, pair = usable["utility"].to_numpy(), usable["pair"].to_numpy()
    fit = fit_importance(keep, utility, pair, cfg.penalty, cfg.alpha_grid, cfg.cv_folds, cfg.seed)
    info.update(
        penalty=cfg.penalty,
        alpha=fit.alpha,
        cv_kendall_tau=fit.cv_tau,
        intercept=fit.intercept,
        nonzero_importances=int(np.count_nonzero(fit.beta)),
    )
    pl.DataFrame(fit.cv, schema={"alpha": pl.Float64, "fold": pl.Int32, "kendall_tau": pl.Float64}).with_columns(
        pl.lit(cfg.iteration, pl.Int32).alias("iteration")
    ).write_parquet(out / CV_FILE)
    log.info(
        "iteration %d: regression chose %s alpha=%g, held-out Kendall tau %.3f over %d sub-models",
        cfg.iteration,
        cfg.penalty,
        fit.alpha,
        fit.cv_tau,
        usable.height,
    )
    return fit.beta


def group_problem(cands: pl.DataFrame, usable: pl.DataFrame) -> tuple[pl.DataFrame, dict]:
    """(the groups table, the arguments of fit_group_scales) for the candidates and the usable
    evaluated sub-models.  A group is a (layer, kind), except that a kind with fewer than
    MIN_GROUP candidates in a typical layer (SmolLM2-135M has one candidate head per layer) is
    one group across layers (layer null): a scale per candidate would be a free coefficient per
    unit, whose noise then picks which units go (measured on SmolLM2-135M: 12 heads removed at
    10% and held-out perplexity 22.6 against 19.7 for the prior's order; pooled, none, 18.7).
    Weights use the prior normalised by its layer's mean, which is comparable across layers."""
    per_layer = cands.group_by("layer", "kind").len().group_by("kind").agg(pl.col("len").median())
    pooled = set(per_layer.filter(pl.col("len") < MIN_GROUP)["kind"].to_list())
    keyed = cands.with_columns(
        pl.when(pl.col("kind").is_in(list(pooled))).then(None).otherwise(pl.col("layer")).alias("group_layer")
    )
    group_table = (
        keyed.select(pl.col("group_layer").alias("layer"), "kind").unique(maintain_order=True).with_row_index("group")
    )
    group_of = keyed.join(
        group_table, left_on=["group_layer", "kind"], right_on=["layer", "kind"], how="left", nulls_equal=True
    )["group"].to_numpy()
    kind_index = {k: i for i, k in enumerate(KINDS)}
    groups = Groups.build(
        group_of, np.array([kind_index[k] for k in group_table["kind"]]), cands["prior_norm"].to_numpy()
    )
    return group_table, {
        "keep": masks_stage.keep_matrix(usable),
        "utility": usable["utility"].to_numpy(),
        "pair": usable["pair"].to_numpy(),
        "perturbed": masks_stage.perturbed_kinds(usable, KINDS),
        "groups": groups,
        "candidate_kind": np.array([kind_index[k] for k in cands["kind"]]),
    }


def _group_regression(cands, table, evaluations, cfg, out, info) -> np.ndarray:
    usable = _usable(table, evaluations, cfg.iteration, info)
    group_table, problem = group_problem(cands, usable)
    group_of = problem["groups"].of
    fit = fit_group_scales(**problem, folds=cfg.cv_folds, seed=cfg.seed)
    for kind_fit in fit.kinds:
        kind = KINDS[kind_fit.kind]
        info[f"lam_scale_{kind}"] = kind_fit.lam_scale
        info[f"lam_correction_{kind}"] = kind_fit.lam_correction
        info[f"cv_r2_{kind}"] = 1.0 - kind_fit.cv_mse
        info[f"nonzero_corrections_{kind}"] = int(
            np.count_nonzero(np.abs(fit.corrections[cands["kind"].to_numpy() == kind]) > 1e-12)
        )
        log.info(
            "iteration %d: %s scales fitted on %d sub-models (penalties %s / %s), held-out R^2 %.3f",
            cfg.iteration,
            kind,
            kind_fit.rows,
            kind_fit.lam_scale,
            kind_fit.lam_correction,
            1.0 - kind_fit.cv_mse,
        )
    group_table.with_columns(
        pl.lit(cfg.iteration, pl.Int32).alias("iteration"),
        pl.Series("scale", fit.scales),
        pl.Series("candidates", np.bincount(group_of, minlength=group_table.height)),
    ).select("iteration", "layer", "kind", "scale", "candidates").write_parquet(out / SCALES_FILE)
    cv_rows = [{"kind": KINDS[k.kind], **row} for k in fit.kinds for row in k.cv]
    pl.DataFrame(
        cv_rows, schema={"kind": pl.Utf8, "lam_scale": pl.Float64, "lam_correction": pl.Float64, "cv_mse": pl.Float64}
    ).with_columns(pl.lit(cfg.iteration, pl.Int32).alias("iteration")).write_parquet(out / PENALTIES_FILE)
    return fit.beta


def _perturbed_prior(cands, table, evaluations, cfg, out, info) -> np.ndarray:
    total = np.zeros(cands.height)
    kept = np.zeros(cands.height)
    for ref in evaluations:
        part = pl.read_parquet(ref.file(PERTURBED_PRIORS)).sort("candidate")
        total += part["prior_sum"].to_numpy()
        kept += part["kept"].to_numpy()
    mean = np.divide(total, kept, out=np.zeros_like(total), where=kept > 0)
    scale = cands["group_prior_mean"].to_numpy()
    return np.divide(mean, scale, out=np.zeros_like(mean), where=scale > 0)


def _prior_only(cands, table, evaluations, cfg, out, info) -> np.ndarray:
    return cands["prior_norm"].to_numpy()


def _flap(cands, table, evaluations, cfg, out, info) -> np.ndarray:
    """FLAP's score as the priors stage computed it (--prior flap): already on one scale
    across layers and kinds, so it is ranked as it is."""
    return cands["prior"].to_numpy()


def _random(cands, table, evaluations, cfg, out, info) -> np.ndarray:
    return torch.rand(cands.height, generator=generator(cfg.seed, "random", cfg.iteration)).numpy()


# one implementation per estimator of core/plan.py (a test checks that the two lists agree)
ESTIMATES = {
    "regression": _group_regression,
    "paper-regression": _paper_regression,
    "perturbed-prior": _perturbed_prior,
    "prior-only": _prior_only,
    "flap": _flap,
    "random": _random,
}


def read(importance: ArtifactRef) -> pl.DataFrame:
    return pl.read_parquet(importance.file(FILE))
