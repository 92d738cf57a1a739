"""Post-pruning adaptation: quality (the paper's Table 6 shape), memory, throughput.

    python benchmarks/adapt.py quality [--steps 300]   # trained tiny parent at 50%
    python benchmarks/adapt.py after-repair [--seeds 0]  # 50% runs of reconstruct.py, with and without repair
    python benchmarks/adapt.py memory                  # LLaMA-7B widths, 4 layers, 50% (speed.py makes it)

quality: held-out perplexity of the parent, of the pruned model, and of the pruned model
adapted with LoRA without distillation (lambda 0) and with it (lambda 0.01, the paper's, and 1).
memory: peak RSS of a process that runs the adapt stage (LoRA, rank 128) against a process
that runs inference on the parent with the same batch; each process's peak includes the
Python and torch runtime, which the 7B-shaped model's weights dwarf.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import common
from quality import ppl

from bonsai.artifacts import Store
from bonsai.flows.adapt import run_adapt
from bonsai.stages.core.options import AdaptOptions

OUT = common.RESULTS / "adapt"


def quality(steps: int) -> None:
    model_dir, train, heldout = common.parent()
    run = common.RESULTS / "quality-fast" / "regression-seed0"  # made by quality.py
    if not (run / "model").is_dir():
        raise SystemExit(f"{run} is missing: run benchmarks/quality.py first")
    evals = Store(OUT / "perplexity")
    rows = [
        ["parent", "-", ppl(model_dir, heldout, evals), "-", "-"],
        ["pruned, no adaptation", "-", ppl(str(run / "model"), heldout, evals), "-", "-"],
    ]
    for weight in (0.0, 0.01, 1.0):
        options = _options(steps, weight)
        start = time.perf_counter()
        summary = run_adapt(str(run), options)
        seconds = time.perf_counter() - start
        tokens = steps * options.batch_size * options.seq_len
        label = "LoRA, no distillation" if weight == 0 else f"LoRA + distillation (lambda {weight:g})"
        cache = summary["teacher_cache_bytes_per_1000_sequences"]
        rows.append(
            [
                label,
                steps,
                ppl(summary["adapted"], heldout, evals),
                f"{cache / 2**20:.1f} MiB" if cache else "-",
                f"{tokens / seconds:,.0f}",
            ]
        )
    print(
        common.markdown(
            ["model", "steps", "held-out perplexity", "teacher cache per 1,000 seq.", "tokens/s (incl. caching)"], rows
        )
    )


def _options(steps: int, weight: float) -> AdaptOptions:
    return AdaptOptions(
        steps=steps,
        lora_rank=16,
        lora_alpha=64,
        distill_weight=weight,
        top_k=64,
        lr=1e-3,
        seq_len=128,
        sequences=1024,
        batch_size=8,
        checkpoint_every=100,
        device="cpu",
    )


def after_repair(steps: int, seeds: list[int]) -> None:
    """The reconstruct benchmark's 50 % runs with and without repair (benchmarks/reconstruct.py
    runs), each adapted the same way (lambda 0.01): does adaptation keep what repair gained?"""
    from reconstruct import OUT as RUNS

    _, _, heldout = common.parent()
    evals = Store(OUT / "perplexity")
    rows = []
    for seed in seeds:
        for mode in ("none", "lsq"):
            run = RUNS / f"tiny-0.5-{mode}-seed{seed}"
            if not (run / "model").is_dir():
                raise SystemExit(f"{run} is missing: run benchmarks/reconstruct.py runs --seeds {seed} first")
            summary = run_adapt(str(run), _options(steps, 0.01))
            pruned, adapted = ppl(str(run / "model"), heldout, evals), ppl(summary["adapted"], heldout, evals)
            rows.append([seed, mode, f"{pruned:.2f}", steps, f"{adapted:.2f}"])
            print(rows[-1], flush=True)
    print(common.markdown(["seed", "repair", "pruned", "steps", "adapted (lambda 0.01)"], rows))


def _peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("VmHWM")


def child(mode: str, run: str, parent: str) -> None:
    import torch

    from bonsai.stages.core.model_io import load_model

    if mode == "inference":
        model = load_model(parent, torch.float32, torch.device("cpu"))
        with torch.no_grad():
            model(input_ids=torch.randint(0, 32000, (1, 128)), use_cache=False)
    else:
        # a fresh seed gives a fresh artifact key, so the training really runs in this process
        run_adapt(
            run,
            AdaptOptions(
                steps=2,
                lora_rank=128,
                lora_alpha=512,
                distill_weight=0.01,
                top_k=64,
                seq_len=128,
                sequences=2,
                batch_size=1,
                checkpoint_every=2,
                device="cpu",
                seed=time.time_ns() % 10**9,
            ),
        )
    print(json.dumps({"peak_kib": _peak_kib()}))


def memory() -> None:
    from bonsai.flows.adapt import plan

    run = common.RESULTS / "speed" / "llama7b-shape-50"  # made by speed.py llama7b-shape
    parent = common.RESULTS / "speed" / "llama7b-shape"
    if not (run / "model").is_dir():
        raise SystemExit(f"{run} is missing: run benchmarks/speed.py llama7b-shape first")
    options = AdaptOptions(
        steps=2,
        lora_rank=128,
        lora_alpha=512,
        distill_weight=0.01,
        top_k=64,
        seq_len=128,
        sequences=2,
        batch_size=1,
        checkpoint_every=2,
        device="cpu",
    )
    from bonsai.flows.adapt import adapt_stages

    p = plan(str(run), options)
    # cache the teacher first, in this process, so the measured process only trains
    adapt_stages(p, AdaptOptions(**{**options.__dict__, "steps": 1, "checkpoint_every": 1}))
    peaks = {}
    for mode in ("inference", "adapt"):
        done = subprocess.run(
            [sys.executable, __file__, "child", mode, str(run), str(parent)], capture_output=True, text=True, check=True
        )
        peaks[mode] = json.loads(done.stdout.strip().splitlines()[-1])["peak_kib"] / 2**20
    print(
        common.markdown(
            ["peak RSS, inference on the parent (GiB)", "peak RSS, adaptation of the 50% model (GiB)", "ratio"],
            [[peaks["inference"], peaks["adapt"], peaks["adapt"] / peaks["inference"]]],
        )
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        return child(*sys.argv[2:5])
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=["quality", "memory", "after-repair"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    common.setup_logging()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.which == "quality":
        quality(args.steps)
    elif args.which == "after-repair":
        after_repair(args.steps, args.seeds)
    else:
        memory()


if __name__ == "__main__":
    main()
