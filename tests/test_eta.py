"""The run-wide estimate: the plan's work priced by the run's own manifests."""

from bonsai.stages.core.options import PruneOptions
from bonsai.stages.core.plan import PrunePlan
from bonsai.stages.reports import eta


def plan(**kw) -> PrunePlan:
    base = dict(sparsity=0.2, prune_frac=0.1, masks_per_iter=8, cv_folds=2, shard_size=4, calib_samples=2, seq_len=16)
    base |= dict(reconstruct_samples=16, rival="none", unit_order="estimator")  # the estimator's stages once
    base |= dict(reconstruct_publish_samples=32)
    return PrunePlan.of(PruneOptions(**{**base, **kw}))


def manifest(stage, wall, iteration=None, shard=None, masks=None):
    cfg = {} if iteration is None else {"iteration": iteration}
    if shard is not None:
        cfg["shard"] = shard
    return {"stage": stage, "config": cfg, "wall_s": wall, "info": {} if masks is None else {"masks": masks}}


def test_before_any_evaluation_only_the_work_is_known():
    p = plan()
    est = eta.estimate(p, [manifest("calibration", 2.0)])
    assert est["left_s"] is None and est["fraction_done"] is None
    assert est["iterations"] == 2 and est["sub_models"] == 16
    assert est["evaluation_tokens"] == 16 * 2 * 16
    assert "after the first evaluation shard" in eta.progress_line(est)
    assert "2 iterations" in eta.plan_line(p) and "512 evaluation tokens" in eta.plan_line(p)


def test_the_first_shard_prices_the_rest_of_the_run():
    p = plan(reconstruct="none")
    # 4 sub-models x 2 windows x 16 tokens = 128 tokens in 2 s: 64 tokens/s
    done = [manifest("priors", 1.0, 0), manifest("masks", 0.5, 0), manifest("evaluate", 2.0, 0, 0, masks=4)]
    est = eta.estimate(p, done)
    assert est["tokens_per_s"] == 64
    # left: shard 1 of iteration 0 (2 s), importance + select (never run: no tokens, 0 s),
    # iteration 1: priors 1 s, masks 0.5 s, two shards 4 s
    assert abs(est["left_s"] - (2.0 + 1.0 + 0.5 + 4.0)) < 1e-9
    assert abs(est["fraction_done"] - 3.5 / (3.5 + 7.5)) < 1e-9
    more = [*done, manifest("evaluate", 2.0, 0, 1, masks=4), manifest("importance", 0.25, 0)]
    assert eta.estimate(p, more)["left_s"] < est["left_s"]


def test_a_stage_not_run_yet_is_priced_from_the_evaluation_rate():
    p = plan(reconstruct="lsq", reconstruct_samples=4)
    est = eta.estimate(p, [manifest("evaluate", 2.0, 0, 0, masks=4)])
    repair = eta.PER_WINDOW["reconstruct"] * 4 * 16 / 64  # not yet measured: 3 s per iteration
    priors = 2 * 16 / 64
    evaluate = (8 * 2 * 16 - 128) / 64 + 8 * 2 * 16 / 64
    # the repair from the parent aimed at its stream, after the last: it replaces the last
    # iteration's own repair, which is not run
    published = eta.PER_WINDOW["reconstruct"] * 32 * eta.STREAM_AIM_COST * 16 / 64
    assert abs(est["left_s"] - (repair + 2 * priors + evaluate + published)) < 1e-9


def test_the_published_repair_is_priced_per_window_by_the_iterations_repairs():
    """--reconstruct-publish parent: one more repair after the last iteration, over its own
    windows, priced by what the iterations' repairs took per window (parent-stream: also running
    the parent's layers, STREAM_AIM_COST times that), in place of the last iteration's own
    repair; nothing once exported."""
    ran = [manifest("evaluate", 2.0, 0, 0, masks=4), manifest("reconstruct", 1.5, 0)]
    chained = eta.estimate(plan(reconstruct="lsq", reconstruct_samples=4, reconstruct_publish="chain"), ran)
    for publish, cost in (("parent", 1.0), ("parent-stream", eta.STREAM_AIM_COST)):
        p = plan(reconstruct="lsq", reconstruct_samples=4, reconstruct_publish=publish)
        assert abs(eta.estimate(p, ran)["left_s"] - chained["left_s"] - (1.5 * cost * 32 / 4 - 1.5)) < 1e-9
        assert abs(eta.estimate(p, [*ran, manifest("export", 0.1)])["left_s"] - (chained["left_s"] - 1.5)) < 1e-9


def test_the_plan_says_when_a_rival_removal_doubles_the_iteration():
    assert "flap's removal" not in eta.plan_line(plan())
    assert "also forms and repairs flap's removal" in eta.plan_line(plan(rival="flap"))
    assert "FLAP's statistics" not in eta.plan_line(plan(rival="flap"))  # the rival's line covers them
    assert "also takes FLAP's statistics" in eta.plan_line(plan(unit_order="flap"))
    assert "FLAP's statistics" not in eta.plan_line(plan())


def test_durations_read_as_a_person_would_say_them():
    assert eta.duration(30) == "1 min"
    assert eta.duration(3 * 3600 + 600) == "3 h 10 min"
    assert eta.duration(3 * 86400) == "3.0 days"


def test_a_prune_run_logs_its_plan_then_the_whole_runs_progress(zoo, corpus, tmp_path, caplog):
    import logging
    import re

    import tiny

    with caplog.at_level(logging.INFO, logger="bonsai.prune"):
        tiny.prune(zoo["llama-gqa"], corpus, tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if r.name == "bonsai.prune"]
    assert lines[0].startswith("plan: ~2 iterations to sparsity 0.5, 12 sub-models x 4 windows x 32 tokens")
    progress = [line for line in lines if line.startswith("run: ")]
    assert len(progress) == 2 * 3 + 2  # after each of 3 shards per iteration, and after each iteration
    assert all("% done, about" in line and "evaluation tokens/s" in line for line in progress)
    # the last iteration leaves the published repair from the parent (and the export), here the
    # larger part of the run: twice the iterations' windows, each costing twice as much
    assert 25 < int(re.match(r"run: (\d+) % done", progress[-1]).group(1)) < 100
