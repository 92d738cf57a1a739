"""Evaluate stage: the utility of every sampled sub-model, one shard of masks per artifact.

Rows are (mask, window) pairs in mask-major order, cut into batches of ``batch_size`` rows;
each row carries its own mask, so one forward pass scores several sub-models when a batch
is larger than the number of windows.  A shard is a separate artifact, so a kill loses at
most the shard in progress, and shards can run on different workers.

With a compensate artifact (``--sub-model-repair lsq``), each sub-model is scored as the repair
would leave it: its dropped units' inputs are imputed from the kept ones instead of zeroed
(core/compensation.py).

A sub-model whose NLL is not finite (float16 overflow, seen in the paper with few
samples) is recorded with ``finite = false`` and left to the regression to drop.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from bonsai.artifacts import ArtifactRef, Store, kill_point
from bonsai.stages import compensate as compensate_stage
from bonsai.stages import masks as masks_stage
from bonsai.stages.calibration import iteration_windows
from bonsai.stages.core.compensation import imputation
from bonsai.stages.core.model_io import PrunedModel
from bonsai.stages.core.nll import batches, row_nll
from bonsai.stages.core.progress import Progress
from bonsai.stages.core.taps import Taps, unit_priors, weight_terms
from bonsai.stages.core.units import HEAD, KINDS

VERSION = "1"
UTILITIES = "utilities.parquet"
PERTURBED_PRIORS = "perturbed_priors.parquet"


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    iteration: int
    shard: int
    shard_size: int
    seed: int
    calib_samples: int
    batch_size: int
    dtype: str
    perturbed_prior: str | None = None  # also collect this prior under each sub-model


def run(
    pruned: PrunedModel,
    calibration: ArtifactRef,
    masks: ArtifactRef,
    cfg: EvaluateConfig,
    store: Store,
    device: str = "auto",
    compensation: ArtifactRef | None = None,
) -> ArtifactRef:
    """``compensation``: the iteration's compensate artifact, to score sub-models as repaired."""

    def build(out: Path) -> dict:
        model, family, dev = pruned.load(cfg.dtype, device)
        cands, table = masks_stage.read(masks)
        first = cfg.shard * cfg.shard_size
        table = table.slice(first, cfg.shard_size)
        keep = masks_stage.keep_matrix(table)
        windows = iteration_windows(calibration, cfg.seed, cfg.iteration, cfg.calib_samples)
        result = evaluate_masks(
            model,
            family,
            windows,
            cands,
            keep,
            cfg.batch_size,
            dev,
            label=f"evaluate (iteration {cfg.iteration}, shard {cfg.shard})",
            collect=cfg.perturbed_prior,
            compensation=compensation,
        )
        nll, tokens = result["nll"], result["tokens"]
        utility = -nll / tokens
        pl.DataFrame(
            {
                "iteration": [cfg.iteration] * len(nll),
                "shard": [cfg.shard] * len(nll),
                "mask": table["mask"].to_list(),
                "nll_sum": nll.tolist(),
                "tokens": tokens.tolist(),
                "utility": utility.tolist(),
                "finite": np.isfinite(utility).tolist(),
            },
            schema={
                "iteration": pl.Int32,
                "shard": pl.Int32,
                "mask": pl.Int32,
                "nll_sum": pl.Float64,
                "tokens": pl.Int64,
                "utility": pl.Float64,
                "finite": pl.Boolean,
            },
        ).write_parquet(out / UTILITIES)
        if cfg.perturbed_prior is not None:
            pl.DataFrame(
                {
                    "candidate": cands["candidate"].to_list(),
                    "prior_sum": result["prior_sum"].tolist(),
                    "kept": result["prior_count"].tolist(),
                },
                schema={"candidate": pl.Int32, "prior_sum": pl.Float64, "kept": pl.Int64},
            ).write_parquet(out / PERTURBED_PRIORS)
        return {"masks": len(nll), "non_finite": int((~np.isfinite(utility)).sum())}

    inputs = [pruned.parent, calibration, masks, *pruned.changes]
    return store.produce("evaluate", VERSION, cfg, inputs + ([compensation] if compensation else []), build)


def full_masks(taps: Taps, cands: pl.DataFrame, keep: np.ndarray, dtype, device) -> tuple[list, list]:
    """Per layer, (masks, units) 0/1 tensors over the current units: 1 except dropped candidates."""
    count = keep.shape[0]
    heads = [torch.ones(count, s.groups, dtype=dtype) for s in taps.shapes]
    channels = [torch.ones(count, s.channels, dtype=dtype) for s in taps.shapes]
    for column, (layer, kind, position) in enumerate(cands.select("layer", "kind", "position").iter_rows()):
        target = heads if kind == HEAD else channels
        target[layer][:, position] = torch.from_numpy(keep[:, column].astype(np.float32)).to(dtype)
    return [h.to(device) for h in heads], [c.to(device) for c in channels]


