"""Speed of pruned models against their parent, on this machine's device.

    python benchmarks/speed.py tiny            # trained tiny parent at 30% and 50% (regression)
    python benchmarks/speed.py llama7b-shape   # LLaMA-2 7B widths, 4 layers, random weights, 50%

The 7B-shaped model keeps every width of LLaMA-2 7B (hidden 4096, 32 heads, MLP 11008,
vocabulary 32000) but only 4 layers, so that it fits and runs on a CPU; its weights are
random, which changes nothing about speed.  It is pruned with the prior-only estimator in
one iteration (quality is not the point here).  Ratios above 1 are speed-ups.
"""

from __future__ import annotations

import argparse

import common
import torch

from bonsai.flows.prune import run_prune
from bonsai.stages.core.options import PruneOptions
from bonsai.stages.reports.speed import SpeedConfig, measure, speedup

OUT = common.RESULTS / "speed"


def ratios(parent_dir: str, pruned_dir: str, cfg: SpeedConfig, device: str) -> list[list]:
    """Parent and pruned model measured interleaved; the last column is the speed-up (sizes:
    pruned / parent)."""
    measured = measure({"parent": parent_dir, "pruned": pruned_dir}, cfg, device)
    rows = []
    for a, b in zip(measured["parent"], measured["pruned"]):
        shape = f"{a['batch']} x {a['tokens']}" if a["batch"] else ""
        faster = (
            speedup(a["value"], b["value"], a["unit"])
            if a["metric"] in ("prefill", "decode")
            else (b["value"] / a["value"])
        )
        rows.append([a["metric"], shape, a["unit"], a["value"], b["value"], faster])
    return rows


def tiny(device: str) -> None:
    model_dir, train, _ = common.parent()
    cfg = SpeedConfig(shapes=((1, 128), (8, 128), (1, 512), (8, 512)), dtype="float32")
    for sparsity in (0.3, 0.5):
        config = PruneOptions(
            sparsity=sparsity,
            prune_frac=0.05 if sparsity == 0.5 else 0.1,
            **common.TINY_PRUNE,
            device=device,
        )
        run = common.RESULTS / "quality-fast" / "regression-seed0" if sparsity == 0.5 else OUT / f"tiny-{sparsity}"
        summary = run_prune(model_dir, train, str(run), config)
        print(f"\ntiny parent pruned to {sparsity:.0%} ({run}):\n")
        print(
            common.markdown(
                ["measure", "shape", "unit", "parent", "pruned", "pruned / parent"],
                ratios(model_dir, summary["model"], cfg, device),
            )
        )


def llama7b_shape(device: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from bonsai.stages.tiny_parent import train_tokenizer

    parent = OUT / "llama7b-shape"
    if not (parent / "config.json").is_file():
        config = LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_attention_heads=32,
            num_key_value_heads=32,
            num_hidden_layers=4,
            vocab_size=32000,
            max_position_embeddings=4096,
        )
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
        model.save_pretrained(parent)
        train_tokenizer(["a tokenizer for a speed test " * 50], 512).save_pretrained(parent)
    text = OUT / "text.txt"
    text.write_text(" ".join(f"word{i % 97}" for i in range(20000)))
    config = PruneOptions(
        sparsity=0.5,
        prune_frac=0.5,
        estimator="prior-only",
        calib_samples=2,
        seq_len=128,
        batch_size=2,
        calib_pool=4,
        reconstruct_final_damping=0.1,  # the run recorded here (0.01 since 0.9.0)
        reconstruct_publish="chain",  # likewise (parent since 0.10.0)
        device=device,
    )
    summary = run_prune(str(parent), str(text), str(OUT / "llama7b-shape-50"), config)
    cfg = SpeedConfig(shapes=((1, 128), (4, 512)), repeats=3, warmup=1, decode_tokens=16, dtype="float32")
    print(
        f"\nLLaMA-2 7B widths, 4 layers, pruned to 50% ({summary['iterations'][-1]['model_params']:,} of "
        f"{summary['iterations'][-1]['parent_params']:,} parameters left):\n"
    )
    print(
        common.markdown(
            ["measure", "shape", "unit", "parent", "pruned", "pruned / parent"],
            ratios(str(parent), summary["model"], cfg, device),
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=["tiny", "llama7b-shape"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    common.setup_logging()
    OUT.mkdir(parents=True, exist_ok=True)
    {"tiny": tiny, "llama7b-shape": llama7b_shape}[args.which](args.device)


if __name__ == "__main__":
    main()
