"""Sub-model evaluation in bfloat16 on a CPU with native bfloat16, against float32.

    python benchmarks/bf16.py utilities [--run DIR]   # the same masks scored in both dtypes
    python benchmarks/bf16.py throughput              # whole forward passes, interleaved

``utilities`` takes the first iteration of a finished SmolLM2 run of the real-model benchmark
(its 128 sub-models and 8 windows of 128 tokens) and scores every sub-model with the float32
model and with its bfloat16 copy, as the evaluate stage does; what the regression fits is each
sub-model's utility relative to the others, so the figures are the correlation of the two
dtypes' deviations from their means, and bfloat16's error against the spread of the utilities.
Whole runs: `python benchmarks/real_model.py prune ... --set dtype=bfloat16`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common
import numpy as np
import real_model
import torch

from bonsai.artifacts import Store
from bonsai.stages import masks as masks_stage
from bonsai.stages.calibration import iteration_windows
from bonsai.stages.core.devices import native_bf16
from bonsai.stages.core.families import family_for_model_type
from bonsai.stages.core.model_io import load_model
from bonsai.stages.core.model_source import resolve as resolve_model
from bonsai.stages.evaluate import evaluate_masks
from bonsai.stages.reports.speed import interleaved


def _first_iteration(run: Path):
    store = Store(run)
    (_, masks_ref), *_ = real_model.artifacts(run, "masks")
    calibration = store.lookup("calibration", next((run / "calibration").iterdir()).name)
    cands, table = masks_stage.read(masks_ref)
    config = json.loads((run / "run.json").read_text())["identity"]["config"]
    windows = iteration_windows(calibration, config["seed"], 0, config["calib_samples"])
    return cands, table, windows


def utilities(args) -> None:
    cache = common.RESULTS / "bf16-utilities.json"
    cands, table, windows = _first_iteration(Path(args.run))
    scored = json.loads(cache.read_text()) if cache.is_file() else {}
    if "float32" not in scored:  # 10-20 minutes of evaluations on two cores: kept
        parent = resolve_model(real_model.model(), dtype=lambda: "float32").path
        keep = masks_stage.keep_matrix(table)
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            model = load_model(parent, dtype, torch.device("cpu"))
            family = family_for_model_type(model.config.model_type)
            start = time.perf_counter()
            result = evaluate_masks(model, family, windows, cands, keep, 8, torch.device("cpu"), label=name)
            scored[f"{name}_s"] = time.perf_counter() - start
            scored[name] = (-result["nll"] / result["tokens"]).tolist()
        cache.write_text(json.dumps(scored))
    channel_only = np.array([p == "channel" for p in table["perturbs"].to_list()])
    rows = []
    for subset, chosen in (("all sub-models", np.ones_like(channel_only)), ("channel-only pairs", channel_only)):
        wide, narrow = np.array(scored["float32"])[chosen], np.array(scored["bfloat16"])[chosen]
        error = narrow - wide
        correlation = np.corrcoef(wide - wide.mean(), narrow - narrow.mean())[0, 1]
        rows.append(
            [subset, len(wide), f"{correlation:.6f}", wide.std(), error.mean(), error.std(), error.std() / wide.std()]
        )
    header = [
        "sub-models",
        "count",
        "correlation of deviations",
        "utility sd",
        "bf16 offset",
        "bf16 error sd",
        "error sd / utility sd",
    ]
    print(common.markdown(header, rows))
    print(
        f"evaluation seconds: float32 {scored['float32_s']:.0f}, bfloat16 {scored['bfloat16_s']:.0f}; "
        f"native bf16: {native_bf16()}"
    )


def throughput(args) -> None:
    parent = resolve_model(real_model.model(), dtype=lambda: "float32").path
    models = {str(d): load_model(parent, d, torch.device("cpu")) for d in (torch.float32, torch.bfloat16)}
    rows = []
    for batch, tokens in ((8, 128), (1, 512)):
        ids = torch.randint(0, 49152, (batch, tokens), generator=torch.Generator().manual_seed(0))
        jobs = {name: (lambda m=m, ids=ids: m(input_ids=ids, use_cache=False)) for name, m in models.items()}
        with torch.no_grad():
            seconds = interleaved(jobs, torch.device("cpu"), args.repeats, 2)
        wide, narrow = (batch * tokens / seconds[k] for k in ("torch.float32", "torch.bfloat16"))
        rows.append([f"{batch} x {tokens}", round(wide), round(narrow), round(narrow / wide, 2)])
    print(common.markdown(["batch x tokens", "float32 tokens/s", "bfloat16 tokens/s", "ratio"], rows))


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    u = sub.add_parser("utilities")
    u.add_argument("--run", default=str(real_model.OUT / "regression-seed0-lsq"))
    u.set_defaults(handler=utilities)
    t = sub.add_parser("throughput")
    t.add_argument("--repeats", type=int, default=5)
    t.set_defaults(handler=throughput)
    args = parser.parse_args()
    common.setup_logging()
    with torch.no_grad():
        args.handler(args)


if __name__ == "__main__":
    main()
