"""Arbitrate stage (--rival): of two removals of the same iteration, each repaired, keep the one
whose repaired model predicts held-out text better.

The estimator's ranking and a rival's (FLAP's) fail in different places: measured on SmolLM2,
FLAP's ranking with the repair after it removed whole key/value groups that the regression,
scoring sub-models with nothing repaired, never removes, and was better at 10-20 % of general
English and worse at 30 % and on Python's documentation (BENCHMARKS.md).  Neither ranking sees
what the repair will recover, so the choice is made after it, on windows neither repair was
fitted on and no evaluation scored: the repair's held-out eighth (reconstruct.check_windows)
and the pool's windows drawn after it, ``judge_windows`` in all where the pool has them
(plan.JUDGE_TOKENS: the held-out eighth alone was too few to tell the two apart).  Both
candidates are scored on the same windows, in the evaluation's dtype, so their difference is
paired.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch

from bonsai.artifacts import ArtifactRef, Store, kill_point
from bonsai.stages.core.model_io import PrunedModel
from bonsai.stages.core.nll import mean_nll
from bonsai.stages.reconstruct import check_windows, windows_for

VERSION = "1"
FILE = "arbitrate.parquet"
SCHEMA = {
    "iteration": pl.Int32,
    "ranking": pl.Utf8,
    "sparsity": pl.Float64,
    "removed_heads": pl.Int64,
    "removed_channels": pl.Int64,
    "held_out_nll": pl.Float64,
    "tokens": pl.Int64,
    "kept": pl.Boolean,
}


@dataclass(frozen=True, kw_only=True)
class ArbitrateConfig:
    iteration: int
    seed: int
    reconstruct_samples: int  # the repair's windows: those it was fitted on are not judged on
    calib_samples: int  # the iteration's evaluation windows (excluded from the repair's draw)
    judge_windows: int  # the held-out windows judged on (fewer where the pool runs out)
    batch_size: int
    dtype: str  # the evaluation's
    rankings: tuple[str, ...]  # the candidates' names, in the order they are given


def run(
    before: PrunedModel,
    calibration: ArtifactRef,
    candidates: list[tuple[ArtifactRef, ArtifactRef]],
    cfg: ArbitrateConfig,
    store: Store,
    device: str = "auto",
) -> ArtifactRef:
    """``candidates``: one (select, reconstruct) pair per name in ``cfg.rankings``, each a removal
    from ``before`` and its repair.  The artifact's ``kept`` names the winner (the first listed
    on a tie)."""
    if len(candidates) != len(cfg.rankings):
        raise ValueError("one (select, reconstruct) pair per ranking")

    def build(out: Path) -> dict:
        held = judged_windows(calibration, cfg)
        rows = []
        for name, (chosen, repaired) in zip(cfg.rankings, candidates):
            model, _, dev = before.then(chosen, repaired).load(cfg.dtype, device)
            nll, tokens = mean_nll(model, held, cfg.batch_size, dev)
            info = chosen.info()
            rows.append(
                {
                    "iteration": cfg.iteration,
                    "ranking": name,
                    "sparsity": info["sparsity"],
                    "removed_heads": info["removed_heads"],
                    "removed_channels": info["removed_channels"],
                    "held_out_nll": nll,
                    "tokens": tokens,
                }
            )
            kill_point("arbitrate")
        best = min(range(len(rows)), key=lambda i: (rows[i]["held_out_nll"], i))
        for i, row in enumerate(rows):
            row["kept"] = i == best
        pl.DataFrame(rows, schema=SCHEMA).write_parquet(out / FILE)
        kept = rows[best]
        return {
            "kept": kept["ranking"],
            "sparsity": kept["sparsity"],
            **{f"nll_{r['ranking']}": r["held_out_nll"] for r in rows},
        }

    inputs = [before.parent, calibration, *before.changes, *(ref for pair in candidates for ref in pair)]
    return store.produce("arbitrate", VERSION, cfg, inputs, build)


def judged_windows(calibration: ArtifactRef, cfg: ArbitrateConfig) -> torch.Tensor:
    """The repair's draw continued past the windows it was fitted on: its held-out eighth, then
    unused pool windows, ``judge_windows`` in all (at least the eighth)."""
    held_out = check_windows(cfg.reconstruct_samples)
    fitted = cfg.reconstruct_samples - held_out
    count = fitted + max(cfg.judge_windows, held_out)
    return windows_for(calibration, cfg.seed, cfg.iteration, cfg.calib_samples, count)[fitted:]


def winner(arbitrated: ArtifactRef, cfg: ArbitrateConfig, candidates: list[tuple[ArtifactRef, ArtifactRef]]):
    """The (select, reconstruct) pair the arbitration kept."""
    return candidates[cfg.rankings.index(arbitrated.info()["kept"])]
