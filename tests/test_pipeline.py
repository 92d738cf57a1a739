"""`bonsai prune` end to end, in process (the same wiring the Prefect flow runs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest
import torch

from bonsai.artifacts import file_digest
from bonsai.stages.core.errors import UserError

import tiny
from tiny import SMALL

README = Path(__file__).parent.parent / "README.md"


def prune(zoo, corpus, out, spec="llama-gqa", **changes):
    return tiny.prune(zoo[spec], corpus, out, **changes)


# the finished run also writes the saliency tables (obs) and scores its sub-models as repaired
FINISHED = {"prior": "obs", "sub_model_repair": "lsq"}


@pytest.fixture(scope="module")
def finished(zoo, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    return out, prune(zoo, corpus, out, **FINISHED)


@pytest.mark.parametrize("spec", list(tiny.SPECS))
def test_each_family_reaches_the_target_and_exports(zoo, corpus, tmp_path, spec):
    from transformers import AutoModelForCausalLM

    summary = prune(zoo, corpus, tmp_path / "run", spec)
    last = summary["iterations"][-1]
    assert last["sparsity"] >= 0.5 and len(summary["iterations"]) == 2
    model = AutoModelForCausalLM.from_pretrained(summary["model"], trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == last["model_params"]
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("estimator", ["prior-only", "perturbed-prior", "random"])
def test_every_estimator_prunes(zoo, corpus, tmp_path, estimator):
    summary = prune(zoo, corpus, tmp_path / "run", estimator=estimator)
    assert summary["iterations"][-1]["sparsity"] >= 0.5
    evaluated = list((tmp_path / "run" / "evaluate").glob("*/utilities.parquet"))
    assert bool(evaluated) == (estimator == "perturbed-prior")
    # how far each removal moved from what the prior alone removes: not at all for prior-only
    jaccard = [row["prior_only_jaccard"] for row in summary["iterations"]]
    if estimator == "prior-only":
        assert jaccard == [1.0] * len(jaccard)
    else:
        assert min(jaccard) < 1.0


def readme_tables() -> list[tuple[str, list[str], set[str]]]:
    """(path pattern, columns, the columns written only under an option: "`name` (`--flag ...`)")."""
    text = README.read_text()
    section = text.split("## Auditing a run", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`RUN/"):
            optional = set(re.findall(r"`([a-z0-9_]+)` \(`--", cells[2]))
            rows.append((cells[1].strip("`")[len("RUN/") :], re.findall(r"`([a-z0-9_]+)`", cells[2]), optional))
    return rows


@pytest.fixture(scope="module")
def rivalled(zoo, corpus, tmp_path_factory):
    """A run under --rival auto with the chain of repairs published, where it settles on flap for
    the regression with the repair (float32, so its losses can be recomputed exactly)."""
    out = tmp_path_factory.mktemp("rivalled") / "run"
    # the chain of repairs published, so the published model is the last winner itself (the
    # default's repair from the parent: test_the_published_model_is_repaired_once_from_the_parent)
    return out, prune(zoo, corpus, out, rival="auto", unit_order="auto", dtype="float32", reconstruct_publish="chain")


def test_readme_documents_the_audit_tables_a_run_writes(finished, rivalled):
    tables = readme_tables()
    assert len(tables) >= 9
    for pattern, columns, optional in tables:
        # the finished run writes every table but the rival's arbitration
        out, summary = finished if list(finished[0].glob(pattern)) else rivalled
        iterations = list(range(len(summary["iterations"])))
        frame = pl.read_parquet(str(out / pattern))
        assert columns and set(columns) - optional <= set(frame.columns), pattern
        assert set(frame.columns) <= set(columns), f"{pattern}: undocumented columns"
        # the rivalled run (--unit-order flap, as auto settles there) writes the optional ones
        files = sorted(rivalled[0].glob(pattern))
        written = set().union(*(pl.read_parquet(f).columns for f in files))
        assert optional <= written, pattern
        if "iteration" in frame.columns:
            assert sorted(frame["iteration"].unique().to_list()) == iterations, pattern


def test_audit_tables_join_into_one_story(finished):
    out, summary = finished
    masks = pl.read_parquet(str(out / "masks/*/masks.parquet"))
    utilities = pl.read_parquet(str(out / "evaluate/*/utilities.parquet"))
    assert masks.join(utilities, on=["iteration", "mask"]).height == masks.height == 2 * SMALL["masks_per_iter"]
    removed = pl.read_parquet(str(out / "select/*/removed.parquet"))
    importance = pl.read_parquet(str(out / "importance/*/importance.parquet"))
    joined = removed.join(importance, on=["iteration", "layer", "kind", "unit"])
    assert joined.height == removed.height
    last = len(summary["iterations"]) - 1
    final = pl.read_parquet(str(out / "select/*/keep.parquet")).filter(pl.col("iteration") == last)
    assert final.filter(~pl.col("kept")).height == removed.height


def test_audit_shows_how_far_the_repair_aware_prior_moved_the_removal(finished, tmp_path):
    from bonsai.stages.reports.audit import REPAIR_AWARE_PLOT, audit

    out, summary = finished
    result = audit(str(out), str(tmp_path / "audit"))
    shift = result["removal_shift"]
    removed = pl.read_parquet(str(out / "select/*/removed.parquet"))
    assert shift["removed"].sum() == removed.height  # every removed unit is in one (iteration, layer, kind)
    assert (shift["wanda_overlap"] <= shift["removed"]).all() and (shift["wanda_union"] >= shift["removed"]).all()
    assert shift["predicted_error"].is_not_null().all() and (shift["predicted_error"] >= 0).all()
    assert shift["measured_error"].is_not_null().any()
    # the same count removed per group: the Jaccard is overlap / (2 count - overlap)
    jaccard = result["iterations"]["wanda_jaccard"]
    expected = shift.group_by("iteration").agg(
        (pl.col("wanda_overlap").sum() / (2 * pl.col("removed").sum() - pl.col("wanda_overlap").sum())).alias("j")
    )
    assert sorted(jaccard.to_list()) == pytest.approx(sorted(expected["j"].to_list()))
    assert jaccard.max() < 1  # the obs prior chose other units than Wanda's order somewhere
    assert str(tmp_path / "audit" / REPAIR_AWARE_PLOT) in result["plots"]


def test_rerunning_builds_nothing_and_returns_the_same(finished, zoo, corpus):
    out, summary = finished
    manifests = {p: p.stat().st_mtime_ns for p in out.glob("*/*/manifest.json")}
    again = prune(zoo, corpus, out, **FINISHED)
    assert again == summary
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*/manifest.json")} == manifests


def test_two_runs_give_the_same_bytes(finished, zoo, corpus, tmp_path):
    out, _ = finished
    prune(zoo, corpus, tmp_path / "again", **FINISHED)
    assert file_digest(out / "model" / "model.safetensors") == file_digest(tmp_path / "again/model/model.safetensors")
    for table in ("masks/*/masks.parquet", "evaluate/*/utilities.parquet", "importance/*/importance.parquet"):
        assert pl.read_parquet(str(out / table)).equals(pl.read_parquet(str(tmp_path / "again" / table)))


def test_a_different_config_on_the_same_run_is_refused(finished, zoo, corpus):
    out, _ = finished
    with pytest.raises(UserError, match=r"holds a different run \(--sparsity: 0.5 there, 0.3 now\)"):
        prune(zoo, corpus, out, **FINISHED, sparsity=0.3)


def test_too_little_data_is_refused_and_leaves_nothing(zoo, tmp_path):
    short = tiny.text_file(tmp_path, "short.txt", sentences=3)
    with pytest.raises(UserError, match="at least 4 windows"):
        tiny.prune(zoo["llama"], short, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_seq_len_beyond_the_context_is_refused(zoo, corpus, tmp_path):
    with pytest.raises(UserError, match="exceeds the model's context"):
        prune(zoo, corpus, tmp_path / "run", seq_len=4096)
    assert not (tmp_path / "run").exists()


def test_flap_ranks_every_unit_by_its_standardised_score_and_exports_its_bias(zoo, corpus, tmp_path):
    """configs/flap.yaml on the tiny parent: one iteration, every unit a candidate, the removal
    the lowest FLAP scores across layers and kinds, and the bias compensation in the export."""
    import json

    from bonsai.stages.core.options import load_preset

    preset = load_preset(Path(__file__).parent.parent / "configs" / "flap.yaml")
    summary = prune(zoo, corpus, tmp_path / "run", **{**preset, "sparsity": 0.3, "prune_frac": 0.3})
    assert len(summary["iterations"]) == 1 and summary["iterations"][0]["sparsity"] >= 0.3
    priors = pl.concat([pl.read_parquet(p) for p in (tmp_path / "run" / "priors").glob("*/priors.parquet")])
    importance = pl.read_parquet(next((tmp_path / "run" / "importance").glob("*/importance.parquet")))
    assert importance.height == priors.height  # every unit ranked
    assert importance["importance"].to_list() == priors.sort("layer", "kind", "unit")["flap"].to_list()
    removed = pl.read_parquet(next((tmp_path / "run" / "select").glob("*/removed.parquet")))
    assert (
        removed["importance"].max()
        <= importance.join(removed, on=["layer", "kind", "unit"], how="anti")["importance"].min()
    )
    config = json.loads((Path(summary["model"]) / "config.json").read_text())
    # the bias compensation gives a bias to the output projection of every kind that lost a unit
    kinds = set(removed["kind"].to_list())
    expected = [name for kind, name in (("head", "o_proj"), ("channel", "down_proj")) if kind in kinds]
    assert expected and config["bonsai_output_biases"] == expected


def test_flap_iterated_with_the_repair_ranks_each_repaired_model_afresh(zoo, corpus, tmp_path):
    """configs/flap-lsq.yaml on the tiny parent: FLAP's score is computed again on each
    iteration's repaired model, each iteration removes the lowest of it among the units still
    present, no sub-model is evaluated, and the repair refits kept columns (no bias exported)."""
    import json

    from bonsai.stages.core.options import load_preset

    preset = load_preset(Path(__file__).parent.parent / "configs" / "flap-lsq.yaml")
    preset = {**preset, "sparsity": 0.5, "prune_frac": 0.25, "calib_samples": 4}  # the tiny pool's windows
    summary = prune(zoo, corpus, tmp_path / "run", **preset)
    run = tmp_path / "run"
    assert len(summary["iterations"]) == 2 and summary["iterations"][-1]["sparsity"] >= 0.5
    assert not list(run.glob("evaluate/*/utilities.parquet"))
    # the first iteration's, and the published one (the last iteration's own would serve nothing)
    assert len(list(run.glob("reconstruct/*/repair.parquet"))) == 2

    def by_iteration(stage, file):
        table = pl.concat([pl.read_parquet(p) for p in run.glob(f"{stage}/*/{file}")])
        return {i: table.filter(pl.col("iteration") == i) for i in (0, 1)}

    priors, importance = by_iteration("priors", "priors.parquet"), by_iteration("importance", "importance.parquet")
    removed = by_iteration("select", "removed.parquet")
    for i in (0, 1):
        ranked = importance[i].sort("layer", "kind", "unit")
        assert ranked["importance"].to_list() == priors[i].sort("layer", "kind", "unit")["flap"].to_list()
        rest = ranked.join(removed[i], on=["layer", "kind", "unit"], how="anti")
        assert removed[i]["importance"].max() <= rest["importance"].min()
    # iteration 1 scores the repaired model: the units both iterations saw are scored afresh
    both = priors[0].join(priors[1], on=["layer", "kind", "unit"], suffix="_after")
    assert both.height == importance[1].height and (both["flap"] - both["flap_after"]).abs().max() > 1e-6
    config = json.loads((Path(summary["model"]) / "config.json").read_text())
    assert "bonsai_output_biases" not in config


def test_rival_keeps_the_removal_whose_repaired_model_scores_better(rivalled):
    """--rival auto (flap here): each iteration forms FLAP's removal beside the regression's,
    repairs both, and goes on with the one whose repaired model has the lower held-out loss; the
    published model is the last winner, scored on the same windows to the same loss."""
    from bonsai.artifacts import RunDir
    from bonsai.stages.arbitrate import ArbitrateConfig, judged_windows
    from bonsai.stages.calibration import iteration_windows
    from bonsai.stages.core.model_io import load_model
    from bonsai.stages.core.nll import mean_nll
    from bonsai.stages.core.plan import PrunePlan
    from bonsai.stages.reconstruct import check_windows, windows_for
    from bonsai.stages.reports.audit import iteration_table

    run, summary = rivalled
    config = json.loads((run / "run.json").read_text())["identity"]["config"]
    assert (config["rival"], config["unit_order"]) == ("flap", "flap")  # as settled
    table = pl.concat([pl.read_parquet(p) for p in run.glob("arbitrate/*/arbitrate.parquet")]).sort("iteration")
    assert table["iteration"].unique().to_list() == list(range(len(summary["iterations"])))
    for row, it in zip(summary["iterations"], table.partition_by("iteration", maintain_order=True)):
        assert sorted(it["ranking"].to_list()) == ["flap", "regression"] and it["kept"].sum() == 1
        kept = it.filter(pl.col("kept")).row(0, named=True)
        assert kept["held_out_nll"] == it["held_out_nll"].min()
        assert row["rival"]["kept"] == kept["ranking"]
        assert (row["removed_heads"], row["removed_channels"]) == (kept["removed_heads"], kept["removed_channels"])
    audited = iteration_table(run).sort("iteration")
    assert audited["kept_ranking"].to_list() == [row["rival"]["kept"] for row in summary["iterations"]]
    # two removals and two repairs per iteration
    assert len(list(run.glob("select/*/keep.parquet"))) == len(list(run.glob("reconstruct/*/repair.parquet")))
    assert len(list(run.glob("select/*/keep.parquet"))) == 2 * table["iteration"].n_unique()
    # the regression's removal of each iteration took its units within a layer in FLAP's order
    infos = [json.loads(m.read_text())["info"] for m in run.glob("select/*/manifest.json")]
    assert sum("reordered" in info for info in infos) == table["iteration"].n_unique()
    # the published model is the last iteration's winner: the same loss on the same windows
    runs = RunDir(run)
    calib = runs.store.lookup(*next(a for a in runs.lineage() if a[0] == "calibration"))
    last = table.filter((pl.col("iteration") == table["iteration"].max()) & pl.col("kept")).row(0, named=True)
    options = tiny.options(rival="flap", dtype="float32")
    judge = ArbitrateConfig(
        iteration=last["iteration"],
        seed=options.seed,
        reconstruct_samples=options.reconstruct_samples,
        calib_samples=options.calib_samples,
        judge_windows=PrunePlan.of(options).judge_windows,
        batch_size=options.batch_size,
        dtype="float32",
        rankings=("regression", "flap"),
    )
    windows = judged_windows(calib, judge)
    # never the windows the repair was fitted on, nor the evaluation's
    fitted = windows_for(calib, options.seed, last["iteration"], options.calib_samples, options.reconstruct_samples)
    scored = iteration_windows(calib, options.seed, last["iteration"], options.calib_samples)
    seen = {tuple(w) for w in fitted[: -check_windows(options.reconstruct_samples)].tolist() + scored.tolist()}
    assert windows.shape[0] > check_windows(options.reconstruct_samples)
    assert not seen & {tuple(w) for w in windows.tolist()}
    model = load_model(summary["model"], torch.float32, torch.device("cpu"))
    nll, _ = mean_nll(model, windows, options.batch_size, torch.device("cpu"))
    assert nll == pytest.approx(last["held_out_nll"], rel=1e-4)


def test_only_the_last_iterations_repairs_shrink_less(rivalled):
    """--reconstruct-final-damping reaches the last iteration's repairs (both rankings') and no
    other, in each projection with fit tokens enough per kept column (test_reconstruct.py checks
    the rule itself); the earlier repairs keep --reconstruct-damping."""
    from bonsai.stages.core.options import FINAL_TOKENS_PER_COLUMN, PruneOptions

    run, summary = rivalled
    final, damping = PruneOptions().reconstruct_final_damping, PruneOptions().reconstruct_damping
    assert final < damping
    last, finals = len(summary["iterations"]) - 1, {}
    for manifest in run.glob("reconstruct/*/manifest.json"):
        config = json.loads(manifest.read_text())["config"]
        assert config["reconstruct_damping"] == damping
        finals.setdefault(config["iteration"], []).append(config["final_damping"])
        table = pl.read_parquet(manifest.parent / "repair.parquet")
        if config["iteration"] < last:
            assert (table["damping"] == damping).all()
            continue
        enough = table["tokens"] >= FINAL_TOKENS_PER_COLUMN * table["inputs"]  # kept columns are fewer
        too_few = table["tokens"] < FINAL_TOKENS_PER_COLUMN * table["kept"]  # and at least as many as units
        assert (table["damping"].filter(enough) == final).all() and (table["damping"].filter(too_few) == damping).all()
        assert (table["damping"] == final).any()
    assert last >= 1 and finals == {it: [final if it == last else None] * 2 for it in range(last + 1)}


def test_the_published_model_is_repaired_once_from_the_parent(zoo, corpus, tmp_path):
    """--reconstruct-publish parent-stream (the default): after the iterations' chain of repairs,
    the parent sliced to the final removal is repaired once for all of it, configured as the last
    repair, and that is what is exported; the last iteration makes no repair of its own (nothing
    would use it).  With one iteration the published repair is the run's only one."""
    from bonsai.artifacts import RunDir, external_ref
    from bonsai.stages.core.model_io import PrunedModel, load_model
    from bonsai.stages.core.options import PruneOptions
    from bonsai.stages.reports.audit import repair_table

    run = tmp_path / "run"
    summary = prune(zoo, corpus, run, dtype="float32")
    last = len(summary["iterations"]) - 1
    manifests = {p.parent.name: json.loads(p.read_text()) for p in run.glob("reconstruct/*/manifest.json")}
    assert last == 1 and len(manifests) == 2
    published = manifests[summary["published_repair"]["key"]]
    final = next(
        m
        for m in (json.loads(p.read_text()) for p in run.glob("select/*/manifest.json"))
        if m["config"]["iteration"] == last
    )
    assert [i["stage"] for i in published["inputs"]] == ["parent", "calibration", "select"]
    assert published["inputs"][2]["key"] == final["key"]
    assert published["config"]["iteration"] == last
    # its own windows and damping: more windows than the run's pool holds, from a longer pool
    assert published["config"]["final_damping"] == PruneOptions().reconstruct_publish_damping
    assert published["config"]["reconstruct_samples"] == tiny.SMALL["reconstruct_publish_samples"]
    # aimed at the parent's stream (--reconstruct-publish parent-stream); the iterations' repairs
    # aim at their model's outputs, an aim their keys leave out (so 0.11.0's repairs stay found)
    assert published["config"]["aim"] == published["info"]["aim"] == "stream"
    assert all("aim" not in m["config"] for k, m in manifests.items() if k != published["key"])
    pool = json.loads((run / "calibration" / published["inputs"][1]["key"] / "manifest.json").read_text())
    assert pool["config"]["calib_pool"] == tiny.SMALL["reconstruct_publish_samples"] + tiny.SMALL["calib_samples"]
    assert pool["info"]["windows"] > tiny.SMALL["calib_pool"]
    runs_pool = [m for m in run.glob("calibration/*/windows.parquet") if m.parent.name != published["inputs"][1]["key"]]
    longer = pl.read_parquet(run / "calibration" / published["inputs"][1]["key"] / "windows.parquet")
    assert len(runs_pool) == 1 and longer.head(tiny.SMALL["calib_pool"]).equals(pl.read_parquet(runs_pool[0]))
    table = pl.read_parquet(run / "reconstruct" / summary["published_repair"]["key"] / "repair.parquet")
    fit = tiny.SMALL["reconstruct_publish_samples"] - tiny.SMALL["reconstruct_publish_samples"] // 8
    assert (table["tokens"] == fit * tiny.SMALL["seq_len"]).all()
    exported = json.loads(next(run.glob("export/*/manifest.json")).read_text())
    assert [i["key"] for i in exported["inputs"][1:]] == [final["key"], published["key"]]
    # the last iteration repairs nothing of its own: no later iteration would evaluate on it, and
    # the published repair is made from the parent whatever it is
    assert [m["config"]["iteration"] for k, m in manifests.items() if k != published["key"]] == [0]
    # the audit's repair table: the chain's repairs, and the published one for the last iteration
    table = repair_table(run)
    assert sorted(table["iteration"].unique().to_list()) == [0, 1]
    assert table.height == sum(pl.read_parquet(run / "reconstruct" / k / "repair.parquet").height for k in manifests)
    # the published model is the parent sliced to the final removal with that one repair
    ours = load_model(summary["model"], torch.float32, torch.device("cpu"))
    runs = RunDir(run)
    parent = external_ref("parent", summary["parent"], published["inputs"][0]["digest"])
    refs = [runs.store.lookup(i["stage"], i["key"]) for i in published["inputs"][1:]]
    again, _, _ = PrunedModel(parent, refs[1], (runs.store.lookup("reconstruct", published["key"]),)).load(
        "float32", "cpu"
    )
    assert all(torch.equal(w, ours.state_dict()[n]) for n, w in again.state_dict().items())
    # one iteration: its published repair is the only one made
    same = dict(reconstruct_publish="parent", reconstruct_publish_samples=tiny.SMALL["reconstruct_samples"])
    same |= dict(reconstruct_publish_damping=PruneOptions().reconstruct_final_damping)
    single = prune(zoo, corpus, tmp_path / "single", sparsity=0.25, dtype="float32", **same)
    repairs = [p.parent.name for p in (tmp_path / "single").glob("reconstruct/*/manifest.json")]
    assert len(single["iterations"]) == 1 and repairs == [single["published_repair"]["key"]]


def test_status_counts_a_rivalled_iteration_done_once_arbitrated(rivalled, tmp_path):
    """Both selects of an iteration finish before its arbitration: until that has kept one,
    `bonsai status` counts the iteration as not done."""
    import json
    import shutil

    from bonsai.stages.reports.status import run_status

    finished, summary = rivalled
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shown = run_status(str(run))
    assert shown["iterations_done"] == len(summary["iterations"])
    assert shown["sparsity"] == summary["iterations"][-1]["sparsity"]
    last = len(summary["iterations"]) - 1
    for manifest in run.glob("arbitrate/*/manifest.json"):
        if json.loads(manifest.read_text())["config"]["iteration"] == last:
            shutil.rmtree(manifest.parent)
    (run / "summary.json").unlink()
    shown = run_status(str(run))
    assert shown["iterations_done"] == last and shown["next"] == f"arbitrate of iteration {last}"


def test_rival_needs_the_repair_and_another_estimator():
    with pytest.raises(UserError, match="--reconstruct lsq"):
        tiny.options(rival="flap", reconstruct="lsq-final")
    with pytest.raises(UserError, match="would repeat"):
        tiny.options(rival="flap", estimator="flap", prior="flap")
