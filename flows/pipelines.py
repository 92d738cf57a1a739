"""The Prefect flows.  Each is a thin shell: the wiring lives in prune.py / demo.py.

Importing this module imports Prefect; the CLI does so only when a command needs it, after
it has set Prefect's environment defaults (see prefect_server.prefect_environment).
"""

from __future__ import annotations

import dataclasses
import logging

from prefect import flow

from bonsai.flows.executors import PrefectTasks
from bonsai.flows.preflight import Prepared
from bonsai.flows.prune import run_prepared, run_prune
from bonsai.stages.core.options import PruneOptions


def _progress_logs() -> None:
    """The stages' progress lines are INFO; flow runs started by a schedule or a worker
    are not set up by the CLI, so each flow sets this itself."""
    logging.getLogger("bonsai").setLevel(logging.INFO)


@flow(name="bonsai-prune", persist_result=False, validate_parameters=False)
def prune_flow(
    model: str, data: str, out: str, config: dict, parallel: bool = False, prepared: dict | None = None
) -> dict:
    """Prune MODEL on DATA to the configured sparsity, into OUT (resumes what OUT holds).
    ``parallel`` submits evaluation shards to the flow's task runner (see dask_runner).
    ``prepared``: the same inputs as the CLI already prepared them (``Prepared.as_params``); a
    run started from a schedule or the UI leaves it out and is checked and prepared here."""
    _progress_logs()
    execute = PrefectTasks(parallel)
    if prepared is not None:
        return run_prepared(Prepared.from_params(prepared), execute)
    return run_prune(model, data, out, PruneOptions(**config), execute)


def dask_runner(address: str):
    """Prefect's Dask task runner on a scheduler address, or on a new ``local:N`` cluster of N
    worker processes, one task at a time each, the machine's cores split between them.

    Dask's pre-spawn environment for workers is tuned for many small numpy tasks and slows
    torch down: OMP_NUM_THREADS=1 leaves it one core per worker (the OpenMP runtime reads it
    at spawn), and MALLOC_TRIM_THRESHOLD_ turns off glibc's adaptive mmap threshold, so every
    activation tensor is mmapped and page-faulted afresh (measured: matmuls 1.6x slower)."""
    import os

    import dask
    from prefect_dask import DaskTaskRunner

    if address.startswith("local:"):
        workers = int(address.split(":", 1)[1])
        threads = max(1, (os.cpu_count() or 1) // workers)
        environ = {
            k: v
            for k, v in dask.config.get("distributed.nanny.pre-spawn-environ").items()
            if k != "MALLOC_TRIM_THRESHOLD_"
        }
        environ |= {name: threads for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        dask.config.set({"distributed.nanny.pre-spawn-environ": environ})
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
            },
        )
    return DaskTaskRunner(address=address)


@flow(name="bonsai-adapt", persist_result=False, validate_parameters=False)
def adapt_flow(run: str, options: dict) -> dict:
    """Cache the parent's logits, then adapt RUN's pruned model with LoRA and distillation."""
    _progress_logs()
    from bonsai.flows.adapt import AdaptOptions, run_adapt

    return run_adapt(run, AdaptOptions(**options), PrefectTasks())


@flow(name="bonsai-export", persist_result=False, validate_parameters=False)
def export_flow(run: str, options: dict) -> dict:
    """RUN's pruned (and adapted) model as GGUF files for stock llama.cpp."""
    _progress_logs()
    from bonsai.flows.export import ExportOptions, run_export

    return run_export(run, ExportOptions(**options), PrefectTasks())


@flow(name="bonsai-eval", persist_result=False, validate_parameters=False)
def eval_flow(target: str, options: dict) -> dict:
    """Perplexity, harness tasks and speed of TARGET (a run or a model) and its parent."""
    _progress_logs()
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from bonsai.flows.eval import EvalOptions, run_eval

    result = run_eval(target, EvalOptions(**options), PrefectTasks())
    create_markdown_artifact(key="bonsai-eval-report", markdown=result["report"], description=f"bonsai eval {target}")
    create_table_artifact(key="bonsai-eval-results", table=result["results"], description=f"bonsai eval {target}")
    return result


@flow(name="bonsai-run", persist_result=False, validate_parameters=False)
def chain_flow(spec: dict, dask_address: str | None = None, prepared: dict | None = None) -> dict:
    """prune -> adapt -> eval, as a run file describes them (see flows/chain.py).  With a
    Dask address, pruning runs first as a subflow whose evaluation shards go to Dask; the
    chain then finds it done in the store.  ``prepared``: as prune_flow's."""
    _progress_logs()
    from bonsai.flows.chain import ChainSpec, run_chain

    chain = ChainSpec.from_dict(spec)
    if dask_address:
        prune_flow.with_options(task_runner=dask_runner(dask_address))(
            chain.model, chain.data, chain.out, dataclasses.asdict(chain.prune), parallel=True, prepared=prepared
        )
    return run_chain(chain, PrefectTasks(), None if prepared is None else Prepared.from_params(prepared))


@flow(name="bonsai-audit", persist_result=False, validate_parameters=False)
def audit_flow(run: str, markdown: str, iterations: list[dict]) -> None:
    """Publish an audit (made outside Prefect: it is a read of the run) as Prefect artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_markdown_artifact(key="bonsai-audit", markdown=markdown, description=f"bonsai audit {run}")
    create_table_artifact(key="bonsai-audit-iterations", table=iterations, description=f"bonsai audit {run}")


@flow(name="bonsai-demo", persist_result=False, validate_parameters=False)
def demo_flow(out: str, settings: dict) -> dict:
    """Train (or reuse) a tiny parent, prune it, evaluate parent against pruned model."""
    _progress_logs()
    from bonsai.flows.demo import DemoSettings, run_demo

    return run_demo(out, DemoSettings(**settings), PrefectTasks())
