"""Where a run stands, read from its manifests alone: nothing is loaded, locked or started.

Every artifact's manifest records its stage and config (iteration, shard), so the finished
work of a run is a scan of ``RUN/*/*/manifest.json``.  A stopped run resumes at the first
missing artifact of the pipeline's order, which is what ``next`` names.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from bonsai.artifacts import RunDir
from bonsai.artifacts.store import RESUME_CHECKED
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.options import PruneOptions, build
from bonsai.stages.core.plan import PrunePlan
from bonsai.stages.core.run_identity import recorded_identity
from bonsai.stages.reports import eta


def manifests(run: Path) -> list[dict]:
    out = []
    for path in sorted(run.glob("*/*/manifest.json")):
        try:
            out.append(json.loads(path.read_text()))
        except ValueError:
            continue  # a corrupted manifest: that artifact will be rebuilt
    return out


def holder(run: Path) -> str | None:
    """The pid of the live process that holds the run, if any."""
    return RunDir(run).lock.holder()


def run_status(run_dir: str) -> dict:
    run = Path(run_dir)
    recorded = RunDir(run).recorded()
    if recorded is None:
        raise UserError(f"{run_dir}: not a bonsai run directory (no run.json)")
    plan = PrunePlan.of(build(PruneOptions, recorded_identity(recorded)["config"], where=f"{run_dir}/run.json"))
    found = manifests(run)
    done: dict[str, dict] = defaultdict(dict)  # stage -> {(iteration, shard): info}
    for m in found:
        cfg = m.get("config", {})
        done[m["stage"]][(cfg.get("iteration"), cfg.get("shard"))] = m.get("info", {})
    # under --rival an iteration selects twice and ends when the arbitration has kept one
    ended = done["arbitrate"] if plan.rival != "none" else done["select"]
    selected = sorted(it for it, _ in ended)
    last = selected[-1] if selected else None
    reached = ended[(last, None)]["sparsity"] if last is not None else 0.0
    status = {
        "run": str(run),
        "running": holder(run),
        "target_sparsity": plan.sparsity,
        "sparsity": reached,
        "iterations_done": len(selected),
        "iterations_planned": plan.iterations,
        "calibration": bool(done["calibration"]),
        "exported": bool(done["export"]),
        "published": (run / "model" / "config.json").is_file(),
        "adapted": (run / "adapted" / "config.json").is_file(),
        "half_built": sorted(p.name for p in (run / ".tmp").glob("*")) if (run / ".tmp").is_dir() else [],
        "checkpoints": sorted(p.parent.name + "/" + p.name for p in run.glob(".work/*/checkpoint-*")),
        # per library whose version a resume checks: the versions the artifacts were made with
        "libraries": {
            name: sorted({m["libraries"][name] for m in found if name in m.get("libraries", {})})
            for name in RESUME_CHECKED
        },
    }
    if not plan.reached(reached):
        current = 0 if last is None else last + 1
        shards_done = sorted(s for it, s in done["evaluate"] if it == current)
        missing = [s for s in range(plan.shards) if s not in shards_done]
        stage_done = {s: any(it == current for it, _ in done[s]) for s in plan.stages}
        if "evaluate" in plan.stages and stage_done["masks"] and missing:
            nxt = f"evaluate shard {missing[0]} of iteration {current} ({len(shards_done)}/{plan.shards} shards done)"
        else:
            first = next((s for s in plan.stages if not stage_done[s]), "select")
            nxt = f"{first} of iteration {current}" if done["calibration"] else "calibration"
        left_iterations = max(1, plan.iterations - current)
        status.update(
            current_iteration=current,
            shards_done=len(shards_done),
            shards_per_iteration=plan.shards,
            next=nxt,
            sub_models_left=sum(plan.shard_count(s) for s in missing) + (left_iterations - 1) * plan.sub_models,
        )
        status["estimate"] = eta.estimate(plan, found)
        status["plan"] = eta.plan_line(plan)
    else:
        status["next"] = "nothing: pruned" if status["published"] else "export"
    return status


def describe(status: dict) -> str:
    lines = [f"run:        {status['run']}"]
    lines.append(f"state:      {'running (pid ' + status['running'] + ')' if status['running'] else 'not running'}")
    lines.append(
        f"sparsity:   {status['sparsity']:.3f} of {status['target_sparsity']:.3f} after "
        f"{status['iterations_done']} of ~{status['iterations_planned']} iterations"
    )
    if "current_iteration" in status:
        lines.append(
            f"evaluation: iteration {status['current_iteration']}: {status['shards_done']}/"
            f"{status['shards_per_iteration']} shards done; {status['sub_models_left']} sub-models left"
        )
    lines.append(f"next:       {status['next']}")
    if "estimate" in status:
        lines.append(f"plan:       {status['plan']}")
        lines.append(f"time:       {eta.progress_line(status['estimate'])}")
    lines.append(
        f"model:      {'RUN/model published' if status['published'] else 'not yet'}"
        f"{'; RUN/adapted published' if status['adapted'] else ''}"
    )
    made_with = [f"{name} {' + '.join(v)}" for name, v in status["libraries"].items() if v]
    if made_with:
        mixed = any(len(v) > 1 for v in status["libraries"].values())
        lines.append(f"made with:  {', '.join(made_with)}{' (mixed: resumed under other versions)' if mixed else ''}")
    if status["half_built"]:
        lines.append(f"half-built: {len(status['half_built'])} (discarded when the run resumes)")
    if status["checkpoints"]:
        lines.append(f"checkpoints: {', '.join(status['checkpoints'])}")
    return "\n".join(lines)
