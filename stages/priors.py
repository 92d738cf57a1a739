"""Priors stage: forward passes of the current model with activation taps.

All the priors (wanda, activation, fluctuation: Appendix F; flap: FLAP's standardised
fluctuation) come from the same statistics, so all are written and the run's ``--prior`` only
picks which one guides the sampling: the table lets an audit compare them.  The repair-aware
prior (obs) needs Gram matrices on other windows: its own stage computes it, for ``--prior obs``
only, and it joins the table here.  The unmasked utility of the current model
on this iteration's windows is recorded too, as the baseline sub-models are compared with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from bonsai.artifacts import ArtifactRef, Store, kill_point
from bonsai.stages import saliency as saliency_stage
from bonsai.stages.calibration import iteration_windows
from bonsai.stages.core.model_io import PrunedModel
from bonsai.stages.core.nll import batches, row_nll
from bonsai.stages.core.progress import Progress
from bonsai.stages.core.taps import Taps, unit_priors
from bonsai.stages.core.units import KINDS, KeepState, read_keep_state

VERSION = "2"  # 2: the flap and obs columns
FILE = "priors.parquet"
METRICS = ("wanda", "activation", "fluctuation", "flap")


@dataclass(frozen=True, kw_only=True)
class PriorsConfig:
    iteration: int
    seed: int
    calib_samples: int
    batch_size: int
    model_dtype: str


def run(
    pruned: PrunedModel,
    calibration: ArtifactRef,
    cfg: PriorsConfig,
    store: Store,
    device: str = "auto",
    saliency: ArtifactRef | None = None,
) -> ArtifactRef:
    """``saliency``: the repair-aware prior's artifact (stages/saliency.py), the column ``obs``
    (null without it)."""

    def build(out: Path) -> dict:
        model, family, dev = pruned.load(cfg.model_dtype, device)
        windows = iteration_windows(calibration, cfg.seed, cfg.iteration, cfg.calib_samples)
        progress = Progress(f"priors (iteration {cfg.iteration})", windows.shape[0], "windows")
        nll, tokens = 0.0, 0
        with Taps(model, family, stat_groups=1) as taps:
            for start, stop in batches(windows.shape[0], cfg.batch_size):
                ids = windows[start:stop].to(dev)
                nll += float(row_nll(model, ids).sum())
                tokens += ids.numel() - ids.shape[0]
                progress.advance(stop - start)
                kill_point("priors")
        values = unit_priors(taps)
        keep = read_keep_state(pruned.selection) if pruned.selection is not None else KeepState.full(taps.shapes)
        rows: dict[str, list] = {k: [] for k in ("layer", "kind", "unit", "position", "params", *METRICS)}
        for layer, shape in enumerate(taps.shapes):
            for kind in KINDS:
                metric = {m: values[(layer, kind)][m].tolist() for m in METRICS}
                for position, unit in enumerate(keep.units(kind)[layer]):
                    rows["layer"].append(layer)
                    rows["kind"].append(kind)
                    rows["unit"].append(unit)
                    rows["position"].append(position)
                    rows["params"].append(shape.params(kind))
                    for m in METRICS:
                        rows[m].append(metric[m][position])
        table = pl.DataFrame(
            rows, schema_overrides={"layer": pl.Int32, "unit": pl.Int32, "position": pl.Int32, "params": pl.Int64}
        )
        if saliency is not None:
            table = table.join(saliency_stage.read(saliency), on=["layer", "kind", "position"], how="left")
        else:  # one schema for every run
            table = table.with_columns(pl.lit(None, pl.Float64).alias(saliency_stage.METRIC))
        table.insert_column(0, pl.lit(cfg.iteration, pl.Int32).alias("iteration")).write_parquet(out / FILE)
        mean_nll = nll / max(tokens, 1)
        return {
            "model_params": sum(p.numel() for p in model.parameters()),
            "baseline_nll": mean_nll if math.isfinite(mean_nll) else None,
            "tokens": tokens,
        }

    inputs = [pruned.parent, calibration, *pruned.changes]
    return store.produce("priors", VERSION, cfg, inputs + ([saliency] if saliency is not None else []), build)


def read(priors: ArtifactRef) -> pl.DataFrame:
    return pl.read_parquet(priors.file(FILE))
