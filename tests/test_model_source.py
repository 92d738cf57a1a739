"""Real models in: GGUF files and hub ids resolve to the same local directories that every
stage works on; bad ones are one line and exit 2, with nothing left behind."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bonsai.artifacts import file_digest
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.model_io import load_model, load_tokenizer
from bonsai.stages.core.model_source import resolve

import tiny
from tiny import CHAT_TEMPLATE, assert_one_line_error, bonsai


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tiny LLaMA with tied embeddings, as a directory and as a GGUF file of it."""
    root = tmp_path_factory.mktemp("gguf")
    directory = tiny.model_dir(root, "llama-gqa", tie_word_embeddings=True)
    return directory, tiny.gguf_file(root / "tiny-llama.gguf", directory)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BONSAI_CACHE", str(tmp_path / "cache"))


def test_a_gguf_file_becomes_the_same_model_with_its_tokenizer_and_chat_template(tied):
    directory, gguf = tied
    source = resolve(gguf)
    assert source.kind == "gguf" and source.file_digest == file_digest(gguf)
    original = load_model(directory, torch.float32, torch.device("cpu"))
    converted = load_model(source.path, torch.float32, torch.device("cpu"))
    ids = tiny.ids_for(original)
    with torch.no_grad():
        assert torch.allclose(original(input_ids=ids).logits, converted(input_ids=ids).logits, atol=1e-5)
    text = "the parent stays frozen."
    assert load_tokenizer(source.path)(text)["input_ids"] == load_tokenizer(directory)(text)["input_ids"]
    assert load_tokenizer(source.path).chat_template == CHAT_TEMPLATE
    assert resolve(gguf).path == source.path  # converted once, then found in the cache
    assert resolve(gguf.parent / "tiny-llama.gguf").path == source.path


def test_a_gemma3_gguf_file_becomes_the_same_model(tmp_path):
    """GGUF architecture ``gemma3`` reads as transformers' ``gemma3_text`` (the pattern of
    sliding layers and the local RoPE base are not in the file: llama.cpp's defaults are
    Gemma 3's, so the tiny model keeps them)."""
    directory = tiny.model_dir(
        tmp_path, "gemma3", tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window_pattern=6
    )
    source = resolve(tiny.gemma3_gguf_file(tmp_path / "tiny-gemma3.gguf", directory))
    original = load_model(directory, torch.float32, torch.device("cpu"))
    converted = load_model(source.path, torch.float32, torch.device("cpu"))
    assert converted.config.model_type == "gemma3_text"
    ids = tiny.ids_for(original)
    with torch.no_grad():
        assert torch.allclose(original(input_ids=ids).logits, converted(input_ids=ids).logits, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Cannot enable progress bars")  # huggingface_hub's, under the tests' setting
def test_loading_and_saving_draw_no_progress_bar_and_leave_the_setting_as_it_was(tied, capfd, tmp_path):
    from transformers.utils import logging as hf_logging

    from bonsai.stages.core.model_io import no_progress_bars

    directory, _ = tied
    hf_logging.enable_progress_bar()  # the tests' environment turns bars off; a user's has them on
    try:
        model = load_model(directory, torch.float32, torch.device("cpu"))
        with no_progress_bars():
            model.save_pretrained(tmp_path / "saved")
        err = capfd.readouterr().err
        assert "Loading weights" not in err and "Writing model shards" not in err
        assert hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.disable_progress_bar()


def test_a_gguf_conversion_reports_progress_as_lines_not_a_bar(tied, capfd, caplog):
    _, gguf = tied
    with caplog.at_level("INFO", logger="bonsai.progress"):
        resolve(gguf)
    assert "de-quantizing" not in capfd.readouterr().err  # transformers' own bar
    lines = [r.getMessage() for r in caplog.records if r.name == "bonsai.progress"]
    assert lines and lines[-1].startswith("converting GGUF tensors: ") and "(100%)" in lines[-1]
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from tqdm.auto import tqdm

    assert gguf_utils.tqdm is tqdm  # put back


def test_pruning_a_gguf_file_exports_a_plain_tied_model_with_the_chat_template(tied, corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, gguf = tied
    summary = tiny.prune(gguf, corpus, tmp_path / "run")
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())
    assert recorded["described"]["model"] == str(gguf)
    assert recorded["described"]["model_file_sha256"] == file_digest(gguf)
    export = summary["model"]
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(export)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "prune"}], add_generation_prompt=False, return_dict=True, return_tensors="pt"
    )
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4


def test_a_changed_gguf_file_is_a_different_run(tied, corpus, tmp_path):
    directory, _ = tied
    changed = tiny.gguf_file(tmp_path / "m.gguf", directory)
    tiny.prune(changed, corpus, tmp_path / "run")
    other = tiny.model_dir(tmp_path / "other", "llama-gqa", seed=5, tie_word_embeddings=True)
    tiny.gguf_file(changed, other)  # same name, new content
    with pytest.raises(UserError, match="a different --model"):
        tiny.prune(changed, corpus, tmp_path / "run")


def test_hub_ids_resolve_from_the_local_cache(tied, monkeypatch, tmp_path):
    import huggingface_hub.constants

    directory, gguf = tied
    cache = tiny.hub_cache(tmp_path / "hub", "acme/tiny", directory, commit="a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    source = resolve("acme/tiny")
    assert source.kind == "hub" and file_digest(f"{source.path}/model.safetensors") == file_digest(
        directory / "model.safetensors"
    )
    assert resolve("acme/tiny@" + "a" * 40).path == source.path
    only_gguf = tmp_path / "only-gguf"
    only_gguf.mkdir()
    (only_gguf / gguf.name).write_bytes(gguf.read_bytes())
    tiny.hub_cache(tmp_path / "hub", "acme/tiny-gguf", only_gguf)
    from_hub = resolve("acme/tiny-gguf/tiny-llama.gguf")
    assert from_hub.kind == "hub" and from_hub.file_digest == file_digest(gguf)
    assert resolve("acme/tiny-gguf").file_digest == from_hub.file_digest  # the repository's only GGUF file
    with pytest.raises(UserError, match="not in the local Hugging Face cache.*hf download acme/missing"):
        resolve("acme/missing")


def test_bad_models_are_one_line_and_leave_nothing(tied, corpus, tmp_path):
    directory, gguf = tied
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(64))
    result = bonsai(["prune", "--model", str(corrupt), "--data", str(corpus), "--out", str(tmp_path / "r")], tmp_path)
    assert_one_line_error(result, "not a readable GGUF file")
    gpt2 = tiny.gguf_file(tmp_path / "gpt2.gguf", directory, architecture="gpt2")
    result = bonsai(["prune", "--model", str(gpt2), "--data", str(corpus), "--out", str(tmp_path / "r")], tmp_path)
    assert_one_line_error(result, "GGUF architecture 'gpt2' is not supported; supported: ")
    assert "llama" in result.stderr and "qwen2" in result.stderr
    assert not (tmp_path / "cache").exists(), "refused from the header, before the file was hashed or converted"
    several = tmp_path / "several"
    several.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (several / name).write_bytes(gguf.read_bytes())
    result = bonsai(["prune", "--model", str(several), "--data", str(corpus), "--out", str(tmp_path / "r")], tmp_path)
    assert_one_line_error(result, "holds 2 GGUF files (a.gguf, b.gguf); give the one to prune")
    result = bonsai(
        ["prune", "--model", "acme/nothing", "--data", str(corpus), "--out", str(tmp_path / "r")],
        tmp_path,
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(tmp_path / "empty-hub"),
    )
    assert_one_line_error(result, "not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    assert not (tmp_path / "r").exists()
