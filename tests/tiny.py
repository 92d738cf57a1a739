"""Tiny models of every supported family, built from configs (never downloaded), and text
files to prune them on.  Random weights: enough for masking, slicing, export and resume
checks; quality checks use the trained demo parent instead."""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = (
    "the model prunes heads and channels with forward passes only while a regression ranks every "
    "module by how much the sampled sub models lose when it is gone and the parent stays frozen"
).split()

# Pruning settings small enough for a 3-layer random model to finish in seconds (two iterations).
SMALL = dict(sparsity=0.5, prune_frac=0.25, masks_per_iter=12, calib_samples=4, seq_len=32, batch_size=8,
             shard_size=4, calib_pool=32, cv_folds=3)

# (family, transformers config class, extra config)
SPECS = {
    "llama": ("LlamaConfig", {}),
    "llama-gqa": ("LlamaConfig", {"num_key_value_heads": 2}),
    "mistral": ("MistralConfig", {"num_key_value_heads": 2, "sliding_window": 16}),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2}),
    "qwen3": ("Qwen3Config", {"num_key_value_heads": 2, "head_dim": 16}),
    "phi": ("PhiConfig", {"num_key_value_heads": 4, "partial_rotary_factor": 0.5, "qk_layernorm": True}),
    "gemma": ("GemmaConfig", {"num_key_value_heads": 2, "head_dim": 16}),
    "gemma2": ("Gemma2Config", {"num_key_value_heads": 2, "head_dim": 16, "sliding_window": 8,
                                "attn_logit_softcapping": 30.0, "final_logit_softcapping": 20.0,
                                "query_pre_attn_scalar": 16}),
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
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text(200, seed=seed)], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.token_to_id("<|endoftext|>"))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return fast


def model_dir(root: Path, spec: str = "llama", seed: int = 0, layers: int = 3, dtype=torch.float32, vocab: int = 320,
              **overrides) -> Path:
    """Save a random-weight model of ``spec`` with its tokenizer under ``root/spec``."""
    import transformers

    class_name, extra = SPECS[spec]
    directory = Path(root) / spec
    directory.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(directory, vocab)
    config = getattr(transformers, class_name)(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **{**extra, **overrides},
    )
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
