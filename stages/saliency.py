"""Saliency stage: the repair-aware prior (``--prior obs``) of every unit of the current model.

Per unit, the output error that removing it leaves after the least-squares repair (the maths
is in core/saliency.py), from the Gram matrices of each layer's output projections on the
windows the iteration's repair draws (never the windows the evaluation scores).  A stage of its
own, run only for ``--prior obs``: it costs one forward pass over the repair's windows, and
every other run's priors keep their keys.  The priors stage adds its column ``obs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from bonsai.artifacts import ArtifactRef, Store, kill_point
from bonsai.stages.core.model_io import PrunedModel
from bonsai.stages.core.plan import candidate_count
from bonsai.stages.core.saliency import repair_aware_priors
from bonsai.stages.reconstruct import windows_for

VERSION = "1"
FILE = "saliency.parquet"
METRIC = "obs"  # the priors table's column


@dataclass(frozen=True, kw_only=True)
class SaliencyConfig:
    iteration: int
    seed: int
    reconstruct_samples: int  # the repair's windows
    calib_samples: int  # the iteration's evaluation windows (excluded)
    reconstruct_damping: float
    reconstruct_fit: str  # with a bias (weights+bias, bias), the intercept carries the inputs' mean
    candidate_frac: float  # the masks stage's p_iter: its candidates are removed greedily
    batch_size: int
    model_dtype: str


def run(
    pruned: PrunedModel,
    calibration: ArtifactRef,
    cfg: SaliencyConfig,
    store: Store,
    device: str = "auto",
) -> ArtifactRef:
    def build(out: Path) -> dict:
        model, family, _ = pruned.load(cfg.model_dtype, device)
        windows = windows_for(calibration, cfg.seed, cfg.iteration, cfg.calib_samples, cfg.reconstruct_samples)
        values = repair_aware_priors(
            model,
            family,
            windows,
            cfg.reconstruct_damping,
            cfg.reconstruct_fit != "weights",  # centred
            cfg.batch_size,
            steps=lambda units: candidate_count(units, cfg.candidate_frac),
        )
        kill_point("saliency")
        rows = [
            {"layer": layer, "kind": kind, "position": position, METRIC: float(value)}
            for (layer, kind), per_unit in sorted(values.items())
            for position, value in enumerate(per_unit.tolist())
        ]
        schema = {"layer": pl.Int32, "kind": pl.Utf8, "position": pl.Int32, METRIC: pl.Float64}
        pl.DataFrame(rows, schema=schema).write_parquet(out / FILE)
        return {"windows": int(windows.shape[0]), "units": len(rows)}

    inputs = [pruned.parent, calibration, *pruned.changes]
    return store.produce("saliency", VERSION, cfg, inputs, build)


def read(saliency: ArtifactRef) -> pl.DataFrame:
    return pl.read_parquet(saliency.file(FILE))
