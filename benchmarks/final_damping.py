"""The last iteration's repair refitted with other dampings, on finished runs of budget.py.

    python benchmarks/final_damping.py [--runs variant-unit-order-flap-repair512-s30] [--seeds 0 1 2]
        [--dampings 0.1 0.03 0.01 0.003 0.001]

For each run (``benchmarks/results/budget/RUN-seedS``, a finished run of ``budget.py variant``),
the repair of the last iteration's kept removal is made again with each ``--dampings`` value as
the reconstruct stage's ``final_damping`` (so a projection with too few fit tokens per column
keeps the run's damping), from the same removal, model and windows, and the repaired model is
scored on the held-out documentation (budget.py's protocol).  Only the last repair changes:
the judge is not asked again, so a whole run under the damping could keep the other removal
(``budget.py variant`` with ``--reconstruct-final-damping`` makes that run).  The repairs go to a
store of their own (results/final-damping/RUN-seedS), the rows to results/final-damping/rows.json
(a row already there is not made again); every recorded row is printed as a table and plotted.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import common
import polars as pl
import real_model
import torch

from bonsai.artifacts import RunDir, Store, external_ref
from bonsai.flows.preflight import run_parent
from bonsai.stages import reconstruct
from bonsai.stages.core.model_io import PrunedModel
from bonsai.stages.core.nll import mean_nll
from bonsai.stages.reports.render import pyplot, save

RUNS = common.RESULTS / "budget"
OUT = common.RESULTS / "final-damping"


def last_repair(run: Path) -> tuple[PrunedModel, object, object, reconstruct.ReconstructConfig]:
    """(the model before the last kept repair, the calibration, the removal, the repair's config),
    read from the finished run's lineage."""
    directory = RunDir(run)
    keys = [key for stage, key in directory.lineage() if stage == "reconstruct"]
    manifests = {k: json.loads((run / "reconstruct" / k / "manifest.json").read_text()) for k in keys}
    manifest = manifests[max(manifests, key=lambda k: manifests[k]["config"]["iteration"])]
    inputs = manifest["inputs"]  # the parent, the calibration, the removal, the model's repairs, its selection
    parent = external_ref("parent", run_parent(directory.recorded()).path, inputs[0]["digest"])
    calibration, after, *rest = [directory.store.lookup(i["stage"], i["key"]) for i in inputs[1:]]
    selection = rest[-1] if rest else None
    config = {"final_damping": None, **manifest["config"]}
    return PrunedModel(parent, selection, tuple(rest[:-1])), calibration, after, reconstruct.ReconstructConfig(**config)


def perplexity(model: PrunedModel, windows: torch.Tensor) -> float:
    loaded, _, device = model.load("float32", "cpu")
    return math.exp(mean_nll(loaded, windows, 16, device)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["variant-unit-order-flap-repair512-s30"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dampings", type=float, nargs="+", default=[0.1, 0.03, 0.01, 0.003, 0.001])
    args = parser.parse_args()
    common.setup_logging()
    windows = real_model.Scorer("docs").windows
    rows_file = OUT / "rows.json"
    rows = json.loads(rows_file.read_text()) if rows_file.is_file() else []
    done = {(r["run"], r["seed"], r["final_damping"]) for r in rows}
    for name in args.runs:
        for seed in args.seeds:
            run = RUNS / f"{name}-seed{seed}"
            before, calibration, after, config = last_repair(run)
            store = Store(OUT / run.name)
            for damping in args.dampings:
                if (name, seed, damping) in done:
                    continue
                repaired = reconstruct.run(before, calibration, after, replace(config, final_damping=damping), store)
                ppl = perplexity(PrunedModel(before.parent, after, before.repairs + (repaired,)), windows)
                rows.append({"run": name, "seed": seed, "final_damping": damping, "perplexity": ppl})
                rows_file.write_text(json.dumps(rows, indent=1))
                print(rows[-1], flush=True)
    frame = pl.DataFrame(rows)
    table = (
        frame.pivot("seed", index=["run", "final_damping"], values="perplexity")
        .with_columns(pl.mean_horizontal(pl.exclude("run", "final_damping")).alias("mean"))
        .sort("run", "final_damping", descending=[False, True])
    )
    print(common.markdown(table.columns, table.rows()))
    plot(frame, common.PLOTS / "final-damping.png")


def plot(frame: pl.DataFrame, path: Path) -> None:
    """One panel per run, one line per seed: perplexity against the last repair's damping."""
    plt = pyplot()
    names = frame["run"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for (seed,), part in (
            frame.filter(pl.col("run") == name).sort("seed", "final_damping").group_by("seed", maintain_order=True)
        ):
            ax.plot(part["final_damping"], part["perplexity"], marker="o", label=f"seed {seed}")
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("damping of the last iteration's repair")
        ax.set_ylabel("held-out perplexity (Python's documentation)")
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: the last repair refitted with each damping")
    save(fig, path)


if __name__ == "__main__":
    main()
