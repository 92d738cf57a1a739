"""Peak memory and time of the least-squares repair at a real model's layer shapes, against plain inference.

    python benchmarks/repair_memory.py [--shape llama-2-7b] [--layers 1] [--samples 512] [--passes bfloat16]
        [--rerun-layers] [--processes 1]

A 7B model does not fit this machine's 24 GB in float32, and the repair's extra memory is per
layer (one projection's Gram matrix and one layer's MLP-output inputs at a time) plus the
hidden states of its windows, none of which grows with depth.  So each side runs in a fresh
process on a randomly initialised LLaMA with the shapes of ``--shape`` (LLaMA-2-7B: hidden
4,096, 32 heads, MLP 11,008, vocabulary 32,000) and ``--layers`` decoder layers: "inference"
is a forward of one pruning batch (8 x 128), "repair" is the reconstruct stage's ``repair`` on
``--samples`` windows of 128 tokens with 10 % of every layer's heads and channels removed (the
default iteration), its layer passes in ``--passes`` (the CPU defaults: 512 windows, passes in
bfloat16 where the CPU has it), keeping the activations that complete each layer's output or,
with ``--rerun-layers``, running each repaired layer again.  Each reports its peak RSS above
the loaded model (VmHWM after /proc/self/clear_refs), and the table adds both to the whole
model's weights, in float32 and bfloat16, for the ratio its user would see; the repair's own
seconds are printed above the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from memory import median_peaks, status

SHAPES = {  # (config, the whole model's decoder layers)
    "llama-2-7b": (
        dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            tie_word_embeddings=False,
        ),
        32,
    ),
    "smollm2-135m": (
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            tie_word_embeddings=True,
        ),
        30,
    ),
}
SEQ_LEN, BATCH = 128, 8


def _every_tenth_removed(count: int) -> list[int]:
    return [i for i in range(count) if i % 10 != 0]  # keeps 90 %: the default p_iter


def child(mode: str, shape: str, layers: int, samples: int, passes: str, shortcut: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from bonsai.stages.core.devices import DTYPES
    from bonsai.stages.core.families import family_for_model_type
    from bonsai.stages.core.reconstruction import repair
    from bonsai.stages.core.rng import generator
    from bonsai.stages.core.units import CHANNEL, HEAD, layer_shapes
    from bonsai.stages.reconstruct import check_windows

    torch.set_grad_enabled(False)
    config = SHAPES[shape][0]
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **config)).eval()
    family = family_for_model_type("llama")
    rows = samples if mode == "repair" else BATCH
    windows = torch.randint(0, config["vocab_size"], (rows, SEQ_LEN), generator=generator(0, "windows"))
    Path("/proc/self/clear_refs").write_text("5")
    loaded = status("VmRSS")
    seconds = 0.0
    if mode == "inference":
        model(input_ids=windows, use_cache=False)
    else:
        shapes = layer_shapes(model, family)
        keep = {
            (layer, kind): _every_tenth_removed(shape.count(kind))
            for layer, shape in enumerate(shapes)
            for kind in (HEAD, CHANNEL)
        }
        started = time.perf_counter()
        repair(
            model,
            family,
            windows,
            check_windows(samples),
            keep,
            0.1,
            BATCH,
            shortcut=shortcut,
            forward_dtype=DTYPES[passes],
        )
        seconds = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    peak = status("VmHWM")
    print(json.dumps({"loaded": loaded, "peak": peak, "params": params, "per_layer": per_layer, "seconds": seconds}))


def _rule_keeps(args, dtype: torch.dtype) -> bool:
    """What the reconstruct stage decides for the whole model in ``dtype`` (built on the meta
    device; ``--passes`` bfloat16 narrows a float32 model's passes, a bfloat16 model's are its own)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bonsai.stages.core.families import family_for_model_type
    from bonsai.stages.core.repair_memory import keeps_activations

    config, layers = SHAPES[args.shape]
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **config)).to(dtype)
    windows = torch.empty(args.samples, SEQ_LEN, dtype=torch.long, device="meta")
    passes = torch.bfloat16 if args.passes == "bfloat16" else dtype
    return keeps_activations(model, family_for_model_type("llama"), windows, passes)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-2-7b")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--samples", type=int, default=512, help="repair windows (--reconstruct-samples)")
    parser.add_argument("--passes", choices=["float32", "bfloat16"], default="bfloat16", help="the layer passes' dtype")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument(
        "--rerun-layers", action="store_true", help="run each repaired layer again instead of keeping its activations"
    )
    parser.add_argument("--child", choices=["inference", "repair"])
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.shape, args.layers, args.samples, args.passes, not args.rerun_layers)
    flags = [
        "--shape",
        args.shape,
        "--layers",
        str(args.layers),
        "--samples",
        str(args.samples),
        "--passes",
        args.passes,
    ]
    flags += ["--rerun-layers"] if args.rerun_layers else []
    out = median_peaks(__file__, ("inference", "repair"), flags, args.processes)
    import common

    mb = 1 << 20
    inf = out["inference"]
    above = {mode: (s["peak"] - s["loaded"]) / mb for mode, s in out.items()}
    params_whole = inf["params"] + (SHAPES[args.shape][1] - args.layers) * inf["per_layer"]
    rows = []
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        weights = params_whole * size / mb
        # activations and runtime scale with the dtype only where they are the model's tensors;
        # the float32 figures are measured, the bfloat16 ones take the same extra bytes (an upper bound)
        rows.append(
            [
                str(dtype).removeprefix("torch."),
                weights,
                above["inference"],
                above["repair"],
                (weights + above["repair"]) / (weights + above["inference"]),
                "keeps activations" if _rule_keeps(args, dtype) else "runs layers again",
            ]
        )
    windows = f"{args.samples} repair windows of {SEQ_LEN} tokens"
    how = "each repaired layer run again" if args.rerun_layers else "activations kept for completion"
    print(f"measured on {args.layers} layer(s), {windows}, passes in {args.passes}, {how}")
    print(f"repair: {out['repair']['seconds']:.1f} s")
    print(
        common.markdown(
            [
                f"{args.shape} in",
                "weights MB",
                "inference above weights MB (measured)",
                "repair above weights MB (measured)",
                "repair peak / inference peak",
                "the reconstruct stage (stages/core/repair_memory.py)",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
