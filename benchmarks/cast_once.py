"""Why the repair's passes run on a copy of each layer with its weights cast once
(stages/core/working_layers.py): a bfloat16 product under autocast with the weight kept in float32
(cast at every call) against the same product with the weight kept in bfloat16.

    python benchmarks/cast_once.py [--repeats 200]

SmolLM2-135M's projection shapes, a batch of 8 windows of 128 tokens, float32 inputs as the
repair's passes get them; milliseconds per product, the best of three rounds.
"""

from __future__ import annotations

import argparse
import time

import common
import torch

# (out, in) of SmolLM2-135M's projections: q and o, k and v, gate and up, down
SHAPES = {"q_proj, o_proj": (576, 576), "k_proj, v_proj": (192, 576), "gate_proj, up_proj": (1536, 576)}
SHAPES["down_proj"] = (576, 1536)


def best_ms(x: torch.Tensor, weight: torch.Tensor, repeats: int) -> float:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(5):
            torch.nn.functional.linear(x, weight)
        rounds = []
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(repeats):
                torch.nn.functional.linear(x, weight)
            rounds.append((time.perf_counter() - start) / repeats * 1e3)
    return min(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name, (out, width) in SHAPES.items():
        x = torch.randn(8, 128, width, generator=generator)
        weight = torch.randn(out, width, generator=generator)
        cast_each_call = best_ms(x, weight, args.repeats)
        cast_once = best_ms(x, weight.to(torch.bfloat16), args.repeats)
        rows.append([name, cast_each_call, cast_once, cast_each_call / cast_once])
    print(common.markdown(["projection", "float32 weight (ms)", "bfloat16 weight (ms)", "ratio"], rows))


if __name__ == "__main__":
    main()
