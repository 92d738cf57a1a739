"""Wall time of a run, split by stage, from the manifests every artifact records, with the
process's peak resident memory when each stage's last artifact was written (manifests made
by versions that did not record it show "-").

python benchmarks/stage_times.py RUN [RUN ...] [--plot NAME]

``--plot NAME`` also draws each run's seconds by stage as a stacked bar (plots/NAME.png), the
runs in the order given, each labelled by its directory's name.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import common

from bonsai.artifacts import RunDir
from bonsai.stages.reports.render import pyplot, save


def stage_times(run: Path) -> dict[str, tuple[int, float, float | None]]:
    """stage -> (artifacts, seconds, largest peak RSS in MB recorded by its artifacts)."""
    out: dict[str, list] = defaultdict(lambda: [0, 0.0, None])
    lineage = RunDir(run).lineage()  # a finished run: only the work its result rests on
    for manifest in sorted(run.glob("*/*/manifest.json")):
        if lineage is not None and (manifest.parent.parent.name, manifest.parent.name) not in lineage:
            continue
        data = json.loads(manifest.read_text())
        entry = out[data["stage"]]
        entry[0] += 1
        entry[1] += data["wall_s"]
        if data.get("peak_rss_mb") is not None:
            entry[2] = max(entry[2] or 0.0, data["peak_rss_mb"])
    return {k: tuple(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--plot", help="also plot the runs' stages to plots/PLOT.png")
    args = parser.parse_args()
    for run in args.runs:
        times = stage_times(run)
        total = sum(t for _, t, _ in times.values())
        rows = [
            [stage, count, seconds, seconds / total, peak]
            for stage, (count, seconds, peak) in sorted(times.items(), key=lambda kv: -kv[1][1])
        ]
        print(f"\n{run}: {total:.1f} s in stages\n")
        print(
            common.markdown(
                ["stage", "artifacts", "seconds", "share", "peak RSS (MB)"], rows + [["total", "", total, 1.0, None]]
            )
        )

    if args.plot:
        plot({run.name: stage_times(run) for run in args.runs}, common.PLOTS / f"{args.plot}.png")


def plot(runs: dict[str, dict], path: Path) -> None:
    """One horizontal bar per run, its stages' seconds stacked (the legend names them, largest first)."""
    plt = pyplot()
    stages = sorted(
        {s for times in runs.values() for s in times}, key=lambda s: -max(t.get(s, (0, 0.0))[1] for t in runs.values())
    )
    fig, ax = plt.subplots(figsize=(8, 0.7 * len(runs) + 1.6))
    names = list(runs)[::-1]  # the first run given on top
    left = [0.0] * len(names)
    for stage in stages:
        seconds = [runs[name].get(stage, (0, 0.0))[1] for name in names]
        ax.barh(names, seconds, left=left, label=stage)
        left = [a + b for a, b in zip(left, seconds)]
    for y, total in enumerate(left):
        ax.text(total, y, f" {total:.0f} s", va="center")
    ax.set_xlabel("seconds in stages (2 CPU cores)")
    ax.set_xlim(0, max(left) * 1.15)
    ax.legend(ncol=4, fontsize="small", loc="lower center", bbox_to_anchor=(0.5, 1.0))
    save(fig, path)


if __name__ == "__main__":
    main()
