"""`bonsai prune`: Algorithm 1 as a DAG of stages, wired once, run by an executor.

    calibration
    for each iteration l (until the target sparsity):
        [saliency(l)]  ->  priors(l)     (saliency: the repair-aware prior, --prior obs only)
        masks(l)  ->  [compensate(l)]  ->  evaluate(l, shard 0..k)  ->  importance(l)
                      (compensate: sub-models scored as repaired, --sub-model-repair lsq only)
        [priors(l), FLAP's]  select(l)  ->  reconstruct(l)
                      (FLAP's statistics: for --rival flap and --unit-order flap, where select
                       takes as many units per layer as the estimator chose, FLAP's lowest;
                       the repair: after every iteration, the last, or none; the last one
                       shrunk less, --reconstruct-final-damping)
        [rival(l): masks -> importance -> select -> reconstruct, from FLAP's priors; arbitrate(l)]
                      (--rival flap, auto's choice for the regression: FLAP's removal formed and
                       repaired too, the better kept)
    [reconstruct-publish]  (--reconstruct-publish parent: the parent sliced to the final
                       removal, repaired once for all of it, is what is published)
    export  ->  publish RUN/model

Every stage reads and writes the run's artifact store, so running the same command again
skips everything already done and continues with the first missing artifact.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

from bonsai.artifacts import ArtifactRef, library_changes, library_versions, write_text_atomic
from bonsai.artifacts.run import SUMMARY_FILE
from bonsai.flows.executors import Executor, Inline
from bonsai.flows.preflight import Prepared, open_run, prepare
from bonsai.stages import (
    arbitrate,
    calibration,
    compensate,
    evaluate,
    export,
    importance,
    masks,
    priors,
    reconstruct,
    saliency,
    select,
)
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.model_io import PrunedModel
from bonsai.stages.core.options import PUBLISH_AIMS, PruneOptions, stage_config
from bonsai.stages.core.plan import PrunePlan
from bonsai.stages.reports import eta
from bonsai.stages.reports.status import manifests

log = logging.getLogger("bonsai.prune")


def prune_stages(p: Prepared, execute: Executor = Inline()) -> dict:
    """The wiring of Algorithm 1.  Returns the summary also written to RUN/summary.json."""
    cfg, store, parent, device = p.config, p.run.store, p.parent, p.config.device
    plan = PrunePlan.of(cfg)
    log.info("plan: %s", eta.plan_line(plan))
    calib = execute(
        "calibration",
        calibration.run,
        parent,
        p.data,
        stage_config(calibration.CalibrationConfig, cfg),
        store,
    )
    model = PrunedModel(parent)  # the parent, then after each iteration its selection and repair
    iterations = []
    for it in range(plan.iteration_limit):
        tag = f"it{it:02d}"
        salient = None
        if plan.repair_aware_prior:  # its own pass, over the repair's windows
            salient = execute(
                f"saliency-{tag}",
                saliency.run,
                model,
                calib,
                stage_config(
                    saliency.SaliencyConfig,
                    cfg,
                    iteration=it,
                    candidate_frac=plan.candidate_frac,
                    model_dtype=p.model_dtype,
                ),
                store,
                device,
            )
        pri = execute(
            f"priors-{tag}",
            priors.run,
            model,
            calib,
            stage_config(priors.PriorsConfig, cfg, iteration=it, model_dtype=p.model_dtype),
            store,
            device,
            salient,
        )
        imp, evaluated = sample_and_fit(p, plan, it, pri, model, calib, execute)
        flap = flap_priors(p, plan, it, model, calib, execute) if plan.flap_statistics else None
        chosen = execute(
            f"select-{tag}",
            select.run,
            pri,
            imp,
            model.selection,
            stage_config(select.SelectConfig, cfg, iteration=it),
            store,
            flap if plan.unit_order == "flap" else None,
        )
        row = {**chosen.info(), **_fit_summary(imp), "sub_models": evaluated}
        last = plan.reached(row["sparsity"]) or row["candidates"] == 0
        rec = None
        if plan.repairs_after(it, last):
            rec = repair(p, it, tag, model, calib, chosen, execute, last)
        if plan.rival != "none":
            chosen, rec, arbitration = arbitrate_rival(p, plan, it, model, calib, flap, (chosen, rec), execute, last)
            row = {**chosen.info(), **_fit_summary(imp), "sub_models": evaluated, "rival": arbitration}
        if rec is not None:
            row["repaired"] = rec.info()["applied"]
        model = model.then(chosen, rec)
        iterations.append(row)
        log.info(
            "iteration %d: sparsity %.3f (target %.3f), %d heads and %d channels left",
            it,
            row["sparsity"],
            cfg.sparsity,
            row["heads_left"],
            row["channels_left"],
        )
        report_progress(p, plan)
        if plan.reached(row["sparsity"]):
            break
        if row["candidates"] == 0:
            log.warning("no units left to prune; stopping at sparsity %.3f", row["sparsity"])
            break
    if plan.publish_from_parent and model.selection is not None:
        model = repair_from_parent(p, len(iterations) - 1, model, calib, execute)
    exported = execute("export", export.run, model, export.ExportConfig(), store)
    model_dir = execute("publish", export.publish, exported, p.run.path / "model")
    summary = {
        "model": model_dir,
        "parent": parent.path,
        "config": cfg.identity(),
        "iterations": iterations,
        "result": {"stage": exported.stage, "key": exported.key},
    }
    if plan.publish_from_parent and model.repairs:  # the repair the published model carries
        summary["published_repair"] = {"stage": model.repairs[-1].stage, "key": model.repairs[-1].key}
    write_text_atomic(p.run.path / SUMMARY_FILE, json.dumps(summary, indent=1, sort_keys=True))
    return summary


def sample_and_fit(p: Prepared, plan: PrunePlan, it: int, pri, model: PrunedModel, calib, execute: Executor):
    """Masks, their evaluation and the importance fit of iteration ``it``.  Returns (the
    importance artifact select uses, sub-models evaluated)."""
    cfg, store, device = p.config, p.run.store, p.config.device
    tag = f"it{it:02d}"
    msk = execute(
        f"masks-{tag}",
        masks.run,
        pri,
        stage_config(
            masks.MasksConfig,
            cfg,
            iteration=it,
            candidate_frac=plan.candidate_frac,
            sub_models=plan.sub_models,
            design=plan.estimator.design,
        ),
        store,
    )
    compensation = None
    if plan.compensated:
        compensation = execute(
            f"compensate-{tag}",
            compensate.run,
            model,
            calib,
            msk,
            stage_config(compensate.CompensateConfig, cfg, iteration=it, model_dtype=p.model_dtype),
            store,
            device,
        )
    shard_cfgs = [
        # dtype is the evaluation's: bfloat16 where the CPU has it (devices.pruning_dtype)
        stage_config(
            evaluate.EvaluateConfig,
            cfg,
            iteration=it,
            shard=shard,
            perturbed_prior=cfg.prior if plan.estimator.perturbed_prior else None,
        )
        for shard in range(plan.shards)
    ]
    evaluations = execute.map(
        f"evaluate-{tag}",
        evaluate.run,
        [(model, calib, msk, c, store, device, compensation) for c in shard_cfgs],
        after=lambda: report_progress(p, plan),
    )
    imp = execute(
        f"importance-{tag}",
        importance.run,
        msk,
        evaluations,
        stage_config(importance.ImportanceConfig, cfg, iteration=it),
        store,
    )
    return imp, plan.sub_models


def repair(
    p: Prepared, it: int, tag: str, model: PrunedModel, calib, chosen, execute: Executor, last: bool
) -> ArtifactRef:
    """The reconstruct stage of iteration ``it``: ``model``'s kept columns refitted after the
    removal ``chosen`` made; the ``last`` iteration's may shrink less (--reconstruct-final-damping)."""
    final = p.config.reconstruct_final_damping if last else None
    cfg = stage_config(
        reconstruct.ReconstructConfig, p.config, iteration=it, model_dtype=p.model_dtype, final_damping=final
    )
    return execute(f"reconstruct-{tag}", reconstruct.run, model, calib, chosen, cfg, p.run.store, p.config.device)


