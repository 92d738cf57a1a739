"""Perplexity after pruning the trained tiny parent to 50%, per estimator (the paper's Figure 2).

    python benchmarks/quality.py [--seeds 0 1 2] [--masks 120] [--calib-samples 8] [--prune-frac 0.05]
    python benchmarks/quality.py --seeds 0 --masks 200 --calib-samples 32 --name paper   # Table 9's setting
    python benchmarks/quality.py --reconstruct lsq     # with the least-squares repair after every iteration
    python benchmarks/quality.py --estimators regression prior-only    # a subset

Every estimator prunes with the same candidates, windows and budget; only the importance
estimate differs (fixed sampling, no repair, unless asked).  Runs are cached in
benchmarks/results/quality-NAME/, so re-running only re-prints.  Writes quality.md next to
them and the plot to benchmarks/plots/quality-NAME[-REPAIR].png.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common

from bonsai.artifacts import ArtifactRef, Store, external_ref
from bonsai.flows.prune import run_prune
from bonsai.stages import perplexity
from bonsai.stages.core.data import source_digest
from bonsai.stages.core.model_dirs import model_digest
from bonsai.stages.core.options import PruneOptions
from bonsai.stages.reports.render import pyplot, save

ESTIMATORS = ("regression", "paper-regression", "perturbed-prior", "prior-only", "random")


def ppl(model_dir: str, heldout: str, store: Store) -> float:
    data = ArtifactRef("data", "text", heldout, source_digest(heldout))
    ref = perplexity.run(
        external_ref("model", model_dir, model_digest(model_dir)),
        data,
        perplexity.PerplexityConfig(seq_len=128, max_windows=256, batch_size=16, dtype="float32"),
        store,
        "cpu",
    )
    return ref.info()["perplexity"]


def plot(rows: list[dict], parent_ppl: float, path: Path) -> None:
    plt = pyplot()
    names = list(dict.fromkeys(r["estimator"] for r in rows))
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for i, name in enumerate(names):
        values = [r["perplexity"] for r in rows if r["estimator"] == name]
        ax.bar(i, sum(values) / len(values), color="tab:green" if name == "regression" else "tab:gray")
        ax.scatter([i] * len(values), values, color="black", s=12, zorder=3)
    ax.axhline(parent_ppl, color="tab:blue", linestyle="--", label=f"parent ({parent_ppl:.0f})")
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title("Tiny LLaMA pruned to 50% of attention+MLP parameters")
    ax.legend()
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--masks", type=int, default=120)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--prune-frac", type=float, default=0.05)
    parser.add_argument("--name", default="fast", help="names the output folder and the plot")
    parser.add_argument("--reconstruct", default="none", choices=["none", "lsq", "lsq-final"])
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    args = parser.parse_args()
    common.setup_logging()
    model_dir, train, heldout = common.parent()
    out = (
        common.RESULTS / f"quality-{args.name}"
        if args.reconstruct == "none"
        else (common.RESULTS / f"quality-{args.name}-{args.reconstruct}")
    )
    out.mkdir(parents=True, exist_ok=True)
    evals = Store(out / "perplexity")
    parent_ppl = ppl(model_dir, heldout, evals)
    rows, parent_params = [], None
    for estimator in args.estimators:
        for seed in args.seeds:
            config = PruneOptions(
                sparsity=0.5,
                prune_frac=args.prune_frac,
                masks_per_iter=args.masks,
                calib_samples=args.calib_samples,
                seq_len=128,
                batch_size=16,
                shard_size=20,
                calib_pool=512,
                estimator=estimator,
                seed=seed,
                device="cpu",
                reconstruct=args.reconstruct,
                rival="none",  # the estimator alone: the runs recorded here
                reconstruct_final_damping=0.1,  # likewise: every repair damped alike
                reconstruct_publish="chain",  # likewise: the chain of repairs published
            )
            start = time.perf_counter()
            summary = run_prune(model_dir, train, str(out / f"{estimator}-seed{seed}"), config)
            last = summary["iterations"][-1]
            parent_params = last["parent_params"]
            rows.append(
                {
                    "estimator": estimator,
                    "seed": seed,
                    "sparsity": last["sparsity"],
                    "parameters": last["model_params"],
                    "perplexity": ppl(summary["model"], heldout, evals),
                    "wall_s": time.perf_counter() - start,
                }
            )
    table = common.markdown(
        ["estimator", "seed", "attn+MLP sparsity", "parameters", "held-out perplexity"],
        [["parent", "-", 0.0, parent_params, parent_ppl]]
        + [[r["estimator"], r["seed"], r["sparsity"], r["parameters"], r["perplexity"]] for r in rows],
    )
    summary = common.markdown(
        ["estimator", "mean perplexity", "worst perplexity", "seeds"],
        [
            [
                e,
                sum(r["perplexity"] for r in rows if r["estimator"] == e) / len(args.seeds),
                max(r["perplexity"] for r in rows if r["estimator"] == e),
                len(args.seeds),
            ]
            for e in args.estimators
        ],
    )
    (out / "quality.md").write_text(table + "\n\n" + summary + "\n")
    plot(rows, parent_ppl, common.PLOTS / f"{out.name}.png")
    print(table + "\n\n" + summary)


if __name__ == "__main__":
    main()
