"""Shared by the benchmark scripts: the trained tiny parent, and a markdown table writer."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bonsai.artifacts import Store  # noqa: E402
from bonsai.stages import tiny_parent  # noqa: E402
from bonsai.stages.core.paths import cache_dir  # noqa: E402
from bonsai.stages.reports.render import markdown  # noqa: E402

__all__ = [
    "BENCH_PARENT",
    "PLOTS",
    "TINY_PRUNE",
    "RESULTS",
    "markdown",
    "parent",
    "prune_command",
    "setup_logging",
    "texts",
]

# Longer than the demo's 240 steps: a parent whose units have specialised more, so that
# pruning choices matter.  Trained once (about 11 minutes on 2 CPU cores), then cached.
BENCH_PARENT = tiny_parent.TinyParentConfig(steps=1000)
# The tiny parent's pruning setting shared by the quality-fast, repair and speed runs: budget 120
# sub-models of 8 windows of 128 tokens per iteration, the estimator's ranking and units alone (what
# the runs recorded before --rival's and --unit-order's defaults became auto), every repair damped alike
# (before --reconstruct-final-damping), the chain of repairs published (before --reconstruct-publish).
TINY_PRUNE = dict(
    masks_per_iter=120,
    calib_samples=8,
    seq_len=128,
    batch_size=16,
    shard_size=20,
    calib_pool=512,
    rival="none",
    unit_order="estimator",
    reconstruct_final_damping=0.1,
    reconstruct_publish="chain",
)
RESULTS = Path(__file__).parent / "results"  # run directories (ignored by git)
PLOTS = Path(__file__).parent / "plots"  # figures referenced by BENCHMARKS.md


def setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("bonsai").setLevel(logging.INFO)


def parent(steps: int | None = None):
    """(model dir, train text, held-out text) of the benchmark parent."""
    config = BENCH_PARENT if steps is None else tiny_parent.TinyParentConfig(steps=steps)
    ref = tiny_parent.run(config, Store(cache_dir() / "parents"))
    return (
        str(ref.file(tiny_parent.MODEL)),
        str(ref.file(tiny_parent.TRAIN_TEXT)),
        str(ref.file(tiny_parent.HELDOUT_TEXT)),
    )


def texts() -> tuple[str, str]:
    """(train, held-out) text files: Python's documentation split as the tiny parent splits it,
    so the held-out documents are never used for calibration."""
    ref = tiny_parent.docs(Store(cache_dir() / "parents"))
    return str(ref.file(tiny_parent.TRAIN_TEXT)), str(ref.file(tiny_parent.HELDOUT_TEXT))


def prune_command(model: str, data: str, out, *flags: str) -> list[str]:
    """The real `bonsai prune` command line, as a subprocess runs it."""
    return [
        sys.executable,
        "-m",
        "bonsai.flows.cli",
        "prune",
        "--model",
        model,
        "--data",
        data,
        "--out",
        str(out),
        *flags,
    ]