def repair_from_parent(p: Prepared, last: int, model: PrunedModel, calib, execute: Executor) -> PrunedModel:
    """The published model (--reconstruct-publish parent-stream or parent): the parent sliced to
    ``model``'s selection, repaired once for the whole removal, configured as the last iteration's
    repair but for its windows and damping (--reconstruct-publish-samples, -damping) and its aim.
    Each iteration's repair fits the model before it, itself an approximation of the parent's;
    this one fits each layer's kept columns to the parent's residual stream (parent-stream) or to
    the projection's output on the repaired layers' input (parent), and no later choice rests on
    it, so it can afford more windows and less damping.  Its windows come from the run's pool where that holds
    them, else from a longer pool of its own (the same windows first: both are cut from SOURCE's start)."""
    cfg = p.config
    pool = calibration.pool_for(cfg.calib_pool, cfg.calib_samples, cfg.reconstruct_publish_samples)
    if pool > cfg.calib_pool:
        calib = execute(
            "calibration-publish",
            calibration.run,
            model.parent,
            p.data,
            replace(stage_config(calibration.CalibrationConfig, cfg), calib_pool=pool),
            p.run.store,
        )
    rec_cfg = replace(
        stage_config(reconstruct.ReconstructConfig, cfg, iteration=last, model_dtype=p.model_dtype),
        reconstruct_samples=cfg.reconstruct_publish_samples,
        final_damping=cfg.reconstruct_publish_damping,
        aim=PUBLISH_AIMS[cfg.reconstruct_publish],
    )
    parent = PrunedModel(model.parent)
    rec = execute(
        "reconstruct-publish", reconstruct.run, parent, calib, model.selection, rec_cfg, p.run.store, cfg.device
    )
    return PrunedModel(model.parent, model.selection, (rec,))


