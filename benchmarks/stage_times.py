"""Wall time of a run, split by stage, from the manifests every artifact records.

python benchmarks/stage_times.py RUN [RUN ...]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import common


def stage_times(run: Path) -> dict[str, tuple[int, float]]:
    out: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for manifest in sorted(run.glob("*/*/manifest.json")):
        data = json.loads(manifest.read_text())
        out[data["stage"]][0] += 1
        out[data["stage"]][1] += data["wall_s"]
    return {k: (v[0], v[1]) for k, v in out.items()}


def main() -> None:
    for run in map(Path, sys.argv[1:]):
        times = stage_times(run)
        total = sum(t for _, t in times.values())
        rows = [
            [stage, count, seconds, seconds / total]
            for stage, (count, seconds) in sorted(times.items(), key=lambda kv: -kv[1][1])
        ]
        print(f"\n{run}: {total:.1f} s in stages\n")
        print(common.markdown(["stage", "artifacts", "seconds", "share"], rows + [["total", "", total, 1.0]]))


if __name__ == "__main__":
    main()
