"""The Prefect flows.  Each is a thin shell: the wiring lives in prune.py / demo.py.

Importing this module imports Prefect; the CLI does so only when a command needs it, after
it has set Prefect's environment defaults (see cli.prefect_environment).
"""

from __future__ import annotations

from prefect import flow

from bonsai.stages.config import PruneConfig

from .executors import PrefectTasks
from .prune import run_prune


@flow(name="bonsai-prune", persist_result=False, validate_parameters=False)
def prune_flow(model: str, data: str, out: str, config: dict) -> dict:
    """Prune MODEL on DATA to the configured sparsity, into OUT (resumes what OUT holds)."""
    return run_prune(model, data, out, PruneConfig(**config), PrefectTasks())


@flow(name="bonsai-adapt", persist_result=False, validate_parameters=False)
def adapt_flow(run: str, options: dict) -> dict:
    """Cache the parent's logits, then adapt RUN's pruned model with LoRA and distillation."""
    from .adapt import AdaptOptions, run_adapt

    return run_adapt(run, AdaptOptions(**options), PrefectTasks())


@flow(name="bonsai-eval", persist_result=False, validate_parameters=False)
def eval_flow(target: str, options: dict) -> dict:
    """Perplexity, harness tasks and speed of TARGET (a run or a model) and its parent."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from .evaluate import EvalOptions, run_eval

    result = run_eval(target, EvalOptions(**options), PrefectTasks())
    create_markdown_artifact(key="bonsai-eval-report", markdown=result["report"],
                             description=f"bonsai eval {target}")
    create_table_artifact(key="bonsai-eval-results", table=result["results"], description=f"bonsai eval {target}")
    return result


@flow(name="bonsai-run", persist_result=False, validate_parameters=False)
def chain_flow(spec: dict) -> dict:
    """prune -> adapt -> eval, as a run file describes them (see flows/chain.py)."""
    from .chain import ChainSpec, run_chain

    return run_chain(ChainSpec.from_dict(spec), PrefectTasks())


@flow(name="bonsai-demo", persist_result=False, validate_parameters=False)
def demo_flow(out: str, settings: dict) -> dict:
    """Train (or reuse) a tiny parent, prune it, evaluate parent against pruned model."""
    from .demo import DemoSettings, run_demo

    return run_demo(out, DemoSettings(**settings), PrefectTasks())
