"""Compensate stage: what the evaluation needs to score each sub-model as the repair would
leave it (``--sub-model-repair lsq``; the maths is in core/compensation.py).

One layer-by-layer pass of the repair's own windows (never the windows the evaluation scores)
through the current model gives, per output projection that has candidates, the rows of the
damped inverse Gram matrix that belong to them (and the inputs' mean when the repair fits a
bias).  Only candidates' rows are kept: 2 p_iter of each layer's width, not its square.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bonsai.artifacts import ArtifactRef, Store, kill_point
from bonsai.stages import masks as masks_stage
from bonsai.stages.core.compensation import LayerStatistics, inverse_rows
from bonsai.stages.core.least_squares import layer_grams
from bonsai.stages.core.model_io import PrunedModel
from bonsai.stages.core.units import HEAD
from bonsai.stages.reconstruct import windows_for

VERSION = "1"
FILE = "statistics.safetensors"


@dataclass(frozen=True, kw_only=True)
class CompensateConfig:
    iteration: int
    seed: int
    reconstruct_samples: int  # the repair's windows
    calib_samples: int  # the iteration's evaluation windows (excluded)
    reconstruct_damping: float
    # weights (H^-1 rows), weights+bias (of the covariance, and the mean), bias (the mean)
    reconstruct_fit: str
    batch_size: int
    model_dtype: str


def candidate_units(masks: ArtifactRef) -> dict[tuple[int, str], list[int]]:
    """{(layer, kind): the candidates' positions, ascending} of an iteration's masks."""
    cands, _ = masks_stage.read(masks)
    out: dict[tuple[int, str], list[int]] = {}
    for layer, kind, position in cands.select("layer", "kind", "position").iter_rows():
        out.setdefault((layer, kind), []).append(position)
    return {key: sorted(value) for key, value in out.items()}


def run(
    pruned: PrunedModel,
    calibration: ArtifactRef,
    masks: ArtifactRef,
    cfg: CompensateConfig,
    store: Store,
    device: str = "auto",
) -> ArtifactRef:
    def build(out: Path) -> dict:
        model, family, _ = pruned.load(cfg.model_dtype, device)
        windows = windows_for(calibration, cfg.seed, cfg.iteration, cfg.calib_samples, cfg.reconstruct_samples)
        wanted = candidate_units(masks)
        tensors = {}
        label = f"compensate (iteration {cfg.iteration})"
        for index, shape, _, sums in layer_grams(
            model, family, windows, cfg.batch_size, label, layers={layer for layer, _ in wanted}
        ):
            for kind, acc in sums.items():
                if (index, kind) not in wanted:
                    continue
                units = torch.tensor(wanted[(index, kind)], dtype=torch.long)
                width = shape.per_group * shape.head_dim if kind == HEAD else 1
                stats = LayerStatistics(units, width, None, None)
                name = f"{index}.{kind}"
                tensors[f"{name}.units"] = units
                if cfg.reconstruct_fit != "weights":
                    tensors[f"{name}.mean"] = (acc.total / max(acc.tokens, 1)).float()
                if cfg.reconstruct_fit != "bias":
                    gram = acc.gram_matrix(centred=cfg.reconstruct_fit == "weights+bias")
                    rows = inverse_rows(gram, cfg.reconstruct_damping, stats.columns(units))
                    tensors[f"{name}.rows"] = rows.float().cpu()
            kill_point("compensate")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(out / FILE))
        return {"windows": int(windows.shape[0]), "projections": sum(k.endswith(".units") for k in tensors)}

    inputs = [pruned.parent, calibration, masks, *pruned.changes]
    return store.produce("compensate", VERSION, cfg, inputs, build)


def read(compensation: ArtifactRef, widths: dict[tuple[int, str], int]) -> dict[tuple[int, str], LayerStatistics]:
    """{(layer, kind): statistics}; ``widths`` gives each projection's input columns per unit."""
    tensors = load_file(str(compensation.file(FILE)))
    out = {}
    for key in tensors:
        if not key.endswith(".units"):
            continue
        name = key.removesuffix(".units")
        layer, kind = name.split(".")
        width = widths[(int(layer), kind)]
        out[(int(layer), kind)] = LayerStatistics(
            tensors[key], width, tensors.get(f"{name}.rows"), tensors.get(f"{name}.mean")
        )
    return out
