"""Reconstruct stage: after an iteration's removal, repair the kept columns of every layer's
attention-output and MLP-output projections by least squares, forward-only (the maths is in
core/reconstruction.py).

The windows come from the calibration pool but never from this iteration's evaluation
windows, so the sub-model scores are not computed on the data the repair was fitted to; the
last eighth of them only judge each update (one that does not lower that projection's
held-out output error is not applied).  The artifact holds only the repaired tensors, with
the parent indices of their units (``weights.safetensors``), and a row per projection that
lost units (``repair.parquet``); the model of any later stage is the parent sliced to the
keep-state with every earlier repair applied in order (core/model_io.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import torch
from safetensors.torch import save_file

from bonsai.artifacts import ArtifactRef, Store, kill_point
from bonsai.artifacts.digest import KEYED_OFF_DEFAULT
from bonsai.stages.calibration import draw, load_windows
from bonsai.stages.core.devices import DTYPES
from bonsai.stages.core.model_io import REPAIRS_FILE, PrunedModel, repair_tensors, shared_models
from bonsai.stages.core.reconstruction import repair
from bonsai.stages.core.rng import generator
from bonsai.stages.core.units import KINDS, KeepState, layer_shapes, read_keep_state

# 2: the layer outputs come from the MLP pass; 3: held-out errors from inputs; 4: the attention
# output completed from its pass, the windows from the widest changed projection; 5: the passes
# in the evaluation's dtype; 6: narrow passes check and complete with products of whole inputs
# (a float32 run's artifacts are byte for byte 5's); 7: the last iteration's damping (final_damping),
# and since 0.12.0 the aim, keyed only where it is not "model" (earlier artifacts stay found)
VERSION = "7"
# the stream aim's (0.14.0): its passes sliced to the kept units, whose float sums differ in their
# last bits; the model aim's passes, on weights cast once, keep 7's bytes
STREAM_VERSION = "8"
TABLE = "repair.parquet"
SCHEMA = {
    "iteration": pl.Int32,
    "layer": pl.Int32,
    "projection": pl.Utf8,
    "inputs": pl.Int64,
    "kept": pl.Int64,
    "tokens": pl.Int64,
    "damping": pl.Float64,
    "error_before": pl.Float64,
    "error_after": pl.Float64,
    "applied": pl.Boolean,
}


@dataclass(frozen=True, kw_only=True)
class ReconstructConfig:
    iteration: int
    seed: int
    reconstruct_samples: int  # windows, drawn from the pool minus the iteration's evaluation windows
    calib_samples: int  # the iteration's evaluation windows (excluded)
    reconstruct_damping: float
    batch_size: int
    model_dtype: str
    dtype: str  # the evaluation's: the layer passes run in it where it differs from model_dtype (a CPU's)
    reconstruct_fit: str  # core/reconstruction.py FITS: the kept columns, and an output bias or not
    # the last iteration's --reconstruct-final-damping (None: another iteration follows), used where
    # the fit has data enough (options.py FINAL_TOKENS_PER_COLUMN)
    final_damping: float | None = None
    # what the fit aims at (core/repair_fit.py AIMS): the published repair's --reconstruct-publish
    # parent-stream aims at the parent's stream; keyed only where it is not the model's own output
    aim: str = field(default="model", metadata={KEYED_OFF_DEFAULT: True})


def windows_for(calibration: ArtifactRef, seed: int, iteration: int, calib_samples: int, count: int) -> torch.Tensor:
    """The repair's ``count`` windows: a seeded draw from the pool without this iteration's
    ``calib_samples`` evaluation windows (the last eighth, at least one, judge the updates).
    The repair-aware prior (stages/saliency.py) takes its statistics from the same draw."""
    scored = set(draw(calibration, seed, iteration, calib_samples))
    rest = [w for w in range(int(calibration.info()["windows"])) if w not in scored]
    order = torch.randperm(len(rest), generator=generator(seed, "reconstruct", iteration)).tolist()
    return load_windows(calibration, [rest[i] for i in order[:count]])


def check_windows(samples: int) -> int:
    return max(1, samples // 8)


def run(
    pruned: PrunedModel,
    calibration: ArtifactRef,
    after: ArtifactRef,
    cfg: ReconstructConfig,
    store: Store,
    device: str = "auto",
) -> ArtifactRef:
    """Repair ``pruned`` for the removal that ``after`` (this iteration's select) made: the
    kept columns of its output projections refitted to the outputs it gave before."""

    def build(out: Path) -> dict:
        model, family, _ = pruned.load(cfg.model_dtype, device)
        shared_models().invalidate()  # its weights change in place below: the next stage loads afresh
        target = read_keep_state(after)
        before = pruned.selection
        current = read_keep_state(before) if before is not None else KeepState.full(layer_shapes(model, family))
        kept = target.positions(current)
        keep = {(layer, kind): kept.units(kind)[layer] for layer in range(len(kept.groups)) for kind in KINDS}
        count = cfg.reconstruct_samples
        # the stream aim fits the kept columns alone, to sums that join the stream as they are (not Gemma's)
        aim = cfg.aim if family.mlp_out_adds_to_residual and cfg.reconstruct_fit == "weights" else "model"
        updated, outcomes = repair(
            model,
            family,
            windows_for(calibration, cfg.seed, cfg.iteration, cfg.calib_samples, count),
            check_windows(count),
            keep,
            cfg.reconstruct_damping,
            cfg.batch_size,
            fit=cfg.reconstruct_fit,
            forward_dtype=DTYPES[cfg.dtype],
            final_damping=cfg.final_damping,
            aim=aim,
        )
        kill_point("reconstruct")
        save_file(repair_tensors(updated, target), str(out / REPAIRS_FILE))
        rows = [{"iteration": cfg.iteration, **vars(o)} for o in outcomes]
        pl.DataFrame(rows, schema=SCHEMA).write_parquet(out / TABLE)
        applied = [o for o in outcomes if o.applied]
        return {
            "projections": len(outcomes),
            "applied": len(applied),
            "tokens": max((o.tokens for o in outcomes), default=0),
            **({"aim": aim} if cfg.aim != "model" else {}),  # the aim used, where another was asked for
        }

    selection = [pruned.selection] if pruned.selection is not None else []
    inputs = [pruned.parent, calibration, after, *pruned.repairs, *selection]
    return store.produce("reconstruct", VERSION if cfg.aim == "model" else STREAM_VERSION, cfg, inputs, build)


def read(reconstruct: ArtifactRef) -> pl.DataFrame:
    return pl.read_parquet(reconstruct.file(TABLE))
