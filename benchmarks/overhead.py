"""Sub-model evaluation throughput against plain forward throughput, same model, same batches.

    python benchmarks/overhead.py [--batch 8] [--seq-len 128] [--repeats 9]

Evaluation runs the virtual masks (pre-hooks on every layer's output projections, a different
mask per row) and the per-row loss; plain forward is ``model(input_ids).logits``.  Goal:
ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import time

import common
import numpy as np
import polars as pl
import torch

from bonsai.stages import masks
from bonsai.stages.core.model_dirs import inspect_model_dir
from bonsai.stages.core.model_io import load_model
from bonsai.stages.core.rng import generator
from bonsai.stages.core.units import KINDS, layer_shapes
from bonsai.stages.evaluate import evaluate_masks


def candidates_for(model, family, prune_frac=0.05):
    rows = [
        {"iteration": 0, "layer": layer, "kind": kind, "unit": u, "position": u, "params": 1, "wanda": 1.0 + u}
        for layer, s in enumerate(layer_shapes(model, family))
        for kind in KINDS
        for u in range(s.count(kind))
    ]
    return masks.candidates(pl.DataFrame(rows), prune_frac, "wanda")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--masks", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    model_dir, _, _ = common.parent()
    device = torch.device("cpu")
    model = load_model(model_dir, torch.float32, device)
    family = inspect_model_dir(model_dir).family
    cands = candidates_for(model, family)
    keep, _, _ = masks.sample(cands, args.masks, generator(0, "bench"))
    windows = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), generator=generator(0, "w"))
    rows = keep.shape[0] * args.batch

    def plain_forward() -> float:
        start = time.perf_counter()
        for _ in range(keep.shape[0]):
            model(input_ids=windows, use_cache=False)
        return time.perf_counter() - start

    def evaluation() -> float:
        start = time.perf_counter()
        evaluate_masks(model, family, windows, cands, keep, args.batch, device)
        return time.perf_counter() - start

    # paired repeats, alternating which side goes first: the machine's speed drifts more
    # between minutes than between two halves of one repeat
    plain, masked = [], []
    with torch.no_grad():
        for repeat in range(args.repeats):
            pair = (
                (plain_forward(), evaluation()) if repeat % 2 == 0 else tuple(reversed((evaluation(), plain_forward())))
            )
            plain.append(pair[0])
            masked.append(pair[1])
    ratios = sorted(p / m for p, m in zip(plain, masked))
    tokens = rows * args.seq_len
    print(
        common.markdown(
            [
                "batch x seq",
                "plain forward tok/s",
                "sub-model evaluation tok/s",
                "ratio (median of paired repeats)",
                "lowest ratio",
            ],
            [
                [
                    f"{args.batch} x {args.seq_len}",
                    tokens / float(np.median(plain)),
                    tokens / float(np.median(masked)),
                    ratios[len(ratios) // 2],
                    ratios[0],
                ]
            ],
        )
    )


if __name__ == "__main__":
    main()
