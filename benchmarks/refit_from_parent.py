"""Would the published model be better repaired once from the parent than by the chain of repairs?

    python benchmarks/refit_from_parent.py [--runs 'budget/variant-final-damping-s30-seed{seed}'] [--seeds 0 1 2]
        [--heldout docs|wiki|news|tiny] [--samples N] [--damping D] [--fit F] [--aim stream]

Each iteration's repair fits the kept columns to the output of the model before that removal,
itself a repair's approximation of the parent's: by the last iteration the target has drifted
from the parent's output by every earlier repair's error.  The chain is what the iterations
need (each chooses its removal on the repaired model before it), but the published model need
not be the chain's: from the parent, with every removed unit's input still computed, one repair
can fit the kept columns to the parent's own output at each layer (the issue's Týr-style
reconstruction, layer after layer on the already repaired layers' outputs).

For each finished run (``--runs``: paths under benchmarks/results with ``{seed}`` for the seed;
budget.py's runs by default, the tiny parent's 50 % runs of reconstruct.py with ``--heldout
tiny``), the parent sliced to the run's final keep-state is repaired once with the last repair's
config (its windows, damping and final damping) and scored beside the run's own model (a run
that published a repair from the parent made no repair of its own in its last iteration: its
own model, "chained", is then its published one, and the last repair's config that one's): on
``--heldout``: for SmolLM2 the held-out documentation, wiki or news (real_model.py's windows),
for the tiny parent its held-out text (reconstruct.py's, through an export as its runs were
scored).  Rows go to
results/refit-from-parent/rows.json (a row already there is not made again), the repairs to a
store of their own; the rows are printed as a table.  ``--samples`` and ``--damping`` give the
repair from the parent other windows and damping than the last repair's, as
``--reconstruct-publish-samples`` and ``--reconstruct-publish-damping`` do (a longer pool cut
where the run's holds too few); ``--fit`` another fit (reconstruct.FITS); ``--aim stream`` aims
it at the parent's residual stream, as ``--reconstruct-publish parent-stream`` does (the same
stage and config; without it, at the projections' outputs, as ``parent`` does).  The docs rows
at damping 0.001 are also plotted by aim (plots/publish-aim.png).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import common
import final_damping
import polars as pl
import quality
import real_model

from bonsai.artifacts import ArtifactRef, RunDir, Store
from bonsai.stages import calibration as calibration_stage
from bonsai.stages import export, reconstruct
from bonsai.stages.core.data import describe, source_digest
from bonsai.stages.core.model_io import PrunedModel
from bonsai.stages.core.options import RECONSTRUCT_FITS
from bonsai.stages.core.repair_fit import AIMS
from bonsai.stages.reports.render import pyplot, save

OUT = common.RESULTS / "refit-from-parent"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["budget/variant-final-damping-s30-seed{seed}"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--heldout", choices=("docs", "wiki", "news", "tiny"), default="docs")
    parser.add_argument("--samples", type=int, help="the repair's windows (default: the last repair's)")
    parser.add_argument("--damping", type=float, help="its final damping (default: the last repair's)")
    parser.add_argument("--fit", choices=RECONSTRUCT_FITS, help="what it fits (default: the last repair's)")
    parser.add_argument("--aim", choices=AIMS[1:], help="aim at the parent's stream (default: the projection's W x)")
    args = parser.parse_args()
    common.setup_logging()
    score = scorer(args.heldout)
    rows_file = OUT / "rows.json"
    rows = json.loads(rows_file.read_text()) if rows_file.is_file() else []
    # the repair stage's version is in the key: a row made by an earlier version is made again
    key = ("run", "seed", "heldout", "samples", "damping", "aim", "fit", "version")
    done = {tuple(r.get(k) for k in key) for r in rows}
    version = reconstruct.STREAM_VERSION if args.aim == "stream" else reconstruct.VERSION
    for name in args.runs:
        for seed in args.seeds:
            if (name, seed, args.heldout, args.samples, args.damping, args.aim, args.fit, version) in done:
                continue
            run = common.RESULTS / name.format(seed=seed)
            before, calibration, after, config = final_damping.last_repair(run)
            chained = PrunedModel(before.parent, after, before.repairs + (_kept_repair(run, after),))
            store = Store(OUT / run.name)
            if args.samples is not None:
                calibration = _pool(run, before.parent, calibration, args.samples, store)
                config = replace(config, reconstruct_samples=args.samples)
            if args.damping is not None:
                config = replace(config, final_damping=args.damping)
            if args.fit is not None:
                config = replace(config, reconstruct_fit=args.fit)
            if args.aim is not None:
                config = replace(config, aim=args.aim)
            once = reconstruct.run(PrunedModel(before.parent), calibration, after, config, store)
            rows.append(
                {
                    "run": name,
                    "seed": seed,
                    "heldout": args.heldout,
                    "samples": args.samples,
                    "damping": args.damping,
                    "aim": args.aim,
                    "fit": args.fit,
                    "version": version,
                    "chained": score(chained, store),
                    "from_parent": score(PrunedModel(before.parent, after, (once,)), store),
                    "applied": once.info()["applied"],
                    "projections": once.info()["projections"],
                }
            )
            OUT.mkdir(parents=True, exist_ok=True)
            rows_file.write_text(json.dumps(rows, indent=1))
            print(rows[-1], flush=True)
    frame = pl.DataFrame(rows).with_columns((pl.col("from_parent") - pl.col("chained")).alias("difference"))
    print(common.markdown(frame.columns, frame.rows()))
    print(frame.group_by(*key[:1], *key[2:]).agg(pl.col("chained", "from_parent", "difference").mean()))
    plot(rows, common.PLOTS / "refit-from-parent.png")
    plot_aims(rows, common.PLOTS / "publish-aim.png")


def plot(rows: list[dict], path) -> None:
    """The docs runs' repairs from the parent: perplexity against its windows, one line per
    (seed, damping); the last repair's own windows and damping where a row gives none."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[tuple, list] = {}
    for r in rows:
        if r["heldout"] == "docs" and r["run"].startswith("budget/variant-final-damping-s30") and not r.get("aim"):
            point = (r.get("samples") or 512, r["from_parent"])
            lines.setdefault((r["seed"], r.get("damping") or 0.01), []).append(point)
    for (seed, damping), points in sorted(lines.items()):
        points.sort()
        style = {0.01: "o-", 0.003: "s--", 0.001: "^-", 0.0003: "v:"}.get(damping, "x-")
        ax.plot(*zip(*points), style, color=f"C{seed}", label=f"seed {seed}, damping {damping:g}")
    xlabel = "windows asked of the repair (128 tokens; the documentation holds 2,883)"
    _finish(fig, ax, xlabel, "one repair from the parent, by windows and damping", path)


