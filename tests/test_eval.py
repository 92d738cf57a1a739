"""`bonsai eval`: perplexity, harness tasks (ours and lm-eval's own CLI), speed, report."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import polars as pl
import pytest
import torch

from bonsai.flows.eval import run_eval
from bonsai.stages.calibration import cut_windows
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.model_io import load_model, load_tokenizer
from bonsai.stages.core.nll import mean_nll
from bonsai.stages.core.options import EvalOptions

import tiny
from tiny import assert_one_line_error, bonsai


def write_task(folder, name="tiny_mc", rows=10):
    """A multiple-choice task lm-eval reads from local JSON, as a user would write one."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    with open(data, "w") as f:
        for i in range(rows):
            f.write(
                json.dumps(
                    {
                        "question": f"the model prunes {tiny.WORDS[i % 10]}",
                        "choices": ["heads", "channels", "passes", "modules"],
                        "label": i % 4,
                    }
                )
                + "\n"
            )
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n"
    )
    return folder / f"{name}.yaml"


@pytest.fixture(scope="module")
def run(zoo, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    tiny.prune(zoo["llama"], corpus, out)
    return out


@pytest.fixture(scope="module")
def evaluated(run, corpus, tmp_path_factory):
    task = write_task(tmp_path_factory.mktemp("tasks"))
    options = EvalOptions(ppl_data=str(corpus), seq_len=32, max_windows=20, tasks=(str(task),), limit=6, speed=True)
    return run_eval(str(run), options), task


def test_eval_reports_parent_and_pruned_side_by_side(run, evaluated):
    result, _ = evaluated
    out = run / "evaluation"
    table = pl.read_parquet(out / "results.parquet")
    for kind in ("perplexity", "task", "speed"):
        assert set(table.filter(pl.col("kind") == kind)["model"]) == {"parent", "pruned"}, kind
    acc = table.filter(pl.col("kind") == "task")["value"].to_list()
    assert all(0.0 <= a <= 1.0 for a in acc)
    report = (out / "report.md").read_text()
    assert "Protocol:" in report and "non-overlapping windows of 32 tokens" in report
    assert (out / "speed.png").stat().st_size > 0 and "speed-up over the parent" in report
    params = table.filter(pl.col("name") == "parameters").sort("model")["value"].to_list()
    assert params[1] < params[0]  # pruned < parent
    assert json.loads((out / "results.json").read_text()) == table.to_dicts()


def test_perplexity_matches_a_direct_computation(zoo, run, evaluated, corpus):
    table = pl.read_parquet(run / "evaluation" / "results.parquet")
    reported = table.filter(pl.col("kind") == "perplexity", pl.col("model") == "pruned")["value"].item()
    model = load_model(run / "model", torch.float32, torch.device("cpu"))
    windows, _ = cut_windows(load_tokenizer(run / "model"), str(corpus), 32, 20, joined=True)
    nll, tokens = mean_nll(model, torch.tensor(windows), 4, torch.device("cpu"))
    assert tokens == 20 * 31
    assert reported == pytest.approx(math.exp(nll), rel=1e-6)


@pytest.mark.slow  # lm-eval's CLI indexes its whole task registry first (15-25 s here)
def test_lm_eval_command_line_loads_the_pruned_model_and_agrees(run, evaluated, tmp_path):
    _, task = evaluated
    out = tmp_path / "lm_eval_out"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={run / 'model'},trust_remote_code=True,dtype=float32",
            "--tasks",
            "tiny_mc",
            "--include_path",
            str(task.parent),
            "--limit",
            "6",
            "--batch_size",
            "8",
            "--device",
            "cpu",
            "--output_path",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    files = list(out.rglob("results*.json"))
    assert files, "lm_eval wrote no results"
    theirs = json.loads(files[0].read_text())["results"]["tiny_mc"]["acc,none"]
    ours = (
        pl.read_parquet(run / "evaluation" / "results.parquet")
        .filter(pl.col("model") == "pruned", pl.col("name") == "tiny_mc/acc/none")["value"]
        .item()
    )
    assert theirs == pytest.approx(ours)


@pytest.mark.slow  # each check indexes lm-eval's whole task registry (15-25 s here)
def test_unknown_or_uncached_registered_tasks_are_one_clear_line(run, tmp_path):
    with pytest.raises(UserError, match="neither a registered lm-eval task nor a local task YAML"):
        run_eval(str(run), EvalOptions(tasks=("no_such_task_anywhere",), out=str(tmp_path / "o")))
    with pytest.raises(UserError, match="not readable from this machine"):
        run_eval(str(run), EvalOptions(tasks=("arc_easy",), limit=2, out=str(tmp_path / "o")))


def test_bad_targets_and_task_files_are_one_clear_line(run, tmp_path):
    with pytest.raises(UserError, match="the YAML file names no task"):
        (tmp_path / "empty.yaml").write_text("dataset_path: json\n")
        run_eval(str(run), EvalOptions(tasks=(str(tmp_path / "empty.yaml"),), out=str(tmp_path / "o")))
    broken = write_task(tmp_path / "broken")
    (tmp_path / "broken" / "tiny_mc.jsonl").unlink()
    with pytest.raises(UserError, match="not readable from this machine"):
        run_eval(str(run), EvalOptions(tasks=(str(broken),), limit=2, out=str(tmp_path / "o")))
    with pytest.raises(UserError, match="nothing to evaluate"):
        run_eval(str(run), EvalOptions(out=str(tmp_path / "o")))
    with pytest.raises(UserError, match="no such file or directory"):
        run_eval(str(tmp_path / "missing"), EvalOptions(speed=True))


def test_a_parent_with_another_tokenizer_is_refused(zoo, run, tmp_path):
    other = tiny.model_dir(tmp_path, "llama", vocab=300)
    with pytest.raises(UserError, match="its tokenizer differs"):
        run_eval(str(run), EvalOptions(parent=str(other), speed=True))


def test_cli_eval_publishes_prefect_artifacts(prefect_api, run, evaluated, corpus, tmp_path):
    _, task = evaluated
    result = bonsai(
        [
            "eval",
            str(run / "model"),
            "--parent",
            str(run.parent / "run" / "model"),
            "--ppl-data",
            str(corpus),
            "--seq-len",
            "32",
            "--max-windows",
            "8",
            "--tasks",
            str(task),
            "--limit",
            "4",
            "--out",
            str(tmp_path / "ev"),
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "## Perplexity" in result.stdout and (tmp_path / "ev" / "report.md").is_file()
    import httpx

    found = httpx.post(
        f"{prefect_api}/artifacts/filter",
        json={"artifacts": {"key": {"any_": ["bonsai-eval-report", "bonsai-eval-results"]}}},
    ).json()
    assert {a["key"] for a in found} == {"bonsai-eval-report", "bonsai-eval-results"}
    assert any("## Perplexity" in str(a["data"]) for a in found)
    bad = bonsai(["eval", str(run), "--parent", str(tmp_path / "nowhere"), "--speed"], tmp_path)
    assert_one_line_error(bad, "--parent")
