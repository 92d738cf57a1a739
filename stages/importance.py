"""Importance stage: one score per candidate unit; the lower, the sooner it is removed.

- ``regression`` (Bonsai): beta from regressing sub-model utilities on their masks.
- ``perturbed-prior``: the prior averaged over the sampled sub-models that kept the unit
  (Figure 2, "perturbation, no regression").
- ``prior-only``: the prior of the unperturbed model (Figure 2, "no perturbation").
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
from bonsai.stages.core.regression import fit_importance
from bonsai.stages.core.rng import generator
from bonsai.stages.evaluate import PERTURBED_PRIORS, UTILITIES

VERSION = "1"
FILE = "importance.parquet"
CV_FILE = "cv.parquet"
FIT_FILE = "fit.parquet"
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
}

log = logging.getLogger("bonsai.importance")


@dataclass(frozen=True, kw_only=True)
class ImportanceConfig:
    iteration: int
    estimator: str
    penalty: str
    alphas: tuple[float, ...]
    cv_folds: int
    seed: int


def run(masks: ArtifactRef, evaluations: list[ArtifactRef], cfg: ImportanceConfig, store: Store) -> ArtifactRef:
    def build(out: Path) -> dict:
        cands, table = masks_stage.read(masks)
        info: dict = {"estimator": cfg.estimator, "candidates": cands.height}
        if cfg.estimator == "regression":
            score, fit_info, cv = _regression(cands, table, evaluations, cfg)
            info.update(fit_info)
            pl.DataFrame(cv, schema={"alpha": pl.Float64, "fold": pl.Int32, "kendall_tau": pl.Float64}).with_columns(
                pl.lit(cfg.iteration, pl.Int32).alias("iteration")
            ).write_parquet(out / CV_FILE)
        elif cfg.estimator == "perturbed-prior":
            score = _perturbed_prior(cands, evaluations)
        elif cfg.estimator == "prior-only":
            score = cands["prior_norm"].to_numpy()
        else:
            score = torch.rand(cands.height, generator=generator(cfg.seed, "random", cfg.iteration)).numpy()
        kill_point("importance")
        row = {name: info.get(name) for name in FIT_SCHEMA} | {"iteration": cfg.iteration}
        pl.DataFrame([row], schema=FIT_SCHEMA).write_parquet(out / FIT_FILE)
        cands.with_columns(pl.Series("importance", np.asarray(score, dtype=np.float64))).select(
            "iteration", "layer", "kind", "unit", "params", "prior", "prior_norm", "importance"
        ).write_parquet(out / FILE)
        return info

    return store.produce("importance", VERSION, cfg, [masks, *evaluations], build)


def _utilities(evaluations: list[ArtifactRef]) -> pl.DataFrame:
    if not evaluations:
        return pl.DataFrame(schema={"mask": pl.Int32, "utility": pl.Float64, "finite": pl.Boolean})
    return pl.concat([pl.read_parquet(e.file(UTILITIES)) for e in evaluations]).sort("mask")


def _regression(cands, table, evaluations, cfg) -> tuple[np.ndarray, dict, list]:
    scores = _utilities(evaluations)
    joined = table.join(scores.select("mask", "utility", "finite"), on="mask", how="inner").sort("mask")
    bad = int((~joined["finite"]).sum())
    if bad:
        log.warning(
            "iteration %d: %d of %d sub-models gave a non-finite loss (half-precision overflow?); "
            "they are left out of the regression",
            cfg.iteration,
            bad,
            joined.height,
        )
    usable = joined.filter(pl.col("finite"))
    if usable.height < max(4, joined.height // 2):
        raise UserError(
            f"iteration {cfg.iteration}: only {usable.height} of {joined.height} sub-models had a finite loss; "
            f"prune in --dtype bfloat16 or float32, or raise --masks-per-iter"
        )
    keep = masks_stage.keep_matrix(usable)
    fit = fit_importance(
        keep, usable["utility"].to_numpy(), usable["pair"].to_numpy(), cfg.penalty, cfg.alphas, cfg.cv_folds, cfg.seed
    )
    info = {
        "penalty": cfg.penalty,
        "alpha": fit.alpha,
        "cv_kendall_tau": fit.cv_tau,
        "intercept": fit.intercept,
        "masks_used": usable.height,
        "masks_non_finite": bad,
        "utility_mean": float(usable["utility"].mean()),
        "utility_std": float(usable["utility"].std() or 0.0),
        "nonzero_importances": int(np.count_nonzero(fit.beta)),
    }
    log.info(
        "iteration %d: regression chose %s alpha=%g, held-out Kendall tau %.3f over %d sub-models",
        cfg.iteration,
        cfg.penalty,
        fit.alpha,
        fit.cv_tau,
        usable.height,
    )
    return fit.beta, info, fit.cv


def _perturbed_prior(cands: pl.DataFrame, evaluations: list[ArtifactRef]) -> np.ndarray:
    total = np.zeros(cands.height)
    kept = np.zeros(cands.height)
    for ref in evaluations:
        part = pl.read_parquet(ref.file(PERTURBED_PRIORS)).sort("candidate")
        total += part["prior_sum"].to_numpy()
        kept += part["kept"].to_numpy()
    mean = np.divide(total, kept, out=np.zeros_like(total), where=kept > 0)
    scale = cands["group_prior_mean"].to_numpy()
    return np.divide(mean, scale, out=np.zeros_like(mean), where=scale > 0)


def read(importance: ArtifactRef) -> pl.DataFrame:
    return pl.read_parquet(importance.file(FILE))
