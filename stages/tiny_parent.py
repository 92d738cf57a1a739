"""A small trained LLaMA to prune when no checkpoint can be downloaded (demo, benchmarks).

The text is what every Python installation ships: the ``pydoc_data`` topics (about 0.5 MB
of English documentation) and the standard library's docstrings, read with ``ast`` (no
module is imported).  Documents are split into train / held-out by a hash of their text, a
byte-level BPE is trained on the train part, and a GQA LLaMA is trained for a fixed number
of steps with explicit generators, so the same config gives the same parent.  The result
is an ordinary Hugging Face model directory, cached like any artifact.
"""

from __future__ import annotations

import ast
import hashlib
import math
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl
import torch

from bonsai.artifacts import ArtifactRef, Store
from bonsai.stages.core.progress import Progress
from bonsai.stages.core.rng import generator

VERSION = "1"
MODEL = "model"
TRAIN_TEXT = "train.txt"
HELDOUT_TEXT = "heldout.txt"
SPECIAL = "<|endoftext|>"
_SKIP = {"test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "site-packages", "ensurepip"}


@dataclass(frozen=True, kw_only=True)
class TinyParentConfig:
    vocab: int = 4096
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4  # GQA: heads are pruned in groups of two
    intermediate: int = 688
    seq_len: int = 128
    steps: int = 240
    batch: int = 16
    lr: float = 3e-3
    warmup: int = 20
    heldout: float = 0.1
    seed: int = 0


def corpus() -> list[str]:
    """pydoc topics and stdlib docstrings over 200 characters, in a fixed order."""
    import pydoc_data.topics

    docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if _SKIP & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    docs.append(doc)
    return docs


def split(docs: list[str], heldout: float) -> tuple[list[str], list[str]]:
    def held(doc: str) -> bool:
        return int(hashlib.sha256(doc.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < heldout

    return [d for d in docs if not held(d)], [d for d in docs if held(d)]


def train_tokenizer(docs: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[SPECIAL],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL} $A", special_tokens=[(SPECIAL, tok.token_to_id(SPECIAL))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL)


def write_texts(out: Path, heldout: float) -> tuple[list[str], list[str]]:
    """Write the train and held-out documents into ``out``; returns them."""
    train_docs, heldout_docs = split(corpus(), heldout)
    (out / TRAIN_TEXT).write_text("\n\n".join(train_docs))
    (out / HELDOUT_TEXT).write_text("\n\n".join(heldout_docs))
    return train_docs, heldout_docs


def docs(store: Store, heldout: float = TinyParentConfig.heldout) -> ArtifactRef:
    """Python's documentation split into train and held-out text exactly as the tiny parent
    splits it (files TRAIN_TEXT and HELDOUT_TEXT): calibration text and text to measure on
    that it never saw, for any model."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    return store.produce(
        "python-docs",
        VERSION,
        {"heldout": heldout, "python": python},
        [],
        lambda out: {"documents": sum(map(len, write_texts(out, heldout)))},
    )


def run(cfg: TinyParentConfig, store: Store) -> ArtifactRef:
    def build(out: Path) -> dict:
        train_docs, _ = write_texts(out, cfg.heldout)
        tokenizer = train_tokenizer(train_docs, cfg.vocab)
        ids = []
        for doc in train_docs:
            ids.extend(tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id])
        model, losses = train(cfg, torch.tensor(ids, dtype=torch.long), len(tokenizer), tokenizer.bos_token_id)
        model.save_pretrained(out / MODEL)
        tokenizer.save_pretrained(out / MODEL)
        pl.DataFrame({"step": list(range(len(losses))), "loss": losses}).write_parquet(out / "training.parquet")
        return {
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_tokens": len(ids),
            "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        }

    python = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    return store.produce("tiny-parent", VERSION, {**asdict(cfg), "python": python}, [], build)


def train(cfg: TinyParentConfig, ids: torch.Tensor, vocab: int, special: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=4 * cfg.seq_len,
        tie_word_embeddings=True,
        bos_token_id=special,
        eos_token_id=special,
    )
    with torch.random.fork_rng():  # weight init is the one place transformers reads the global RNG
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    batches = generator(cfg.seed, "tiny-parent", "batches")
    progress = Progress("tiny parent: training", cfg.steps, "steps", every_s=15.0)
    losses = []
    model.train()
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(ids) - cfg.seq_len, (cfg.batch,), generator=batches)
        x = torch.stack([ids[s : s + cfg.seq_len] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        progress.advance()
    model.eval()
    return model, losses
