"""The prune plan: what a run will do, derived once from its options.

The flow that runs the stages, ``bonsai status`` that reports how far a run got, the
importance stage and the audit all read this one object, so they cannot disagree about how
many iterations, sub-models and shards a run has, or which estimators evaluate sub-models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bonsai.stages.core.options import PruneOptions


@dataclass(frozen=True)
class Estimator:
    name: str
    evaluates: bool  # sub-models are sampled and evaluated
    regression: bool  # importances are fitted to the sub-models' utilities
    perturbed_prior: bool  # evaluation also collects the prior under each sub-model
    design: str  # how sub-models are sampled (stages/masks.py): "half" or "split"
    summary: str
    every_unit: bool = False  # every unit is a candidate, not the bottom 2 p_iter of each group


ESTIMATORS: dict[str, Estimator] = {
    e.name: e
    for e in (
        Estimator(
            name="regression",
            evaluates=True,
            regression=True,
            perturbed_prior=False,
            design="split",
            summary="Bonsai with measured group scales: the prior's worth per (layer, kind) group and per-unit "
            "corrections, regressed from sub-models that drop varied fractions",
        ),
        Estimator(
            name="paper-regression",
            evaluates=True,
            regression=True,
            perturbed_prior=False,
            design="half",
            summary="the paper's Eq. 3: L1 regression of sub-model utilities on masks, penalty by Kendall tau",
        ),
        Estimator(
            name="perturbed-prior",
            evaluates=True,
            regression=False,
            perturbed_prior=True,
            design="half",
            summary="the prior averaged over the sampled sub-models that kept the unit (Figure 2)",
        ),
        Estimator(
            name="prior-only",
            evaluates=False,
            regression=False,
            perturbed_prior=False,
            design="half",
            summary="the prior of the unperturbed model (Figure 2)",
        ),
        Estimator(
            name="flap",
            evaluates=False,
            regression=False,
            perturbed_prior=False,
            design="half",
            summary="FLAP (An et al., AAAI 2024), the forward-only baseline: --prior flap (the fluctuation "
            "standardised over each projection's input features) ranked globally, every unit a candidate; with "
            "--reconstruct-fit bias (its bias compensation) and --prune-frac equal to --sparsity it is FLAP's "
            "whole method (configs/flap.yaml)",
            every_unit=True,
        ),
        Estimator(
            name="random",
            evaluates=False,
            regression=False,
            perturbed_prior=False,
            design="half",
            summary="a seeded uniform score: the floor any estimator must beat",
        ),
    )
}


def cumulative_target(sparsity: float, prune_frac: float, iteration: int) -> float:
    """The fraction of attention+MLP parameters gone after ``iteration``: p_iter more each
    iteration, up to the target (the select stage removes up to it)."""
    return min(sparsity, (iteration + 1) * prune_frac)


def candidate_count(group_size: int, prune_frac: float) -> int:
    """Candidates of a (layer, kind) group of ``group_size`` units: ceil(2 p_iter n)."""
    return min(group_size, math.ceil(round(2 * prune_frac * group_size, 9)))


# the stages of one iteration, in the order they run
ITERATION_STAGES = (
    "saliency",
    "priors",
    "masks",
    "compensate",
    "evaluate",
    "importance",
    "select",
    "reconstruct",
    "arbitrate",
)

# tokens over which a rival ranking's statistics are taken at the least (FLAP's preset,
# configs/flap.yaml: 64 windows of 128); more where the evaluation's windows hold more
RIVAL_TOKENS = 8192
# tokens the arbitration judges the two repaired models on at the least: measured on SmolLM2,
# the repair's 32 held-out windows of 128 tokens picked the removal that held-out text scored
# worse in two iterations of three; 256 windows agreed with it in all three (BENCHMARKS.md)
JUDGE_TOKENS = 32768


@dataclass(frozen=True)
class PrunePlan:
    sparsity: float
    prune_frac: float
    iterations: int  # ceil(p / p_iter): what the target needs
    iteration_limit: int  # more iterations run only if candidates ran short
    sub_models: int  # per iteration, mask + complement pairs
    shard_size: int
    estimator: Estimator
    reconstruct: str  # "lsq": repair after every iteration, "lsq-final": after the last, "none"
    repair_aware_prior: bool = False  # --prior obs: the saliency stage runs before the priors
    compensated: bool = False  # --sub-model-repair lsq: sub-models are scored as repaired (compensate stage)
    window_tokens: int = 0  # tokens per calibration window
    windows: int = 0  # the evaluation's windows per sub-model (and the priors' per iteration)
    repair_windows: int = 0  # the repair's (and the saliency's and compensate's) windows per iteration
    rival: str = "none"  # --rival: a second ranking per iteration, repaired, arbitrated (stages/arbitrate.py)
    unit_order: str = "estimator"  # --unit-order: flap picks the units within each layer (stages/select.py)
    flap_windows: int = 0  # the windows FLAP's statistics are taken over (for the rival and the unit order)
    judge_windows: int = 0  # the windows the arbitration scores both repaired models on
    publish_windows: int = 0  # --reconstruct-publish parent(-stream): the published repair's windows; 0: none
    publish_aimed: bool = False  # parent-stream: that repair runs each layer of the parent too

    @classmethod
    def of(cls, options: PruneOptions) -> PrunePlan:
        """The plan of options resolved for a device (``PruneOptions.for_device``)."""
        from bonsai.stages.core.options import PUBLISH_AIMS  # options.py imports this module

        budget = (options.masks_per_iter, options.calib_samples, options.seq_len, options.reconstruct_samples)
        if None in (*budget, options.reconstruct_publish_samples):
            raise ValueError("the options' budget is per device: plan options.for_device(...)")
        estimator = ESTIMATORS[options.estimator]
        iterations = max(1, math.ceil(round(options.sparsity / options.prune_frac, 9)))
        sub_models = 2 * math.ceil(options.masks_per_iter / 2) if estimator.evaluates else 0
        return cls(
            sparsity=options.sparsity,
            prune_frac=options.prune_frac,
            iterations=iterations,
            iteration_limit=2 * iterations,
            sub_models=sub_models,
            shard_size=options.shard_size,
            estimator=estimator,
            reconstruct=options.reconstruct,
            repair_aware_prior=options.prior == "obs",
            compensated=options.sub_model_repair != "none" and sub_models > 0,
            window_tokens=options.seq_len,
            windows=options.calib_samples,
            repair_windows=options.reconstruct_samples,
            rival=options.rival,
            unit_order=options.unit_order,
            flap_windows=min(options.calib_pool, max(options.calib_samples, math.ceil(RIVAL_TOKENS / options.seq_len))),
            judge_windows=math.ceil(JUDGE_TOKENS / options.seq_len),
            publish_windows=options.reconstruct_publish_samples if options.publishes_from_parent else 0,
            publish_aimed=options.publishes_from_parent and PUBLISH_AIMS[options.reconstruct_publish] == "stream",
        )

    @property
    def publish_from_parent(self) -> bool:
        """Whether one repair of the parent, after the last iteration, is what is published."""
        return self.publish_windows > 0

    @property
    def shards(self) -> int:
        """Evaluation shards per iteration."""
        return math.ceil(self.sub_models / self.shard_size)

    def shard_count(self, shard: int) -> int:
        """Sub-models in evaluation shard ``shard`` (the last one takes what is left)."""
        return min(self.shard_size, self.sub_models - shard * self.shard_size)

    @property
    def stages(self) -> tuple[str, ...]:
        """This run's stages per iteration, in order."""
        skip = {"evaluate"} if not self.estimator.evaluates else set()
        if not self.compensated:
            skip.add("compensate")
        if not self.repair_aware_prior:
            skip.add("saliency")
        if self.reconstruct != "lsq":
            skip.add("reconstruct")  # none, or only after the last iteration
        if self.rival == "none":
            skip.add("arbitrate")
        return tuple(s for s in ITERATION_STAGES if s not in skip)

    @property
    def candidate_frac(self) -> float:
        """The masks stage's p_iter: candidates are the bottom 2 p_iter of each (layer, kind)
        group, so 0.5 makes every unit one (an estimator that ranks every unit)."""
        return 0.5 if self.estimator.every_unit else self.prune_frac

    @property
    def flap_statistics(self) -> bool:
        """Whether each iteration takes FLAP's statistics of the current model (a second priors
        pass, over ``flap_windows``): for the rival's ranking or the estimator's unit order."""
        return self.rival == "flap" or self.unit_order == "flap"

    def runs_per_iteration(self, stage: str) -> int:
        """How often ``stage`` runs in one iteration: twice where a rival's removal is formed
        and repaired beside the estimator's (priors: where FLAP's statistics are taken)."""
        if stage == "priors":
            return 2 if self.flap_statistics else 1
        return 2 if self.rival != "none" and stage in ("masks", "importance", "select", "reconstruct") else 1

    def reached(self, sparsity: float) -> bool:
        return sparsity >= self.sparsity - 1e-9

    def repairs_after(self, iteration: int, last: bool) -> bool:
        """Whether the reconstruct stage runs after ``iteration`` (``last``: the final one).  Where
        the published repair from the parent follows, the last iteration's own repair would be
        used by nothing (no later iteration evaluates on it), unless a rival's arbitration judges it."""
        if last and self.publish_from_parent:
            return self.reconstruct == "lsq" and self.rival != "none"
        return self.reconstruct == "lsq" or (self.reconstruct == "lsq-final" and last)
