"""Adaptive sampling: --masks-per-iter is a budget spent in rounds until the removal settles;
every round and every stopping decision is an artifact, so a run killed mid-round resumes
to the bytes of an uninterrupted one."""

from __future__ import annotations

import signal

import polars as pl
import pytest

from bonsai.artifacts import file_digest
from bonsai.stages import settle
from bonsai.stages.core.options import PruneOptions
from bonsai.stages.core.plan import PrunePlan

import tiny
from tiny import PRUNE_SMALL, bonsai

ROUNDS = {"sampling": "adaptive", "masks_per_iter": 24, "round_size": 8}
FLAGS = [
    *PRUNE_SMALL,
    "--sampling",
    "adaptive",
    "--masks-per-iter",
    "24",
    "--round-size",
    "8",
]  # the last of a repeated flag counts
STRICT = {"settle_tolerance": 0.0, "settle_regret": 0.0}  # never settled before the budget is spent


def test_the_plan_spends_the_budget_in_rounds_of_whole_pairs():
    plan = PrunePlan.of(PruneOptions(sampling="adaptive", masks_per_iter=50, round_size=14, shard_size=4))
    assert plan.adaptive and plan.round_size == 16 and plan.rounds == 4
    assert [plan.round_count(r) for r in range(4)] == [16, 16, 16, 2] and plan.shards == 4 + 4 + 4 + 1
    assert not PrunePlan.of(PruneOptions()).adaptive  # fixed is the default
    assert not PrunePlan.of(
        PruneOptions(sampling="adaptive", estimator="paper-regression")
    ).adaptive  # its own sampling


def test_rounds_stop_when_the_decision_settles_and_use_the_budget_otherwise(zoo, corpus, tmp_path, monkeypatch):
    # an untrained model's utilities carry no signal the fit could find: measured() says so
    # (below); here it is taken as measured, to see each rule stop a run on its own
    monkeypatch.setattr(settle, "measured", lambda fit: True)
    lenient = tiny.prune(zoo["llama-gqa"], corpus, tmp_path / "lenient", settle_tolerance=1.0, **ROUNDS)
    assert [r["sub_models"] for r in lenient["iterations"]] == [16, 16]  # settles at the first judgement
    # any regret is below a huge threshold: settled at the first judgement, whatever the change
    priced = tiny.prune(
        zoo["llama-gqa"], corpus, tmp_path / "priced", settle_tolerance=0.0, settle_regret=1e9, **ROUNDS
    )
    assert [r["sub_models"] for r in priced["iterations"]] == [16, 16]
    strict = tiny.prune(zoo["llama-gqa"], corpus, tmp_path / "strict", **STRICT, **ROUNDS)
    assert [r["sub_models"] for r in strict["iterations"]] == [24, 24]  # never settles: the budget
    rounds = pl.read_parquet(str(tmp_path / "strict" / "settle/*/convergence.parquet")).sort("iteration", "round")
    assert rounds["round"].to_list() == [0, 1, 2, 0, 1, 2] and rounds["settled"].to_list() == [False, False, True] * 2
    assert rounds["change_since_last_round"][0] is None and rounds["bootstrap_change"].min() >= 0
    assert rounds["bootstrap_regret"].min() >= 0
    masks = pl.read_parquet(str(tmp_path / "strict" / "masks/*/masks.parquet"))
    assert sorted(masks.filter(pl.col("iteration") == 0)["mask"].to_list()) == list(range(24))  # ids continue
    fixed = tiny.prune(zoo["llama-gqa"], corpus, tmp_path / "fixed", **{**ROUNDS, "sampling": "fixed"})
    assert [r["sub_models"] for r in fixed["iterations"]] == [24, 24] and not (tmp_path / "fixed" / "settle").exists()


def test_a_fit_that_predicts_nothing_never_settles_an_iteration(zoo, corpus, tmp_path):
    """The lenient rules of the test above, without taking the fits as measured: on an untrained
    model the fits at the first judgement are no better than the mean on held-out pairs, so the
    iterations go on to the budget."""
    run = tiny.prune(zoo["llama-gqa"], corpus, tmp_path / "run", settle_tolerance=1.0, settle_regret=1e9, **ROUNDS)
    rounds = pl.read_parquet(str(tmp_path / "run" / "settle/*/convergence.parquet")).sort("iteration", "round")
    judged = rounds.filter(pl.col("round") == 1)  # the first round judged; not the last (2)
    assert judged["informative"].to_list() == [False, False] and not judged["settled"].any()
    assert [r["sub_models"] for r in run["iterations"]] == [24, 24]
    assert settle.measured({"cv_r2_head": 0.2, "cv_r2_channel": 0.01}) and settle.measured({"cv_r2_head": None})
    assert not settle.measured({"cv_r2_head": 0.2, "cv_r2_channel": -0.3})


def test_regret_prices_a_different_removal_by_the_importance_given():
    def units(*rows):
        return pl.DataFrame(rows, schema=["layer", "kind", "unit", "params"], orient="row")

    price = pl.DataFrame(
        {"layer": [0, 0, 1], "kind": ["head", "head", "channel"], "unit": [0, 1, 0], "importance": [0.5, 0.2, 0.1]}
    )
    chosen, cheaper = units((0, "head", 0, 10)), units((0, "head", 1, 10))
    assert settle.regret(chosen, cheaper, price) == pytest.approx(0.3)
    assert settle.regret(cheaper, chosen, price) == 0.0  # no loss when the chosen one is the cheaper
    assert settle.regret(chosen, units((0, "head", 1, 10), (1, "channel", 0, 1)), price) == pytest.approx(0.2)


def test_killed_in_a_later_round_resumes_to_identical_bytes(prefect_api, zoo, corpus, tmp_path):
    reference = tiny.prune(zoo["llama-gqa"], corpus, tmp_path / "reference", **STRICT, **ROUNDS)
    args = tiny.prune_args(
        zoo["llama-gqa"], corpus, tmp_path / "run", *FLAGS, "--settle-tolerance", "0", "--settle-regret", "0"
    )
    # rounds of 8 sub-models x 4 windows in batches of 8: batch 6 is inside round 1
    killed = bonsai(args, tmp_path, BONSAI_KILL_AT="evaluate-batch#6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    status = bonsai(["status", str(tmp_path / "run")], tmp_path)
    assert "of round 1 of iteration 0" in status.stdout, status.stdout
    resumed = bonsai(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert file_digest(tmp_path / "run" / "model" / "model.safetensors") == file_digest(
        f"{reference['model']}/model.safetensors"
    )
