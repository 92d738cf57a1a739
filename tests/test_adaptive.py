"""Adaptive sampling: --masks-per-iter is a budget spent in rounds until the removal settles;
every round and every stopping decision is an artifact, so a run killed mid-round resumes
to the bytes of an uninterrupted one."""

from __future__ import annotations

import signal

import polars as pl

from bonsai.artifacts import file_digest
from bonsai.stages.core.options import PruneOptions
from bonsai.stages.core.plan import PrunePlan

import tiny
from tiny import PRUNE_SMALL, bonsai

ROUNDS = {"masks_per_iter": 24, "round_size": 8}
FLAGS = [*PRUNE_SMALL, "--masks-per-iter", "24", "--round-size", "8"]  # the last of a repeated flag counts


def test_the_plan_spends_the_budget_in_rounds_of_whole_pairs():
    plan = PrunePlan.of(PruneOptions(masks_per_iter=50, round_size=14, shard_size=4))
    assert plan.adaptive and plan.round_size == 16 and plan.rounds == 4
    assert [plan.round_count(r) for r in range(4)] == [16, 16, 16, 2] and plan.shards == 4 + 4 + 4 + 1
    assert not PrunePlan.of(PruneOptions(sampling="fixed")).adaptive
    assert not PrunePlan.of(PruneOptions(estimator="paper-regression")).adaptive  # its own sampling


def test_rounds_stop_when_the_decision_settles_and_use_the_budget_otherwise(zoo, corpus, tmp_path):
    lenient = tiny.prune(zoo["llama-gqa"], corpus, tmp_path / "lenient", settle_tolerance=1.0, **ROUNDS)
    strict = tiny.prune(zoo["llama-gqa"], corpus, tmp_path / "strict", settle_tolerance=0.0, **ROUNDS)
    assert [r["sub_models"] for r in lenient["iterations"]] == [16, 16]  # settles at the first judgement
    assert [r["sub_models"] for r in strict["iterations"]] == [24, 24]  # never settles: the budget
    rounds = pl.read_parquet(str(tmp_path / "strict" / "settle/*/convergence.parquet")).sort("iteration", "round")
    assert rounds["round"].to_list() == [0, 1, 2, 0, 1, 2] and rounds["settled"].to_list() == [False, False, True] * 2
    assert rounds["change_since_last_round"][0] is None and rounds["bootstrap_change"].min() >= 0
    masks = pl.read_parquet(str(tmp_path / "strict" / "masks/*/masks.parquet"))
    assert sorted(masks.filter(pl.col("iteration") == 0)["mask"].to_list()) == list(range(24))  # ids continue
    fixed = tiny.prune(zoo["llama-gqa"], corpus, tmp_path / "fixed", sampling="fixed", **ROUNDS)
    assert [r["sub_models"] for r in fixed["iterations"]] == [24, 24] and not (tmp_path / "fixed" / "settle").exists()


def test_killed_in_a_later_round_resumes_to_identical_bytes(prefect_api, zoo, corpus, tmp_path):
    reference = tiny.prune(zoo["llama-gqa"], corpus, tmp_path / "reference", settle_tolerance=0.0, **ROUNDS)
    args = tiny.prune_args(zoo["llama-gqa"], corpus, tmp_path / "run", *FLAGS, "--settle-tolerance", "0")
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
