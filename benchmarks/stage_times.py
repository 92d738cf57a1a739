"""Wall time of a run, split by stage, from the manifests every artifact records, with the
process's peak resident memory when each stage's last artifact was written (manifests made
by versions that did not record it show "-").

python benchmarks/stage_times.py RUN [RUN ...]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import common

from bonsai.artifacts import RunDir


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
    for run in map(Path, sys.argv[1:]):
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


if __name__ == "__main__":
    main()