def flap_priors(p: Prepared, plan: PrunePlan, it: int, model: PrunedModel, calib, execute: Executor) -> ArtifactRef:
    """FLAP's statistics of ``model`` in iteration ``it``: the priors stage over ``plan.flap_windows``."""
    cfg = replace(
        stage_config(priors.PriorsConfig, p.config, iteration=it, model_dtype=p.model_dtype),
        calib_samples=plan.flap_windows,
    )
    return execute(f"priors-it{it:02d}-flap", priors.run, model, calib, cfg, p.run.store, p.config.device)


def arbitrate_rival(
    p: Prepared,
    plan: PrunePlan,
    it: int,
    model: PrunedModel,
    calib,
    pri: ArtifactRef,
    own,
    execute: Executor,
    last: bool,
):
    """The rival's removal of iteration ``it`` (FLAP's ranking of ``model`` from its statistics
    ``pri``, every unit a candidate, the same budget), repaired as the estimator's was; then the
    arbitrate stage.  Returns the kept (select, reconstruct) pair and the arbitration's summary."""
    cfg, store = p.config, p.run.store
    tag = f"it{it:02d}-{plan.rival}"
    msk = execute(
        f"masks-{tag}",
        masks.run,
        pri,
        masks.MasksConfig(iteration=it, candidate_frac=0.5, sub_models=0, prior=plan.rival, seed=cfg.seed),
        store,
    )
    imp = execute(
        f"importance-{tag}",
        importance.run,
        msk,
        [],
        replace(stage_config(importance.ImportanceConfig, cfg, iteration=it), estimator=plan.rival),
        store,
    )
    select_cfg = stage_config(select.SelectConfig, cfg, iteration=it)
    chosen = execute(f"select-{tag}", select.run, pri, imp, model.selection, select_cfg, store)
    rec = repair(p, it, tag, model, calib, chosen, execute, last)
    pairs = [own, (chosen, rec)]
    arb_cfg = stage_config(
        arbitrate.ArbitrateConfig,
        cfg,
        iteration=it,
        rankings=(cfg.estimator, plan.rival),
        judge_windows=plan.judge_windows,
    )
    judged = execute(f"arbitrate-it{it:02d}", arbitrate.run, model, calib, pairs, arb_cfg, store, cfg.device)
    kept_select, kept_repair = arbitrate.winner(judged, arb_cfg, pairs)
    return kept_select, kept_repair, judged.info()


def report_progress(p: Prepared, plan: PrunePlan) -> None:
    """The whole run's progress and time left, priced from its own manifests (stages/reports/eta.py)."""
    log.info("run: %s", eta.progress_line(eta.estimate(plan, manifests(p.run.path))))


def _fit_summary(imp: ArtifactRef) -> dict:
    info = imp.info()
    return {
        "cv_kendall_tau": info.get("cv_kendall_tau"),
        "alpha": info.get("alpha"),
        "non_finite": info.get("masks_non_finite", 0),
    }


def warm_up(p: Prepared) -> None:
    """What the flow's first stages need, done while a temporary Prefect server starts: the
    parent, loaded into this process's model cache, where the first stage finds it."""
    PrunedModel(p.parent).load(p.model_dtype, p.config.device)


def warn_library_changes(p: Prepared, before: dict[str, dict], changes: dict[str, list[str]]) -> None:
    """Once per resume: the finished artifacts are kept (recomputing them is the run's whole
    cost, and their numbers differ from a recomputation only in the last bits), but a run that
    mixes versions says so, and the manifests say which artifact came from which."""
    now = library_versions()
    what = "; ".join(f"{name} {', '.join(old)} there, {now[name]} here" for name, old in changes.items())
    log.warning(
        "%s was made with other library versions (%s): its %d finished artifacts are reused as they are and "
        "what is still to do is computed with the versions here (each manifest records its own); to recompute "
        "everything, prune into a new --out",
        p.run.path,
        what,
        len(before),
    )


def run_prune(model: str, data: str, out: str, config: PruneOptions, execute: Executor = Inline()) -> dict:
    """Prepare, lock, run, unlock: the whole of `bonsai prune` without Prefect."""
    return run_prepared(prepare(model, data, out, config), execute)


def run_prepared(prepared: Prepared, execute: Executor = Inline()) -> dict:
    """Lock, run, unlock, on inputs that ``prepare`` checked and fingerprinted."""
    resuming = open_run(prepared)
    before = prepared.run.store.library_versions() if resuming else {}
    changes = library_changes(before, library_versions())
    if resuming:
        log.info("resuming the run in %s", prepared.run.path)
    if changes:
        warn_library_changes(prepared, before, changes)
    try:
        summary = prune_stages(prepared, execute)
        if changes:
            made = sorted(set(prepared.run.store.library_versions()) - set(before))
            made = [m.split("/")[0] for m in made]
            stages = ", ".join(f"{s} x{made.count(s)}" for s in dict.fromkeys(made)) or "none"
            log.warning("computed in this resume, with the versions here: %s", stages)
        return summary
    except UserError:
        if not resuming:
            prepared.run.discard_if_empty()  # bad input found mid-run: leave no half-run behind
        raise
    finally:
        prepared.run.close()
