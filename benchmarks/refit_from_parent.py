"""Would the published model be better repaired once from the parent than by the chain of repairs?

    python benchmarks/refit_from_parent.py [--runs 'budget/variant-final-damping-s30-seed{seed}'] [--seeds 0 1 2]
        [--heldout docs|wiki|news|tiny]

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
config (its windows, damping and final damping) and scored beside the run's own model: on
``--heldout``: for SmolLM2 the held-out documentation, wiki or news (real_model.py's windows),
for the tiny parent its held-out text (reconstruct.py's, through an export as its runs were
scored).  Rows go to
results/refit-from-parent/rows.json (a row already there is not made again), the repairs to a
store of their own; the rows are printed as a table.
"""

from __future__ import annotations

import argparse
import json

import common
import final_damping
import polars as pl
import quality
import real_model

from bonsai.artifacts import RunDir, Store
from bonsai.stages import export, reconstruct
from bonsai.stages.core.model_io import PrunedModel

OUT = common.RESULTS / "refit-from-parent"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["budget/variant-final-damping-s30-seed{seed}"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--heldout", choices=("docs", "wiki", "news", "tiny"), default="docs")
    args = parser.parse_args()
    common.setup_logging()
    score = scorer(args.heldout)
    rows_file = OUT / "rows.json"
    rows = json.loads(rows_file.read_text()) if rows_file.is_file() else []
    done = {(r["run"], r["seed"], r["heldout"]) for r in rows}
    for name in args.runs:
        for seed in args.seeds:
            if (name, seed, args.heldout) in done:
                continue
            run = common.RESULTS / name.format(seed=seed)
            before, calibration, after, config = final_damping.last_repair(run)
            chained = PrunedModel(before.parent, after, before.repairs + (_kept_repair(run, after),))
            store = Store(OUT / run.name)
            once = reconstruct.run(PrunedModel(before.parent), calibration, after, config, store)
            rows.append(
                {
                    "run": name,
                    "seed": seed,
                    "heldout": args.heldout,
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
    print(frame.group_by("run", "heldout").agg(pl.col("chained", "from_parent", "difference").mean()))


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
