"""GGUF export for stock llama.cpp: the blocks, metadata and tensors as specified (fast), and
llama.cpp itself running the files (slow: llama-cpp-python, built from source by CI)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bonsai.flows.executors import Inline
from bonsai.stages.core import gguf_export, gguf_tokenizer
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.families import family_for_model_type
from bonsai.stages.core.gguf_export import DUMMY_CHANNELS, Block, plan_blocks
from bonsai.stages.core.model_io import load_model
from bonsai.stages.core.units import layer_shapes

import tiny
from tiny import needs_smollm2


def test_blocks_meet_the_deci_graphs_quirks():
    # layer 0 lost every head, layer 1 every channel, layer 2 both, layer 3 both but keeps a bias
    kv, ff = [0, 2, 0, 0, 1], [40, 0, 0, 0, 7]
    blocks = plan_blocks(kv, ff, 2, [False, False, False, True, False], [False] * 5, pad=32)
    assert blocks == [
        Block(0, 1, 1, 64, True, 40),  # a zero head: layer 0 must have one; 40 channels padded to 64
        Block(1, 2, 4, DUMMY_CHANNELS, False, 0),  # heads without an MLP get a zero one
        # layer 2 is the identity: not written
        Block(3, 1, 1, DUMMY_CHANNELS, True, 0),  # its attention output bias rides on a zero head
        Block(4, 1, 2, 32, False, 7),
    ]
    unpadded = plan_blocks([1, 0], [5, 3], 1, [False, False], [False, False], pad=1)
    assert unpadded == [Block(0, 1, 1, 5, False, 5), Block(1, 0, 0, 3, False, 3)]  # no heads: head_count 0


def test_permute_matches_llamacpps_rotary_layout_per_head():
    heads, dim = 3, 4
    w = torch.arange(heads * dim * 2, dtype=torch.float32).reshape(heads * dim, 2)
    out = gguf_export.permute(w, heads)
    for h in range(heads):  # per head: rows (0, 2), (1, 3) interleaved: first half and second half paired
        rows = w[h * dim : (h + 1) * dim]
        assert torch.equal(out[h * dim : (h + 1) * dim], rows[[0, 2, 1, 3]])


@pytest.fixture(scope="module")
def pruned(zoo, tmp_path_factory):
    """Per family spec, an export of a keep-state in which layer 0 lost every head and layer 1
    every channel (tiny.awkward_state), with a repair's output biases on the qwen2 one."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for spec in ("llama-gqa", "qwen2"):
        model = load_model(zoo[spec], torch.float32, torch.device("cpu"))
        family = family_for_model_type(model.config.model_type)
        state = tiny.awkward_state(layer_shapes(model, family))
        out[spec] = (tiny.export_state(root / spec, zoo[spec], state, family, model), state)
    return out


