"""Masks stage: which units are perturbed this iteration, and the sub-models to evaluate.

Per layer and kind, the top (1 - 2 p_iter) of the current units by prior are fixed (always
kept); the bottom 2 p_iter are the *candidates* (rounded up, so a layer with one head left
still has a candidate).  Each sampled sub-model keeps half of every group of candidates
(an odd group rounds up or down at random), chosen without replacement with probability
growing with the prior (Gumbel top-k on log prior), and is followed by its complement,
which keeps the other half (Algorithm 1, lines 4-6; complements reduce the regression's
variance, Covert & Lee 2020).

That is design ``half``, the paper's.  Design ``split`` (the default estimator's) makes how
much each group matters measurable: every pair draws, per group, a drop fraction uniform in
[0.1, 0.9] (the complement drops the rest, so the expected fraction stays one half), and every
other pair perturbs the channels alone, keeping every candidate head in both the mask and its
complement.  Under ``half`` each group's count of kept units is the same in every sub-model,
so a regression cannot tell which groups matter more; and the heads' large effects drown the
channels' small ones in sub-models that perturb both (group_scales.py says how each is fitted).
On SmolLM2-135M, one iteration to 10% with 128 sub-models: held-out perplexity 27.99 with the
prior's order, 26.76 fitting group scales on varied fractions of both kinds, 26.56 with the
split design (parent 24.40; benchmarks/ has the measurement).

Candidates also define what later stages may remove, whatever the estimator, so the
Figure 2 ablations differ only in how importance is estimated.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from bonsai.artifacts import ArtifactRef, Store
from bonsai.stages import priors as priors_stage
from bonsai.stages.core.plan import candidate_count
from bonsai.stages.core.rng import generator
from bonsai.stages.core.units import CHANNEL, HEAD

VERSION = "2"
CANDIDATES = "candidates.parquet"
MASKS = "masks.parquet"

log = logging.getLogger("bonsai.masks")


@dataclass(frozen=True, kw_only=True)
class MasksConfig:
    iteration: int
    candidate_frac: float  # candidates are the bottom 2 candidate_frac of each (layer, kind) group
    sub_models: int  # to sample (0 for estimators that evaluate none)
    prior: str
    seed: int
    design: str = "half"  # "half" (the paper's) or "split" (varied fractions, channel-only pairs)


def run(priors: ArtifactRef, cfg: MasksConfig, store: Store) -> ArtifactRef:
    def build(out: Path) -> dict:
        table = priors_stage.read(priors)
        cands = candidates(table, cfg.candidate_frac, cfg.prior)
        cands.write_parquet(out / CANDIDATES)
        gen = generator(cfg.seed, "masks", cfg.iteration)
        if cfg.design == "half":
            keep, pair, complement = sample(cands, cfg.sub_models, gen)
            table = masks_table(cfg.iteration, keep, pair, complement)
        else:
            keep, pair, complement, perturbs = sample_split(cands, cfg.sub_models, gen)
            table = masks_table(cfg.iteration, keep, pair, complement)
            table = table.with_columns(pl.Series("perturbs", perturbs, dtype=pl.Utf8))
        table.write_parquet(out / MASKS)
        return {"candidates": cands.height, "masks": int(keep.shape[0])}

    return store.produce("masks", VERSION, cfg, [priors], build)


def candidates(priors: pl.DataFrame, prune_frac: float, prior: str) -> pl.DataFrame:
    """The bottom ceil(2 p_iter n) units by prior in each (layer, kind) group of n units."""
    values = priors[prior].to_numpy()
    if not np.isfinite(values).all():
        log.warning("%d non-finite %s priors treated as 0", int((~np.isfinite(values)).sum()), prior)
    table = priors.with_columns(pl.Series("prior", np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)))
    table = table.with_columns(
        pl.col("prior").mean().over("layer", "kind").alias("group_prior_mean"),
        pl.len().over("layer", "kind").alias("group_size"),
    ).with_columns(
        pl.when(pl.col("group_prior_mean") > 0)
        .then(pl.col("prior") / pl.col("group_prior_mean"))
        .otherwise(1.0)
        .alias("prior_norm")
    )
    ranked = table.sort("layer", "kind", "prior", "unit").with_columns(
        pl.int_range(pl.len()).over("layer", "kind").alias("rank")
    )
    quota = ranked["group_size"].map_elements(lambda n: candidate_count(n, prune_frac), return_dtype=pl.Int64)
    chosen = ranked.filter(pl.col("rank") < quota).sort("layer", "kind", "unit")
    return chosen.select(
        pl.int_range(pl.len(), dtype=pl.Int32).alias("candidate"),
        "iteration",
        "layer",
        "kind",
        "unit",
        "position",
        "params",
        "prior",
        "prior_norm",
        "group_prior_mean",
    )


def sample(cands: pl.DataFrame, count: int, gen: torch.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keep bits (masks, candidates), pair id, is-complement) for ceil(count/2) pairs."""
    pairs = math.ceil(count / 2)
    n = cands.height
    keep = np.zeros((pairs, n), dtype=bool)
    if pairs and n:
        log_prior = torch.from_numpy(np.log(np.maximum(cands["prior"].to_numpy(), 1e-30)))
        groups = cands.with_row_index("i").group_by("layer", "kind", maintain_order=True).agg("i")
        for members in groups["i"].to_list():
            idx = torch.tensor(members, dtype=torch.long)
            uniform = torch.rand(pairs, len(members), generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
            keys = log_prior[idx].unsqueeze(0) - torch.log(-torch.log(uniform))
            # an odd group keeps floor or ceil of half at random, per pair: otherwise a lone
            # candidate would be kept by every mask and dropped by every complement, and all
            # such units would be perfectly collinear in the regression
            count = len(members) // 2 + (torch.rand(pairs, generator=gen) < 0.5).long() * (len(members) % 2)
            rank = keys.argsort(dim=1, descending=True).argsort(dim=1)
            chosen = rank < count.unsqueeze(1)
            keep[:, idx.numpy()] = chosen.numpy()
    both = np.empty((2 * pairs, n), dtype=bool)
    both[0::2], both[1::2] = keep, ~keep
    pair = np.repeat(np.arange(pairs), 2)
    complement = np.tile([False, True], pairs)
    return both, pair, complement


LOW, HIGH = 0.1, 0.9  # range of the per-group drop fraction of the split design


def sample_split(cands: pl.DataFrame, count: int, gen: torch.Generator):
    """(keep bits, pair id, is-complement, perturbed kinds per mask) for ceil(count/2) pairs:
    even pairs perturb channels only, odd pairs every kind; each perturbed group drops a
    fraction uniform in [LOW, HIGH] (stochastically rounded), chosen by Gumbel top-k on log
    prior as in ``sample``, and the complement flips only the perturbed candidates."""
    pairs = math.ceil(count / 2)
    n = cands.height
    kinds = cands["kind"].to_numpy()
    present = [k for k in (CHANNEL, HEAD) if (kinds == k).any()]
    scope = [present[:1] if p % 2 == 0 else present for p in range(pairs)]
    keep = np.ones((pairs, n), dtype=bool)
    flip = np.zeros((pairs, n), dtype=bool)
    log_prior = torch.from_numpy(np.log(np.maximum(cands["prior"].to_numpy(), 1e-30)))
    groups = cands.with_row_index("i").group_by("layer", "kind", maintain_order=True).agg("i")
    for members, kind in zip(groups["i"].to_list(), groups["kind"].to_list()):
        idx = torch.tensor(members, dtype=torch.long)
        size = len(members)
        fraction = LOW + (HIGH - LOW) * torch.rand(pairs, generator=gen, dtype=torch.float64)
        kept = torch.floor((1 - fraction) * size + torch.rand(pairs, generator=gen, dtype=torch.float64)).long()
        uniform = torch.rand(pairs, size, generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        keys = log_prior[idx].unsqueeze(0) - torch.log(-torch.log(uniform))
        rank = keys.argsort(dim=1, descending=True).argsort(dim=1)
        chosen = (rank < kept.clamp(0, size).unsqueeze(1)).numpy()
        active = np.array([kind in s for s in scope])
        keep[np.ix_(active, idx.numpy())] = chosen[active]
        flip[np.ix_(active, idx.numpy())] = True
    both = np.empty((2 * pairs, n), dtype=bool)
    both[0::2], both[1::2] = keep, np.where(flip, ~keep, keep)
    pair = np.repeat(np.arange(pairs), 2)
    complement = np.tile([False, True], pairs)
    perturbs = [",".join(scope[p]) for p in pair]
    return both, pair, complement, perturbs


def perturbed_kinds(masks: pl.DataFrame, kinds: tuple[str, ...]) -> np.ndarray:
    """(masks, kinds) bools: which kinds each sub-model's pair perturbs (all, under ``half``)."""
    if "perturbs" not in masks.columns:
        return np.ones((masks.height, len(kinds)), dtype=bool)
    return np.array([[k in row.split(",") for k in kinds] for row in masks["perturbs"].to_list()], dtype=bool)


def masks_table(iteration: int, keep: np.ndarray, pair: np.ndarray, complement: np.ndarray) -> pl.DataFrame:
    """One row per sub-model."""
    return pl.DataFrame(
        {
            "iteration": [iteration] * keep.shape[0],
            "mask": list(range(keep.shape[0])),
            "pair": pair.tolist(),
            "complement": complement.tolist(),
            "dropped": (~keep).sum(axis=1).tolist(),
            "keep": [row.tolist() for row in keep],
        },
        schema={
            "iteration": pl.Int32,
            "mask": pl.Int32,
            "pair": pl.Int32,
            "complement": pl.Boolean,
            "dropped": pl.Int32,
            "keep": pl.List(pl.Boolean),
        },
    )


def read(masks: ArtifactRef) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(candidates, masks) tables of a masks artifact."""
    return pl.read_parquet(masks.file(CANDIDATES)), pl.read_parquet(masks.file(MASKS))


def keep_matrix(masks: pl.DataFrame) -> np.ndarray:
    if masks.height == 0:
        return np.zeros((0, 0), dtype=bool)
    return np.array(masks["keep"].to_list(), dtype=bool)
