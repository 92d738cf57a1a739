"""Settle stage: after a round of sub-models, is this iteration's removal decision settled?

Under ``--sampling adaptive``, ``--masks-per-iter`` is a budget spent in rounds; after each
round the importance is refitted on every sub-model so far and this stage decides whether
another round would change what is removed.  It resamples the evaluated (mask, complement)
pairs with replacement (a seeded bootstrap), refits each resample with the penalties the full
fit chose, and measures, per resample, how much of the removal (in parameters) it would change
and the *regret*: how much more predicted utility (nats per token) the full fit's removal loses
than the resample's own best removal, both priced by the resample.  The decision is settled
(after at least ``min_rounds``) when the mean change is at most the tolerance or the mean regret
is below ``regret``, provided the fit predicts held-out pairs better than their mean for every
kind (``measured``), or when the budget is spent.

Why the regret: near the cut, units of almost equal importance swap places from resample to
resample, so the changed fraction stays at 8-20 % round after round (measured on the tiny
parent at 50 %) although the swaps cost nothing; the regret prices them, and fell below
1e-3 nats (a tenth of a percent of perplexity) by the second or third round of every iteration
there, while staying large (0.02-4 nats) in the rounds where the decision really was open.

Why the fit must predict held-out pairs: the resamples are refitted with the penalties the full
fit chose.  When cross-validation finds no signal yet, it chooses one common scale per kind,
whose removal is the prior's order whatever the scale, and the resamples agree with it or tie
(a scale of zero prices every removal alike): on SmolLM2 at 32 sub-models (channel R^2 -0.72)
the regret was exactly 0 for a decision that more sub-models change.

Adaptive sampling is not the default: on the tiny parent it matched fixed sampling's perplexity
with 42 % of the evaluations, but on SmolLM2 its fits predicted nothing below about 64-96
sub-models, it saved 23 % and its removals were 0.5 perplexity worse than fixed 128's on the
mean of two seeds (BENCHMARKS.md, "Adaptive sampling").

Why a bootstrap over pairs: what keeps the decision uncertain is which sub-models happened to
be drawn, and resampling them is the cheapest faithful picture of that (a refit costs
milliseconds).  The change against the previous round's decision is recorded too: it is the
convergence ``bonsai audit`` plots.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from bonsai.artifacts import ArtifactRef, Store
from bonsai.stages import importance as importance_stage
from bonsai.stages import masks as masks_stage
from bonsai.stages import select as select_stage
from bonsai.stages.core.group_scales import fit_group_scales
from bonsai.stages.core.rng import derived_seed
from bonsai.stages.core.units import KINDS

VERSION = "2"  # 2: regret
TABLE = "convergence.parquet"
REMOVAL = "removal.parquet"
KEY = ["layer", "kind", "unit"]


@dataclass(frozen=True, kw_only=True)
class SettleConfig:
    iteration: int
    round: int
    sparsity: float
    prune_frac: float
    tolerance: float  # largest mean fraction of the removal (in parameters) a resample may change
    regret: float  # settled when the mean regret (nats per token) is below this (0: never)
    resamples: int
    min_rounds: int
    last_round: bool  # the budget is spent: settled whatever the change
    seed: int
    cv_folds: int  # as the importance fit's (it decides which sub-models fit each kind)


def changed(a: pl.DataFrame, b: pl.DataFrame) -> float:
    """Parameters removed by one set and not the other, over the parameters ``a`` removes."""
    total = int(a["params"].sum())
    only = pl.concat([a.join(b, on=KEY, how="anti"), b.join(a, on=KEY, how="anti")])
    return int(only["params"].sum()) / total if total else 0.0


def measured(fit: dict) -> bool:
    """Whether the importance fit predicts held-out pairs better than their mean for every kind
    it fitted.  One that does not has measured nothing yet (its order is the prior's), and the
    bootstrap, refitting with the same penalties, would only agree with it."""
    return all(r > 0 for k in KINDS if (r := fit.get(f"cv_r2_{k}")) is not None)


def regret(chosen: pl.DataFrame, alternative: pl.DataFrame, importance: pl.DataFrame) -> float:
    """How much more predicted utility (nats per token) removing ``chosen`` loses than removing
    ``alternative``, both priced by ``importance`` (0 when ``chosen`` is no worse)."""
    price = importance.select(*KEY, "importance")

    def cost(removed: pl.DataFrame) -> float:
        return float(removed.join(price, on=KEY, how="left")["importance"].fill_null(0.0).sum())

    return max(0.0, cost(chosen) - cost(alternative))


def resampled_decisions(chosen, fitted, cands, usable, fit: dict, keep, budget, cfg: SettleConfig):
    """(change, regret) of the removal under each bootstrap resample of the evaluated pairs,
    refitted with the penalties the full fit chose: the fraction of ``chosen`` (in parameters)
    the resample would remove differently, and what ``chosen`` loses against the resample's
    own best removal, priced by the resample."""
    penalties = {
        i: (fit[f"lam_scale_{k}"], fit[f"lam_correction_{k}"])
        for i, k in enumerate(KINDS)
        if fit.get(f"lam_scale_{k}") is not None
    }
    _, problem = importance_stage.group_problem(cands, usable)
    pairs = np.unique(problem["pair"])
    rng = np.random.default_rng(derived_seed(cfg.seed, "settle", cfg.iteration, cfg.round))
    changes, regrets = [], []
    for _ in range(cfg.resamples):
        drawn = rng.choice(pairs, size=len(pairs), replace=True)
        rows = np.concatenate([np.flatnonzero(problem["pair"] == p) for p in drawn])
        resampled = {
            **problem,
            **{k: problem[k][rows] for k in ("keep", "utility", "perturbed")},
            "pair": np.repeat(np.arange(len(drawn)), [np.sum(problem["pair"] == p) for p in drawn]),
        }
        beta = fit_group_scales(**resampled, folds=cfg.cv_folds, seed=cfg.seed, penalties=penalties).beta
        refit = fitted.with_columns(pl.Series("importance", beta))
        alternative = select_stage.removal(refit, keep, budget)
        changes.append(changed(chosen, alternative))
        regrets.append(regret(chosen, alternative, refit))
    return changes, regrets


def run(
    priors: ArtifactRef,
    previous: ArtifactRef | None,
    importance: ArtifactRef,
    masks: list[ArtifactRef],
    evaluations: list[ArtifactRef],
    before: ArtifactRef | None,
    cfg: SettleConfig,
    store: Store,
) -> ArtifactRef:
    """``previous``: the last iteration's select; ``before``: this iteration's settle artifact
    of the round before (None for round 0)."""

    def build(out: Path) -> dict:
        select_cfg = select_stage.SelectConfig(
            iteration=cfg.iteration, sparsity=cfg.sparsity, prune_frac=cfg.prune_frac
        )
        keep, budget = select_stage.current_keep(priors, previous, select_cfg)
        fitted = importance_stage.read(importance)
        chosen = select_stage.removal(fitted, keep, budget)
        chosen.write_parquet(out / REMOVAL)
        cands, table = masks_stage.read_rounds(masks)
        usable = importance_stage.usable_submodels(table, evaluations).filter(pl.col("finite"))
        fit = pl.read_parquet(importance.file(importance_stage.FIT_FILE)).row(0, named=True)
        changes, regrets = resampled_decisions(chosen, fitted, cands, usable, fit, keep, budget, cfg)
        instability = float(np.mean(changes)) if changes else 0.0
        loss = float(np.mean(regrets)) if regrets else 0.0
        since = changed(chosen, pl.read_parquet(before.file(REMOVAL))) if before is not None else None
        informative = measured(fit)
        holds = informative and (instability <= cfg.tolerance or loss < cfg.regret)
        settled = (cfg.round + 1 >= cfg.min_rounds and holds) or cfg.last_round
        row = {
            "iteration": cfg.iteration,
            "round": cfg.round,
            "sub_models": usable.height,
            "removed_units": chosen.height,
            "bootstrap_change": instability,
            "bootstrap_regret": loss,
            "informative": informative,
            "change_since_last_round": since,
            "settled": settled,
        }
        pl.DataFrame(
            [row],
            schema={
                "iteration": pl.Int32,
                "round": pl.Int32,
                "sub_models": pl.Int64,
                "removed_units": pl.Int64,
                "bootstrap_change": pl.Float64,
                "bootstrap_regret": pl.Float64,
                "informative": pl.Boolean,
                "change_since_last_round": pl.Float64,
                "settled": pl.Boolean,
            },
        ).write_parquet(out / TABLE)
        return row

    inputs = [priors, importance, *masks, *evaluations] + [r for r in (previous, before) if r is not None]
    return store.produce("settle", VERSION, cfg, inputs, build)


def read(settle: ArtifactRef) -> pl.DataFrame:
    return pl.read_parquet(settle.file(TABLE))
