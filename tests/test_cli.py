"""Bad input through the real command line: one clear line, exit status 2, no traceback,
nothing half-written."""

from __future__ import annotations

import json

import pytest

from bonsai.artifacts import RunLock

import tiny
from tiny import PRUNE_SMALL, assert_one_line_error, bonsai


def prune_args(model, data, out, *extra):
    return tiny.prune_args(model, data, out, *PRUNE_SMALL, *extra)


@pytest.mark.parametrize(
    "change, fragment",
    [
        (["--sparsity", "1.5"], "--sparsity must be in (0, 1), got 1.5"),
        (["--prior", "magnitude"], "argument --prior: invalid choice: 'magnitude'"),
        (["--device", "cuda:7"], "--device cuda:7: no CUDA device is available here"),
    ],
)
def test_bad_options(zoo, corpus, tmp_path, change, fragment):
    result = bonsai(prune_args(zoo["llama"], corpus, tmp_path / "run", *change), tmp_path)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "run").exists()


def test_every_command_prints_its_help():
    """Each command's --help, built from the options' schema (a help text with a "%" once broke it)."""
    import argparse
    import contextlib
    import dataclasses
    import io

    from bonsai.flows.cli import add_option_flags, build_parser
    from bonsai.stages.core.options import COMMANDS, Options, option

    for command in COMMANDS:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            build_parser().parse_args([command, "--help"])
        assert exited.value.code == 0 and "--" in out.getvalue(), command

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Share(Options):
        share: float = option(0.4, "the share kept (40 % of it)")

    parser = argparse.ArgumentParser()
    add_option_flags(parser, Share)
    assert "(40 % of it)" in " ".join(parser.format_help().split())
    assert "per device: 128 on a CPU, 200 on a GPU" in _help("prune")


def _help(command: str) -> str:
    from bonsai.flows.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return " ".join(sub.format_help().split())


def test_missing_required_flag(tmp_path):
    assert_one_line_error(bonsai(["prune", "--data", "x", "--out", "y"], tmp_path), "--model")


def test_model_problems(corpus, tmp_path):
    assert_one_line_error(
        bonsai(prune_args(tmp_path / "nope", corpus, tmp_path / "r"), tmp_path), "no such file or directory"
    )
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    assert_one_line_error(bonsai(prune_args(bert, corpus, tmp_path / "r"), tmp_path), "is not a causal language model")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (gpt2 / "model.safetensors").write_bytes(b"")
    result = bonsai(prune_args(gpt2, corpus, tmp_path / "r"), tmp_path)
    assert_one_line_error(
        result,
        "model type 'gpt2' is not supported; supported: gemma, gemma2, gemma3_text, llama, mistral, phi, qwen2, qwen3",
    )
    assert not (tmp_path / "r").exists()


def test_too_little_text_found_inside_the_flow(prefect_api, zoo, tmp_path):
    short = tiny.text_file(tmp_path, "short.txt", sentences=3)
    result = bonsai(prune_args(zoo["llama"], short, tmp_path / "run"), tmp_path)
    assert_one_line_error(result, "at least 4 windows")
    assert not (tmp_path / "run").exists()


def test_a_run_of_another_config_or_in_use_is_refused(prefect_api, zoo, corpus, tmp_path):
    out = tmp_path / "run"
    tiny.prune(zoo["llama"], corpus, out)
    other = bonsai(prune_args(zoo["llama"], corpus, out, "--seed", "1"), tmp_path)
    assert_one_line_error(other, "holds a different run (--seed: 0 there, 1 now)")
    other_model = bonsai(prune_args(zoo["qwen2"], corpus, out), tmp_path)
    assert_one_line_error(other_model, "a different --model")
    with RunLock(out):
        busy = bonsai(prune_args(zoo["llama"], corpus, out), tmp_path)
    assert_one_line_error(busy, "is in use by another bonsai process (pid")
    again = bonsai(prune_args(zoo["llama"], corpus, out), tmp_path)
    assert again.returncode == 0 and "resuming" in again.stderr
    assert "pruned model:" in again.stdout


def test_verify_rereads_every_file_and_exits_1_on_a_corruption(zoo, corpus, tmp_path):
    import os

    out = tmp_path / "run"
    tiny.prune(zoo["llama"], corpus, out)
    clean = bonsai(["verify", str(out)], tmp_path)
    assert clean.returncode == 0 and " 0 corrupted" in clean.stdout, clean.stdout + clean.stderr
    table = next(out.glob("priors/*/priors.parquet"))
    stat = table.stat()
    data = bytearray(table.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, same modification time: only a full read sees it
    table.write_bytes(bytes(data))
    os.utime(table, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    found = bonsai(["verify", str(out)], tmp_path)
    assert found.returncode == 1 and f"corrupted: priors/{table.parent.name}: priors.parquet" in found.stdout
    assert_one_line_error(bonsai(["verify", str(tmp_path)], tmp_path), "not a bonsai run directory")
