"""The pruning configuration: one frozen dataclass is the schema for CLI flags, YAML presets
and the run's identity.  Each field's metadata carries its help text and allowed values, so
`bonsai prune --help`, preset validation and this file cannot drift apart."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import UserError

PRIORS = ("wanda", "activation", "fluctuation")
ESTIMATORS = ("regression", "prior-only", "perturbed-prior", "random")
DTYPES = ("auto", "float32", "float16", "bfloat16")
PENALTIES = ("l1", "l2")

# Regularisation grids searched by cross-validation (Appendix A.1 searches a grid too).
# Utilities are standardised before fitting, so the same grid serves every model size.
DEFAULT_ALPHAS = {"l1": (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1), "l2": (0.1, 1.0, 10.0, 100.0, 1000.0)}


def _opt(default: Any, help: str, choices: tuple | None = None, identity: bool = True):
    return field(default=default, metadata={"help": help, "choices": choices, "identity": identity})


@dataclass(frozen=True)
class PruneConfig:
    sparsity: float = _opt(0.5, "target fraction of attention+MLP parameters to remove, in (0, 1)")
    masks_per_iter: int = _opt(200, "sub-models evaluated per iteration (pairs of mask and complement)")
    prune_frac: float = _opt(0.05, "p_iter: fraction of parameters removed per iteration")
    calib_samples: int = _opt(32, "calibration windows per iteration (each sub-model is scored on all)")
    seq_len: int = _opt(2048, "tokens per calibration window")
    prior: str = _opt("wanda", "prior that guides sampling", PRIORS)
    estimator: str = _opt(
        "regression",
        "how importances are estimated (the paper's Figure 2 ablations; random is a baseline)",
        ESTIMATORS,
    )
    seed: int = _opt(0, "seed of every random choice (windows, masks, CV folds)")
    device: str = _opt("auto", "torch device: auto, cpu, cuda, cuda:N", identity=False)
    dtype: str = _opt("auto", "dtype of forward passes while pruning (auto: float32 on CPU, bfloat16 on GPU)", DTYPES)
    batch_size: int = _opt(8, "rows (mask x window) per forward pass; several masks share a batch when it exceeds calib-samples")
    shard_size: int = _opt(20, "sub-models per evaluation shard: the most work a kill can lose")
    calib_pool: int = _opt(1024, "windows cut from the start of SOURCE, from which each iteration draws")
    penalty: str = _opt("l1", "regression penalty (the paper uses l1; l2 for Phi-2)", PENALTIES)
    alphas: tuple[float, ...] | None = _opt(None, "regularisation strengths to cross-validate (default: a grid per penalty)")
    cv_folds: int = _opt(5, "folds over held-out mask pairs for choosing the regularisation by Kendall tau")

    def __post_init__(self) -> None:
        _check(0.0 < self.sparsity < 1.0, f"--sparsity must be in (0, 1), got {self.sparsity}")
        _check(0.0 < self.prune_frac <= 0.5, f"--prune-frac must be in (0, 0.5], got {self.prune_frac}")
        _check(self.prune_frac <= self.sparsity, "--prune-frac must not exceed --sparsity")
        for name in ("masks_per_iter", "calib_samples", "seq_len", "batch_size", "shard_size", "calib_pool"):
            _check(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
        _check(self.masks_per_iter >= 2 * self.cv_folds or self.estimator != "regression",
               f"--masks-per-iter must be at least 2 x cv-folds ({2 * self.cv_folds}) for the regression")
        _check(self.cv_folds >= 2, "cv-folds must be at least 2")
        _check(self.calib_pool >= self.calib_samples, "calib-pool must be at least --calib-samples")
        for name in ("prior", "estimator", "dtype", "penalty"):
            choices = self.__dataclass_fields__[name].metadata["choices"]
            value = getattr(self, name)
            _check(value in choices, f"--{name} must be one of {', '.join(choices)}; got {value!r}")
        if self.alphas is not None:
            object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
            _check(len(self.alphas) > 0 and all(a >= 0 for a in self.alphas), "alphas must be non-negative")

    # derived ------------------------------------------------------------------------------
    @property
    def iterations(self) -> int:
        """ceil(p / p_iter), robust to float noise (0.5 / 0.05 is 10, not 11)."""
        return max(1, math.ceil(round(self.sparsity / self.prune_frac, 9)))

    @property
    def alpha_grid(self) -> tuple[float, ...]:
        return self.alphas if self.alphas is not None else DEFAULT_ALPHAS[self.penalty]

    def identity(self) -> dict[str, Any]:
        """The fields that change results: a run directory refuses to continue if these differ."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["identity"]}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(PruneConfig))


def read_yaml(path: str | Path, expected: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; every way it can be wrong is one UserError line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected {expected}")
    return data


def load_preset(path: str | Path) -> dict[str, Any]:
    """Read a YAML preset; keys are PruneConfig fields (dashes or underscores)."""
    return normalise_keys(read_yaml(path, "a mapping of option: value"), where=f"--config {path}")


def normalise_keys(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    known = {f.name for f in config_fields()}
    out = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(out) - known)
    if unknown:
        raise UserError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return out


def build_config(preset: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None) -> PruneConfig:
    """Defaults, then the preset, then explicit overrides (CLI flags)."""
    values = dict(preset or {})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    types = {f.name: f.type for f in config_fields()}
    for name, value in list(values.items()):
        values[name] = _coerce(name, types[name], value)
    return PruneConfig(**values)


def _coerce(name: str, kind: str, value: Any) -> Any:
    flag = f"--{name.replace('_', '-')}"
    try:
        if kind == "float":
            return float(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind == "str":
            return str(value)
        if name == "alphas":
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split()]
            return tuple(float(v) for v in value) if value is not None else None
    except (TypeError, ValueError):
        raise UserError(f"{flag}: cannot use {value!r} here") from None
    return value
