"""How long a prune run will take: the plan's work, priced by what this machine measured.

An overnight run that will take three days should say so in its first minute.  The work is
the plan's (iterations x stages, sub-models x windows x tokens per evaluation); the price of
each stage is the mean ``wall_s`` its finished manifests recorded on this run, so the estimate
sharpens as the run goes and a resumed run is priced by its own history.  Before a stage has
finished once, it is priced from the evaluation's measured tokens/s and the tokens it
forwards (a rough factor for the repair's extra work); before the first evaluation shard,
only the work is known.
"""

from __future__ import annotations

from collections import defaultdict

from bonsai.stages.core.plan import PrunePlan

# forward-token equivalents of one window of a stage that has not run yet, relative to the
# evaluation's: the repair and its relatives run the layers once and solve per projection
PER_WINDOW = {"priors": 1.0, "saliency": 3.0, "compensate": 3.0, "reconstruct": 3.0, "arbitrate": 2.0}
# a repair aimed at the parent's stream per window, relative to an iteration's repair: each layer
# of the parent runs too, the pruned ones sliced to the kept units (1.73x measured on SmolLM2 at
# 1,024 windows against 512 in 0.14.0; 1.85-2.1x unsliced; BENCHMARKS.md)
STREAM_AIM_COST = 1.75


def _tokens(plan: PrunePlan, stage: str) -> float:
    """Forward tokens of one iteration's ``stage``, in evaluation-token equivalents."""
    if stage == "evaluate":
        return plan.sub_models * plan.windows * plan.window_tokens
    windows = {"priors": plan.windows, "arbitrate": plan.judge_windows}.get(stage, plan.repair_windows)
    return PER_WINDOW.get(stage, 0.0) * windows * plan.window_tokens


def estimate(plan: PrunePlan, manifests: list[dict]) -> dict:
    """The run's work and time, from its plan and the manifests finished so far."""
    walls: dict[str, list[float]] = defaultdict(list)
    done: dict[str, set] = defaultdict(set)
    eval_tokens = eval_wall = 0.0
    for m in manifests:
        stage, cfg, wall = m.get("stage"), m.get("config", {}), m.get("wall_s")
        done[stage].add((cfg.get("iteration"), cfg.get("shard")))
        if wall is None:
            continue
        walls[stage].append(wall)
        if stage == "evaluate":
            eval_tokens += m.get("info", {}).get("masks", 0) * plan.windows * plan.window_tokens
            eval_wall += wall
    rate = eval_tokens / eval_wall if eval_wall > 0 else None  # evaluation tokens/s, measured

    def seconds(stage: str, iteration: int) -> float | None:
        if stage == "evaluate":
            left = sum(plan.shard_count(s) for s in range(plan.shards) if (iteration, s) not in done["evaluate"])
            return None if rate is None else left * plan.windows * plan.window_tokens / rate
        if (iteration, None) in done[stage]:
            return 0.0
        if walls[stage]:
            return sum(walls[stage]) / len(walls[stage])
        return None if rate is None else _tokens(plan, stage) / rate

    iterations = max(plan.iterations, 1 + max((it for it, _ in done["select"]), default=-1))
    left, unknown = 0.0, False
    for it in range(iterations):
        for stage in plan.stages:
            if stage == "reconstruct" and not plan.repairs_after(it, it == iterations - 1):
                continue  # the last iteration's, where the published repair replaces it
            s = seconds(stage, it)
            unknown |= s is None
            left += (s or 0.0) * plan.runs_per_iteration(stage)
    if plan.publish_windows and not done["export"]:  # the published repair, after the last iteration
        windows = plan.publish_windows * (STREAM_AIM_COST if plan.publish_aimed else 1.0)
        if walls["reconstruct"]:  # priced per window from the iterations' repairs (or itself, once made)
            left += sum(walls["reconstruct"]) / len(walls["reconstruct"]) * windows / plan.repair_windows
        elif rate is None:
            unknown = True
        else:
            left += PER_WINDOW["reconstruct"] * windows * plan.window_tokens / rate
    elapsed = sum(sum(v) for v in walls.values())
    return {
        "iterations": iterations,
        "sub_models": plan.sub_models * iterations,
        "evaluation_tokens": int(_tokens(plan, "evaluate") * iterations),
        "tokens_per_s": rate,
        "elapsed_s": elapsed,
        "left_s": None if unknown else left,
        "fraction_done": None if unknown else elapsed / max(elapsed + left, 1e-9),
    }


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{max(minutes, 1)} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    return f"{hours / 24:.1f} days"


def plan_line(plan: PrunePlan) -> str:
    """What the run will do, before it has measured anything."""
    work = f"~{plan.iterations} iteration{'s' if plan.iterations != 1 else ''} to sparsity {plan.sparsity:g}"
    if plan.sub_models:
        work += (
            f", {plan.sub_models} sub-models x {plan.windows} windows x {plan.window_tokens} tokens per iteration "
            f"({plan.sub_models * plan.iterations:,} sub-models, "
            f"{int(_tokens(plan, 'evaluate') * plan.iterations):,} evaluation tokens)"
        )
    if plan.rival != "none":  # a second removal: say where the time goes, and how to skip it
        work += f"; each iteration also forms and repairs {plan.rival}'s removal, keeping the better one"
        work += " (--rival none skips it)"
    elif plan.unit_order == "flap":  # FLAP's statistics taken for the unit order alone
        work += "; each iteration also takes FLAP's statistics, to pick the units within each layer"
        work += " (--unit-order estimator skips them)"
    return work


def progress_line(est: dict) -> str:
    """The whole run's progress and time left, for the log and ``bonsai status``."""
    if est["left_s"] is None:
        return f"{duration(est['elapsed_s'])} so far; time left is estimated after the first evaluation shard"
    rate = f" at {est['tokens_per_s']:,.0f} evaluation tokens/s" if est["tokens_per_s"] else ""
    return (
        f"{100 * est['fraction_done']:.0f} % done, about {duration(est['left_s'])} left{rate} "
        f"(about {duration(est['elapsed_s'] + est['left_s'])} in all)"
    )