def read(path: Path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("spec", ["llama-gqa", "qwen2"])
def test_an_f32_export_holds_each_layers_sizes_and_tensors(pruned, spec, tmp_path):
    directory, state = pruned[spec]
    out = tmp_path / "model.gguf"
    tokenizer = gguf_tokenizer.from_directory(directory, "llama")
    gguf_export.write(directory, out, "f32", tokenizer, "tiny")
    fields, tensors = read(out)
    config = json.loads((directory / "config.json").read_text())
    per_group = config["num_attention_heads"] // config["num_key_value_heads"]
    assert fields["general.architecture"] == "deci" and fields["deci.block_count"] == 3
    # layer 0 kept no head: one zero head; layer 1 kept no channel: a zero MLP of 32
    assert fields["deci.attention.head_count_kv"] == [1, len(state.groups[1]), len(state.groups[2])]
    assert fields["deci.attention.head_count"] == [1, *(len(g) * per_group for g in state.groups[1:])]
    assert fields["deci.feed_forward_length"] == [len(state.channels[0]), DUMMY_CHANNELS, len(state.channels[2])]
    assert fields["deci.attention.key_length"] == fields["deci.rope.dimension_count"] == 16
    # transformers' Qwen2 tokenizer class splits text with Qwen2's own regex, and the export keeps it
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == ("qwen2" if spec == "qwen2" else "gpt-2")
    weights = gguf_export.Weights(directory)
    assert not np.any(tensors["blk.0.attn_output.weight"].data)  # the zero head
    assert not np.any(tensors["blk.1.ffn_down.weight"].data)  # the zero MLP
    kv = len(state.groups[2])
    k = gguf_export.permute(weights.get("model.layers.2.self_attn.k_proj.weight"), kv).numpy()
    assert np.array_equal(tensors["blk.2.attn_k.weight"].data, k)
    down = weights.get("model.layers.2.mlp.down_proj.weight").numpy()
    assert np.array_equal(tensors["blk.2.ffn_down.weight"].data, down)
    if spec == "qwen2":  # q/k biases are permuted with their rows, v's is not
        qb = gguf_export.permute(weights.get("model.layers.2.self_attn.q_proj.bias"), kv * per_group).numpy()
        assert np.array_equal(tensors["blk.2.attn_q.bias"].data, qb)
        vb = weights.get("model.layers.2.self_attn.v_proj.bias").numpy()
        assert np.array_equal(tensors["blk.2.attn_v.bias"].data, vb)
    assert "output.weight" in tensors  # the tiny models do not tie their embeddings


def test_a_quantized_export_pads_mlp_widths_to_whole_blocks(pruned, tmp_path):
    directory, state = pruned["llama-gqa"]
    out = tmp_path / "model.gguf"
    gguf_export.write(directory, out, "q8_0", gguf_tokenizer.from_directory(directory, "llama"), "tiny")
    fields, tensors = read(out)
    widths = fields["deci.feed_forward_length"]
    assert all(w % 32 == 0 for w in widths) and widths[0] == math.ceil(len(state.channels[0]) / 32) * 32
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "Q8_0"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"


def test_a_tokenizer_llamacpp_cannot_name_is_refused(tmp_path, zoo):
    directory = tmp_path / "model"
    directory.mkdir()
    config = json.loads((zoo["llama"] / "tokenizer.json").read_text())
    config["pre_tokenizer"] = {"type": "Whitespace"}
    (directory / "tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="splits text in a way llama.cpp has no name for"):
        gguf_tokenizer.from_directory(directory, "llama, mistral, qwen2")


def test_bonsai_export_refuses_a_family_deci_cannot_express(zoo, corpus, tmp_path):
    run = tmp_path / "run"
    tiny.prune(zoo["phi"], corpus, run)
    result = tiny.bonsai(["export", str(run), "--gguf"], tmp_path)
    tiny.assert_one_line_error(result, "the families that export are llama, mistral, qwen2")
    assert not (run / "gguf").exists()


def test_bonsai_export_writes_a_gguf_under_the_run(zoo, corpus, tmp_path):
    run = tmp_path / "run"
    tiny.prune(zoo["llama-gqa"], corpus, run)
    result = tiny.bonsai(["export", str(run), "--gguf", "--type", "f16"], tmp_path)
    assert result.returncode == 0, result.stderr
    files = list((run / "gguf").glob("*.gguf"))
    assert [f.name for f in files] == ["llama-gqa-pruned-f16.gguf"]
    fields, tensors = read(files[0])
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "F16"
    again = tiny.bonsai(["export", str(run), "--gguf", "--type", "f16"], tmp_path)  # resumes: nothing to do
    assert again.returncode == 0 and files[0].stat().st_mtime_ns == (run / "gguf" / files[0].name).stat().st_mtime_ns


# --- llama.cpp itself -------------------------------------------------------------------------


def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (CI builds it: .ci/run)")


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["llama-gqa", "qwen2"])
def test_llamacpp_runs_the_f32_export_with_the_pruned_models_logits(pruned, spec, tmp_path):
    Llama = llama_cpp().Llama
    directory, _ = pruned[spec]
    out = tmp_path / "model.gguf"
    gguf_export.write(directory, out, "f32", gguf_tokenizer.from_directory(directory, spec), "tiny")
    model = load_model(directory, torch.float32, torch.device("cpu"))
    ids = tiny.ids_for(model, rows=1, length=24)
    with torch.no_grad():
        expected = model(input_ids=ids).logits[0].numpy()
    engine = Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    engine.eval(ids[0].tolist())
    got = np.array(engine.scores[: ids.shape[1]])
    # llama.cpp computes in float32 with its own kernels and summation order
    assert np.abs(got - expected).max() < 1e-3 * max(1.0, np.abs(expected).max())


@pytest.mark.slow
@needs_smollm2
def test_smollm2_pruned_from_its_gguf_runs_in_llamacpp(tmp_path, monkeypatch):
    """The real model end to end: pruned from its GGUF file, exported as F32 and Q8_0, run by
    llama.cpp: F32 logits equal the pruned transformers model's, Q8_0 perplexity within 1 % of
    F32's, greedy answers through the chat template equal transformers' and name Paris."""
    Llama = llama_cpp().Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bonsai.artifacts import Store
    from bonsai.flows.export import run_export
    from bonsai.stages import tiny_parent
    from bonsai.stages.core.options import ExportOptions

    monkeypatch.setenv("BONSAI_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    tiny.prune_smollm2_quickly(run, tmp_path / "texts")
    texts = tiny_parent.docs(Store(tmp_path / "texts"))  # the same store: found, not rebuilt
    files = {kind: run_export(str(run), ExportOptions(gguf=True, type=kind)) for kind in ("f32", "q8_0")}
    paths = {kind: next(iter(written.values()))["file"] for kind, written in files.items()}
    model = AutoModelForCausalLM.from_pretrained(run / "model", trust_remote_code=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    text = Path(texts.file(tiny_parent.HELDOUT_TEXT)).read_text()[:60000]
    ids = tokenizer(text)["input_ids"]
    windows = [ids[s : s + 256] for s in range(0, 15 * 256, 256)]  # 3,825 tokens scored
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(windows[:1])).logits[0].numpy()
    engines = {k: Llama(model_path=p, n_ctx=512, logits_all=True, verbose=False, n_threads=2) for k, p in paths.items()}
    nll = {}
    for kind, engine in engines.items():
        total = 0.0
        for number, window in enumerate(windows):
            engine.reset()
            engine.eval(window)
            logits = np.array(engine.scores[: len(window)], dtype=np.float64)
            if kind == "f32" and number == 0:  # llama.cpp's float32 kernels against torch's, logits up to ~43
                gap = np.abs(logits - expected)
                # measured on two repairs of the same removal: mean 0.0024 and 0.0025, largest 0.020 and
                # 0.058 (torch's own float32 against float64: largest 1e-4), every position's top token equal
                assert gap.mean() < 0.005 and gap.max() < 2e-3 * np.abs(expected).max()
                assert (logits.argmax(1) == expected.argmax(1)).mean() > 0.99
            top = logits.max(1, keepdims=True)
            logprobs = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
            total -= logprobs[np.arange(len(window) - 1), window[1:]].sum()
        nll[kind] = total / (len(windows) * 255)
    assert abs(math.exp(nll["q8_0"]) / math.exp(nll["f32"]) - 1) < 0.01  # measured: +0.23 %
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    reference = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    for kind, engine in engines.items():
        engine.reset()
        reply = engine.create_chat_completion(messages=question, max_tokens=12, temperature=0.0)
        answer = reply["choices"][0]["message"]["content"].strip()
        assert "Paris" in answer, (kind, answer)
        if kind == "f32":
            assert answer == reference


@pytest.mark.slow
def test_eval_times_parent_and_pruned_gguf_files_in_llamacpp(zoo, corpus, tmp_path):
    llama_cpp()
    from bonsai.flows.eval import run_eval
    from bonsai.stages.core.options import EvalOptions

    run = tmp_path / "run"
    tiny.prune(zoo["llama-gqa"], corpus, run)
    options = EvalOptions(speed=True, engine="llama.cpp", gguf_type="f16")
    result = run_eval(str(run), options)
    rows = {(r["model"], r["name"].split()[0]) for r in result["results"] if r["kind"] == "speed"}
    assert rows == {(model, name) for model in ("parent", "pruned") for name in ("weights", "prefill", "decode")}
    assert "## Speed and size (llama.cpp, f16 GGUF files)" in result["report"]
    assert len(list((run / "evaluation" / "gguf-file").glob("*/*.gguf"))) == 2  # parent and pruned, exported once


@pytest.mark.slow
def test_the_demo_times_parent_and_pruned_in_llamacpp(zoo, corpus, tmp_path):
    llama_cpp()
    from bonsai.flows.demo import llama_cpp_speeds, report

    run = tmp_path / "run"
    summary = tiny.prune(zoo["llama-gqa"], corpus, run)
    engine = llama_cpp_speeds(str(zoo["llama-gqa"]), summary, run, Inline())
    assert set(engine["speedups"]) == {"prefill 128", "decode"}  # 512 tokens exceed the tiny context: one length
    assert all(v > 0 for v in engine["speedups"].values())
    assert engine["files"]["pruned"] < engine["files"]["parent"]
    rows = [{"model": m, "parameters": 1, "perplexity": 1.0} for m in ("parent", "pruned")]
    text = report("tiny", summary, {"rows": rows, "speedups": {}, "answers": [], "llama_cpp": engine}, [], run)
    assert "In llama.cpp (q8_0 GGUF files" in text and "decode" in text


def test_export_of_a_run_another_process_holds_is_one_line(zoo, corpus, tmp_path):
    import subprocess
    import sys

    from bonsai.flows.export import run_export
    from bonsai.stages.core.options import ExportOptions

    run = tmp_path / "run"
    tiny.prune(zoo["llama-gqa"], corpus, run)
    hold = (
        f"from bonsai.artifacts import RunDir; import time; RunDir({str(run)!r}).lock.acquire(); "
        "print(1, flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "1"
        with pytest.raises(UserError, match=r"is in use by another bonsai process \(pid \d+\)"):
            run_export(str(run), ExportOptions(gguf=True))
    finally:
        holder.kill()
        holder.wait()
    assert not (run / "gguf").exists()
