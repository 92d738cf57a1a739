"""Prior-informed importance: how much each (layer, kind) group's prior is worth, measured.

The paper's regression (regression.py) gives every candidate its own coefficient and shrinks
them all toward zero.  Measured on SmolLM2-135M, that throws the information away: its
cross-validated Lasso kept one head and no channel, so the removal order was the prior's.
Two things are wrong with it, and this model fixes both:

- Priors rank units well *within* a (layer, kind) group but say nothing about how groups
  compare, which is the decision Bonsai exists to make.  So the importance of candidate u is

      beta_u = S_g * w_u + delta_u,   w_u = p_u / (sum of p over g's candidates)

  (p the prior normalised by its layer's mean; a kind with very few candidates per layer is
  one group across layers, see stages/importance.py)

  with one scale S_g per group (the utility of keeping all of g's candidates rather than none),
  shrunk toward a common value per kind (ridge on S_g - A_kind, A_kind unpenalised), and
  per-unit corrections delta_u shrunk toward zero.  Without informative data it reduces to
  the prior's order within each group; with data it moves as far as the data support.
- S_g is identifiable only if the sub-models drop different fractions of different groups
  (masks.py, design "split"), and the heads' large effects drown the channels' small ones
  when both vary in the same sub-model.  So some pairs of sub-models perturb channels only;
  each kind is fitted on the pairs that perturb it and nothing else where there are any
  (channels), else on all pairs that perturb it (heads, with the channels as covariates).

The penalties are chosen by cross-validated squared error over folds of whole (mask,
complement) pairs.  Each fit is solved exactly in its n x n dual form (n sub-models), so a
model with tens of thousands of candidates costs milliseconds per fit.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from bonsai.stages.core.regression import folds_of

# penalties searched by cross-validation; an infinite lam_scale (always tried) means one common
# scale per kind, a lam_correction of None no per-unit corrections at all
SCALE_PENALTIES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
CORRECTION_PENALTIES = (None, 1e2, 1e3, 1e4)


@dataclass(frozen=True)
class Groups:
    """Which group each candidate belongs to, each group's kind, and the prior weights."""

    of: np.ndarray  # (candidates,) group index
    kind: np.ndarray  # (groups,) kind index
    weight: np.ndarray  # (candidates,) w_u: the unit's share of its group's candidate prior mass

    @classmethod
    def build(cls, group_of: np.ndarray, group_kind: np.ndarray, prior: np.ndarray) -> Groups:
        prior = np.maximum(np.asarray(prior, dtype=np.float64), 0.0)
        mass = np.bincount(group_of, weights=prior, minlength=len(group_kind))
        count = np.bincount(group_of, minlength=len(group_kind))
        # a group whose candidates all have a zero prior spreads its scale evenly
        weight = np.where(mass[group_of] > 0, prior / np.where(mass > 0, mass, 1.0)[group_of], 1.0 / count[group_of])
        return cls(group_of, np.asarray(group_kind), weight)

    def features(self, keep: np.ndarray) -> np.ndarray:
        """(masks, groups): the fraction of each group's candidate prior mass kept."""
        out = np.zeros((keep.shape[0], len(self.kind)))
        np.add.at(out.T, self.of, (keep * self.weight).T)
        return out


@dataclass(frozen=True)
class KindFit:
    kind: int
    rows: int  # sub-models the fit used
    lam_scale: float  # infinite: one common scale for the kind
    lam_correction: float | None
    cv_mse: float  # held-out squared error of standardised utilities (1.0: no better than the mean)
    cv: list[dict]  # one row per (lam_scale, lam_correction): {"lam_scale", "lam_correction", "cv_mse"}


@dataclass(frozen=True)
class GroupFit:
    beta: np.ndarray  # (candidates,) utility per unit kept
    scales: np.ndarray  # (groups,) S_g in utility units (NaN for a kind no fit covered)
    corrections: np.ndarray  # (candidates,) delta_u in utility units
    kinds: list[KindFit]


def _ridge_with_free_columns(y: np.ndarray, free: np.ndarray, blocks: list[np.ndarray], lams: list[float]):
    """argmin ||y - free a - sum_j B_j b_j||^2 + sum_j lam_j ||b_j||^2, through the n x n dual:
    generalised least squares for ``a`` under the covariance I + sum_j B_j B_j^T / lam_j."""
    n = len(y)
    scaled = [b / math.sqrt(lam) for b, lam in zip(blocks, lams)]
    cov = np.eye(n) + sum((s @ s.T for s in scaled), np.zeros((n, n)))
    chol = np.linalg.cholesky(cov)

    def solve(rhs):
        return np.linalg.solve(chol.T, np.linalg.solve(chol, rhs))

    gram = free.T @ solve(free)
    a = np.linalg.lstsq(gram, free.T @ solve(y), rcond=None)[0]
    weighted = solve(y - free @ a)
    return a, [(s.T @ weighted) / math.sqrt(lam) for s, lam in zip(scaled, lams)]


