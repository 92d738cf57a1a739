"""Would the arbitrate stage pick the same removal from fewer judged windows?

    python benchmarks/judge.py RUN [RUN ...]

For every arbitrate artifact of each finished ``--rival flap`` run, both candidates (the
estimator's and the rival's removal, each repaired) are scored again on the windows the stage
judged, a batch of 8 windows at a time, and the choice each prefix of them (32, 64, 128 and all
256 windows of 128 tokens on a CPU) would make is printed beside the stage's own: one JSON row
per iteration, ``diffN`` the second candidate's mean loss minus the first's on the first N
(``recorded_diff``: the stage's own, which the full prefix repeats when the candidates were
rebuilt right).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import common  # noqa: F401  (offline hub settings)

from bonsai.artifacts import ArtifactRef, RunDir
from bonsai.artifacts.store import external_ref
from bonsai.flows.preflight import run_parent
from bonsai.stages.arbitrate import ArbitrateConfig, judged_windows
from bonsai.stages.core.model_io import PrunedModel
from bonsai.stages.core.nll import mean_nll

PREFIXES = (32, 64, 128, 256)
BATCH = 8


def candidates(runs: RunDir, manifest: dict) -> tuple[PrunedModel, ArtifactRef, list[tuple[ArtifactRef, ArtifactRef]]]:
    """(the model both candidates were removed from, the calibration, one (select, reconstruct)
    pair per ranking), from the arbitrate manifest's inputs: the parent, the calibration, the
    model's changes so far (its last selection, then every repair: PrunedModel.changes), then the
    candidates' pairs."""
    inputs = manifest["inputs"]
    parent = external_ref("parent", run_parent(runs.recorded()).path, inputs[0]["digest"])
    refs = [runs.store.lookup(i["stage"], i["key"]) for i in inputs[1:]]
    calibration, changes, pairs = refs[0], refs[1:-4], refs[-4:]
    before = PrunedModel(parent, changes[0], tuple(changes[1:])) if changes else PrunedModel(parent)
    return before, calibration, [(pairs[0], pairs[1]), (pairs[2], pairs[3])]


def rejudge(run: Path) -> list[dict]:
    runs = RunDir(run)
    rows = []
    for path in sorted(run.glob("arbitrate/*/manifest.json")):
        manifest = json.loads(path.read_text())
        if "judge_windows" not in manifest["config"]:  # the first version's, judged on 32 windows, superseded
            continue
        cfg = ArbitrateConfig(**{**manifest["config"], "rankings": tuple(manifest["config"]["rankings"])})
        before, calibration, pairs = candidates(runs, manifest)
        held = judged_windows(calibration, cfg)
        losses = {}
        for name, (chosen, repaired) in zip(cfg.rankings, pairs, strict=True):
            model, _, device = before.then(chosen, repaired).load(cfg.dtype, "cpu")
            losses[name] = [mean_nll(model, held[i : i + BATCH], BATCH, device)[0] for i in range(0, len(held), BATCH)]
        first, second = cfg.rankings
        info = manifest["info"]
        row = {"run": run.name, "iteration": cfg.iteration, "kept": info["kept"], "windows": len(held)}
        row["recorded_diff"] = round(info[f"nll_{second}"] - info[f"nll_{first}"], 4)  # diff256 must repeat it
        for n in PREFIXES:
            mean = {k: sum(v[: n // BATCH]) / len(v[: n // BATCH]) for k, v in losses.items()}
            row[f"pick{n}"] = min(cfg.rankings, key=lambda k: mean[k])
            row[f"diff{n}"] = round(mean[second] - mean[first], 4)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished --rival flap run directories")
    rows = [row for run in parser.parse_args().runs for row in rejudge(run)]
    for n in PREFIXES:
        same = sum(r[f"pick{n}"] == r["kept"] for r in rows)
        print(f"{n} windows: the stage's choice in {same} of {len(rows)} iterations")


if __name__ == "__main__":
    main()
