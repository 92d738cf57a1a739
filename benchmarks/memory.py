"""Peak memory while pruning against plain inference with the same batch.

    python benchmarks/memory.py [--batch 8] [--seq-len 128] [--processes 3]

Each side runs in a fresh process that loads the parent, resets the kernel's peak-RSS mark
(/proc/self/clear_refs), runs its workload and reads the new peak (VmHWM).  "pruning" is
the priors forward (activation statistics on every layer) followed by sub-model evaluation
with a different mask per row; "inference" is ``model(input_ids).logits`` on the same batch.
On a GPU the same comparison would use torch.cuda.max_memory_allocated.  Goal: <= 1.15.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch


def status(field: str) -> int:
    """A field of this process's /proc status (VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(mode: str, batch: int, seq_len: int) -> None:
    import common
    from overhead import candidates_for

    from bonsai.stages import masks
    from bonsai.stages.core.model_dirs import inspect_model_dir
    from bonsai.stages.core.model_io import load_model
    from bonsai.stages.core.nll import row_nll
    from bonsai.stages.core.rng import generator
    from bonsai.stages.core.taps import Taps, unit_priors
    from bonsai.stages.evaluate import evaluate_masks

    model_dir, _, _ = common.parent()
    model = load_model(model_dir, torch.float32, torch.device("cpu"))
    family = inspect_model_dir(model_dir).family
    windows = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=generator(0, "w"))
    cands = candidates_for(model, family)
    keep, _, _ = masks.sample(cands, 4, generator(0, "m"))
    Path("/proc/self/clear_refs").write_text("5")
    loaded = status("VmRSS")
    with torch.no_grad():
        if mode == "inference":
            for _ in range(3):
                model(input_ids=windows, use_cache=False)
        else:
            with Taps(model, family, stat_groups=1) as taps:
                row_nll(model, windows)
            unit_priors(taps)
            evaluate_masks(model, family, windows, cands, keep, batch, torch.device("cpu"))
    print(json.dumps({"loaded": loaded, "peak": status("VmHWM")}))


def median_peaks(script: str, modes: tuple[str, ...], flags: list[str], processes: int) -> dict:
    """Per mode, the JSON line of the child process with the median peak (fresh processes:
    allocator peaks vary from one to the next)."""
    out = {}
    for mode in modes:
        samples = []
        for _ in range(processes):
            done = subprocess.run([sys.executable, script, "--child", mode, *flags], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            samples.append(json.loads(done.stdout.strip().splitlines()[-1]))
        samples.sort(key=lambda s: s["peak"])
        out[mode] = samples[len(samples) // 2]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--child", choices=["inference", "pruning"])
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.batch, args.seq_len)
    flags = ["--batch", str(args.batch), "--seq-len", str(args.seq_len)]
    out = median_peaks(__file__, ("inference", "pruning"), flags, args.processes)
    import common

    mb = 1 << 20
    inf, pru = out["inference"], out["pruning"]
    rows = [
        [
            f"{args.batch} x {args.seq_len}",
            inf["peak"] / mb,
            pru["peak"] / mb,
            pru["peak"] / inf["peak"],
            (inf["peak"] - inf["loaded"]) / mb,
            (pru["peak"] - pru["loaded"]) / mb,
            (pru["peak"] - pru["loaded"]) / max(inf["peak"] - inf["loaded"], 1),
        ]
    ]
    print(
        common.markdown(
            [
                "batch x seq",
                "inference peak MB",
                "pruning peak MB",
                "ratio",
                "inference above model MB",
                "pruning above model MB",
                "ratio above model",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
