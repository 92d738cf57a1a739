"""`bonsai run --config run.yaml`: prune -> adapt -> export -> eval as one flow."""

from __future__ import annotations

import pytest

from bonsai.flows.chain import load_spec, run_chain

from tiny import bonsai


def run_file(tmp_path, zoo, corpus) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(f"""
prune: {{model: {zoo["llama"]}, data: {corpus}, out: run, sparsity: 0.5, prune-frac: 0.25,
         masks-per-iter: 12, calib-samples: 4, seq-len: 32, batch-size: 8, shard-size: 4, calib-pool: 32,
         cv-folds: 3, reconstruct-samples: 16}}
adapt: {{steps: 4, lora-rank: 4, lora-alpha: 16, sequences: 8, batch-size: 4, top-k: 8,
         logits-shard-size: 8, checkpoint-every: 2}}
export: {{gguf: true, type: f16}}
eval: {{ppl-data: {corpus}, seq-len: 32, max-windows: 8}}
""")
    return str(path)


def test_chain_prunes_adapts_exports_and_evaluates(zoo, corpus, tmp_path):
    spec = load_spec(run_file(tmp_path, zoo, corpus))
    assert spec.out == str((tmp_path / "run").resolve())
    result = run_chain(spec)
    assert result["prune"]["iterations"][-1]["sparsity"] >= 0.5
    assert (tmp_path / "run" / "adapted" / "model.safetensors").is_file()
    gguf = sorted(p.name for p in (tmp_path / "run" / "gguf").glob("*.gguf"))
    assert gguf == ["llama-adapted-f16.gguf", "llama-pruned-f16.gguf"]
    models = {r["model"] for r in result["eval"]["results"] if r["kind"] == "perplexity"}
    assert models == {"parent", "pruned", "adapted"}


@pytest.mark.slow
def test_bonsai_run_command(prefect_api, zoo, corpus, tmp_path):
    result = bonsai(["run", "--config", run_file(tmp_path, zoo, corpus)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "adapted model:" in result.stdout and "## Perplexity" in result.stdout