class _Imputations:
    """Per sub-model and output projection, the imputation of its dropped inputs, made when its
    first row is scored and kept until its last (rows are in mask-major order)."""

    def __init__(self, compensation: ArtifactRef, taps: Taps, cands: pl.DataFrame, keep: np.ndarray, dtype, device):
        widths = {
            (layer, kind): (shape.per_group * shape.head_dim if kind == HEAD else 1)
            for layer, shape in enumerate(taps.shapes)
            for kind in KINDS
        }
        self.stats = {
            key: dataclasses.replace(
                s,
                rows=None if s.rows is None else s.rows.to(device),
                mean=None if s.mean is None else s.mean.to(device),
            )
            for key, s in compensate_stage.read(compensation, widths).items()
        }
        # per projection, the keep matrix's columns of its candidates in the statistics' unit order
        where = {
            (layer, kind, position): c
            for c, (layer, kind, position) in enumerate(cands.select("layer", "kind", "position").iter_rows())
        }
        self.columns = {key: [where[(*key, int(u))] for u in s.units.tolist()] for key, s in self.stats.items()}
        self.keep, self.dtype, self.made = keep, dtype, {}

    def rows(self, mask_of: torch.Tensor) -> dict[tuple[int, str], list]:
        """{projection: [(first row, end row, imputation)]} for a batch's rows."""
        masks = mask_of.tolist()
        for old in [m for m in self.made if m < masks[0]]:
            del self.made[old]
        out: dict[tuple[int, str], list] = {}
        for mask in dict.fromkeys(masks):
            if mask not in self.made:
                self.made[mask] = {
                    key: imputation(s, torch.from_numpy(~self.keep[mask, self.columns[key]]), self.dtype)
                    for key, s in self.stats.items()
                }
            first, end = masks.index(mask), len(masks) - masks[::-1].index(mask)
            for key, value in self.made[mask].items():
                if value is not None:
                    out.setdefault(key, []).append((first, end, value))
        return out


@torch.no_grad()
def evaluate_masks(
    model, family, windows, cands, keep, batch_size, device, label="evaluate", collect=None, compensation=None
) -> dict:
    """NLL sum and token count per mask (and the perturbed prior, when ``collect`` names one);
    with ``compensation`` (a compensate artifact) each sub-model is scored as repaired."""
    count, per_mask = keep.shape[0], windows.shape[0]
    nll = np.zeros(count, dtype=np.float64)
    tokens = np.full(count, per_mask * (windows.shape[1] - 1), dtype=np.int64)
    dtype = next(model.parameters()).dtype
    progress = Progress(label, count * per_mask, "rows")
    with Taps(model, family, stat_groups=count if collect else 0) as taps:
        heads, channels = full_masks(taps, cands, keep, dtype, device)
        imputations = _Imputations(compensation, taps, cands, keep, dtype, device) if compensation else None
        for start, stop in batches(count * per_mask, batch_size):
            rows = torch.arange(start, stop)
            mask_of, window_of = rows // per_mask, rows % per_mask
            taps.set_masks([h[mask_of] for h in heads], [c[mask_of] for c in channels])
            if imputations is not None:
                taps.imputations = imputations.rows(mask_of)
            taps.row_group = mask_of.to(device) if collect else None
            row = row_nll(model, windows[window_of].to(device)).numpy()
            np.add.at(nll, mask_of.numpy(), row)
            progress.advance(stop - start)
            kill_point("evaluate-batch")
        out = {"nll": nll, "tokens": tokens}
        if collect:
            out["prior_sum"], out["prior_count"] = _perturbed_prior(taps, cands, keep, collect, nll)
    return out


def _perturbed_prior(taps, cands, keep, metric, nll) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate: the prior summed over the finite sub-models that kept it, and how many."""
    total = np.zeros(cands.height, dtype=np.float64)
    kept = np.zeros(cands.height, dtype=np.int64)
    where = list(cands.select("layer", "kind", "position").iter_rows())
    weights = weight_terms(taps)
    for mask in range(keep.shape[0]):
        if not math.isfinite(nll[mask]):
            continue
        values = unit_priors(taps, group=mask, weights=weights)
        for column, (layer, kind, position) in enumerate(where):
            if keep[mask, column]:
                total[column] += float(values[(layer, kind)][metric][position])
                kept[column] += 1
    return total, kept