def plot_aims(rows: list[dict], path) -> None:
    """The docs runs' repairs from the parent at damping 0.001, aimed at the projections' outputs
    (0.11.0's) or at the parent's stream: perplexity against windows, one line per (seed, aim)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[tuple, list] = {}
    for r in rows:
        if (
            r["heldout"] == "docs"
            and r["run"].startswith("budget/variant-final-damping-s30")
            and r.get("damping") == 0.001
        ):
            lines.setdefault((r["seed"], r.get("aim") or "model"), []).append((r["samples"], r["from_parent"]))
    for (seed, aim), points in sorted(lines.items()):
        points.sort()
        label = {"model": "the projection's output (0.11.0)", "stream": "the parent's stream"}[aim]
        ax.plot(*zip(*points), "o-" if aim == "stream" else "s--", color=f"C{seed}", label=f"seed {seed}: {label}")
    xlabel = "windows of the published repair (128 tokens), damping 0.001"
    _finish(fig, ax, xlabel, "what the published repair aims at", path)


def _finish(fig, ax, xlabel: str, title: str, path) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out perplexity (Python's documentation)")
    ax.legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M-Instruct at 30 %: {title}", fontsize=10)
    save(fig, path)


def scorer(heldout: str):
    """model, store -> held-out perplexity, as the runs of that text were scored."""
    if heldout != "tiny":
        windows = real_model.Scorer(heldout).windows
        return lambda model, store: final_damping.perplexity(model, windows)
    text = common.parent()[2]

    def tiny(model: PrunedModel, store: Store) -> float:
        exported = export.run(model, export.ExportConfig(), store)
        return quality.ppl(str(exported.file(export.MODEL)), text, store)

    return tiny


def _pool(run, parent, calibration, samples: int, store: Store):
    """The calibration a repair of ``samples`` windows draws from, as the flow's published
    repair does: the run's, or a longer pool cut from the run's data the same way."""
    manifest = calibration.manifest()
    cfg = calibration_stage.CalibrationConfig(**manifest["config"])
    pool = calibration_stage.pool_for(cfg.calib_pool, cfg.calib_samples, samples)
    if pool == cfg.calib_pool:
        return calibration
    source = RunDir(run).recorded()["described"]["data"]
    data = ArtifactRef("data", key="text", path=describe(source), digest=source_digest(source))
    if data.digest != manifest["inputs"][1]["digest"]:
        raise SystemExit(f"{run}: its data {source} changed since the run")
    return calibration_stage.run(parent, data, replace(cfg, calib_pool=pool), store)


def _kept_repair(run, after):
    """The run's own repair of its last removal (the one its lineage holds)."""
    directory = RunDir(run)
    for stage, key in directory.lineage():
        if stage == "reconstruct":
            ref = directory.store.lookup(stage, key)
            if any(i["key"] == after.key for i in ref.manifest()["inputs"]):
                return ref
    raise SystemExit(f"{run}: no repair of {after.key} in the run's lineage")


if __name__ == "__main__":
    main()