def _fit_once(keep, y, groups: Groups, lam_scale, lam_correction):
    """(intercept, S per group, delta per candidate) on standardised utilities."""
    x = groups.features(keep)
    kinds = np.unique(groups.kind)
    kind_totals = np.stack([x[:, groups.kind == k].sum(1) for k in kinds], axis=1)
    free = np.column_stack([np.ones(len(y)), kind_totals])
    blocks, lams = ([x], [lam_scale]) if math.isfinite(lam_scale) else ([], [])
    if lam_correction is not None:
        blocks.append(keep.astype(np.float64))
        lams.append(lam_correction)
    a, b = _ridge_with_free_columns(y, free, blocks, lams)
    common = dict(zip(kinds, a[1:]))
    scales = np.array([common[k] for k in groups.kind]) + (b.pop(0) if math.isfinite(lam_scale) else 0.0)
    corrections = b[0] if lam_correction is not None else np.zeros(keep.shape[1])
    return a[0], scales, corrections


def _predict(keep, groups, intercept, scales, corrections):
    return intercept + groups.features(keep) @ scales + keep @ corrections


def fit_group_scales(
    keep: np.ndarray,
    utility: np.ndarray,
    pair: np.ndarray,
    perturbed: np.ndarray,
    groups: Groups,
    candidate_kind: np.ndarray,
    folds: int,
    seed: int,
    penalties: dict[int, tuple[float, float | None]] | None = None,
) -> GroupFit:
    """Importance of every candidate; see the module docstring.

    keep (masks, candidates) bools; utility (masks,); pair (masks,) pair ids;
    perturbed (masks, kinds) bools: which kinds each sub-model's pair perturbs;
    candidate_kind (candidates,) kind index.  ``penalties`` (per kind) skips the
    cross-validation and fits with these (a bootstrap refit does).
    """
    n_kinds = perturbed.shape[1]
    beta = np.zeros(keep.shape[1])
    scales = np.full(len(groups.kind), np.nan)
    corrections = np.zeros(keep.shape[1])
    fits = []
    for kind in range(n_kinds):
        mine = candidate_kind == kind
        if not mine.any():
            continue
        alone = perturbed[:, kind] & (perturbed.sum(1) == 1)
        rows = alone if alone.sum() >= 2 * folds else perturbed[:, kind]
        y = np.asarray(utility, dtype=np.float64)[rows]
        spread = float(y.std()) if len(y) > 1 else 0.0
        if spread == 0.0 or len(np.unique(pair[rows])) < 2 or (penalties is not None and kind not in penalties):
            continue  # nothing measured: these candidates keep beta 0 and fall back to the prior's order
        z = (y - y.mean()) / spread
        if penalties is None:
            chosen, cv = _select(keep[rows].astype(np.float64), z, pair[rows], groups, folds, seed)
        else:
            chosen, cv = (*penalties[kind], float("nan")), []
        fits.append(KindFit(kind, int(rows.sum()), chosen[0], chosen[1], chosen[2], cv))
        intercept, s, d = _fit_once(keep[rows].astype(np.float64), z, groups, *chosen[:2])
        # a scale at or below zero says keeping the group's candidates does not help: they
        # tie at zero and go first, in the prior's order, instead of in reverse prior order
        beta[mine] = (np.maximum(s, 0.0)[groups.of] * groups.weight + d)[mine] * spread
        group_kind_mask = groups.kind == kind
        scales[group_kind_mask] = s[group_kind_mask] * spread
        corrections[mine] = d[mine] * spread
    return GroupFit(beta, scales, corrections, fits)


def _select(keep, z, pair, groups, folds, seed):
    """The penalties with the least held-out squared error, except that per-unit corrections
    (thousands of parameters) must beat the best model without them by more than that
    model's standard error across folds: a lucky fold split cannot buy them, and without
    them a group's order is the prior's.  ``lam_scale`` infinite: one common scale per kind.
    Returns (lam_scale, lam_correction, cv_mse) and every score."""
    fold = folds_of(pair, min(folds, len(np.unique(pair))), seed)
    cv, scores = [], {}
    for lam_scale, lam_correction in itertools.product((math.inf, *SCALE_PENALTIES), CORRECTION_PENALTIES):
        errors = []
        for k in np.unique(fold):
            train, test = fold != k, fold == k
            fitted = _fit_once(keep[train], z[train], groups, lam_scale, lam_correction)
            errors.append(float(np.mean((_predict(keep[test], groups, *fitted) - z[test]) ** 2)))
        mse, se = float(np.mean(errors)), float(np.std(errors) / math.sqrt(len(errors)))
        cv.append({"lam_scale": lam_scale, "lam_correction": lam_correction, "cv_mse": mse})
        scores[(lam_scale, lam_correction)] = (mse, se)
    plain = min((p for p in scores if p[1] is None), key=lambda p: scores[p][0])
    corrected = min((p for p in scores if p[1] is not None), key=lambda p: scores[p][0])
    chosen = corrected if scores[corrected][0] < scores[plain][0] - scores[plain][1] else plain
    if scores[chosen][0] >= 1.0:  # no better than the mean on held-out pairs: one scale per kind
        chosen = (math.inf, None)
    return (*chosen, scores[chosen][0]), cv
