"""Module importances from (mask, utility) pairs: Eq. 3 with the Appendix A.1 model selection.

U_k ~ beta . alpha_k + c, where alpha_k is sub-model k's 0/1 keep vector over the
candidates.  The paper fits this by Adam over a grid of penalties and keeps the fit whose
held-out predictions rank sub-models best (Kendall tau).  Here scikit-learn solves each
fit exactly (Lasso by coordinate descent for l1, Ridge for l2, least squares for alpha 0)
and the same criterion picks the penalty: folds hold out whole (mask, complement) pairs,
so no pair is split between fitting and scoring.  Utilities are standardised before the
fit, so one grid of alphas suits every model; beta is returned in utility units.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Fit:
    beta: np.ndarray  # (candidates,), utility per unit kept
    intercept: float
    alpha: float
    cv_tau: float  # mean held-out Kendall tau of the chosen alpha (NaN if undefined)
    cv: list[dict]  # one row per (alpha, fold): {"alpha", "fold", "kendall_tau"}


def _model(penalty: str, alpha: float):
    # scikit-learn is imported here, not with the module: the default estimator never fits
    # these models, and the import costs every command about a second of start-up
    from sklearn.linear_model import Lasso, LinearRegression, Ridge

    if alpha == 0:
        return LinearRegression()
    if penalty == "l1":
        return Lasso(alpha=alpha, max_iter=20000, tol=1e-6, selection="cyclic")
    return Ridge(alpha=alpha)


def _fit(penalty: str, alpha: float, x: np.ndarray, y: np.ndarray):
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return _model(penalty, alpha).fit(x, y)


def folds_of(groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index per row; rows of one group (a mask and its complement) share a fold."""
    unique = np.unique(groups)
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of_group = {g: i % folds for i, g in enumerate(unique[order])}
    return np.array([fold_of_group[g] for g in groups])


def tau(predicted: np.ndarray, actual: np.ndarray) -> float:
    if len(actual) < 2 or np.ptp(predicted) == 0 or np.ptp(actual) == 0:
        return float("nan")
    from scipy.stats import kendalltau  # scipy.stats: half a second of start-up, for the audit's tau

    return float(kendalltau(predicted, actual).statistic)


def fit_importance(
    keep: np.ndarray,
    utility: np.ndarray,
    groups: np.ndarray,
    penalty: str,
    alphas: tuple[float, ...],
    folds: int,
    seed: int,
) -> Fit:
    x = keep.astype(np.float64)
    y = np.asarray(utility, dtype=np.float64)
    scale = float(y.std())
    if x.shape[1] == 0 or scale == 0.0 or len(y) < 2:
        return Fit(np.zeros(x.shape[1]), float(y.mean()) if len(y) else 0.0, float("nan"), float("nan"), [])
    z = (y - y.mean()) / scale
    fold = folds_of(groups, min(folds, len(np.unique(groups))), seed)
    cv, best_alpha, best_score, best_mean = [], None, -math.inf, float("nan")
    for alpha in sorted(alphas, reverse=True):  # strongest first: ties keep the simpler fit
        scores = []
        for k in np.unique(fold):
            train, test = fold != k, fold == k
            model = _fit(penalty, alpha, x[train], z[train])
            score = tau(model.predict(x[test]), z[test])
            cv.append({"alpha": float(alpha), "fold": int(k), "kendall_tau": score})
            scores.append(score)
        finite = [s for s in scores if not math.isnan(s)]
        mean = float(np.mean(finite)) if finite else float("nan")
        score = mean if finite else -math.inf
        if best_alpha is None or score > best_score:
            best_alpha, best_score, best_mean = alpha, score, mean
    alpha = best_alpha
    model = _fit(penalty, alpha, x, z)
    beta = np.asarray(model.coef_, dtype=np.float64) * scale
    intercept = float(model.intercept_) * scale + float(y.mean())
    return Fit(beta, intercept, float(alpha), best_mean, cv)
