"""How the wiring runs a stage: inline, or as a Prefect task.

The pruning loop is written once (flows/prune.py) against this small interface, so the
Prefect flow and a plain in-process run are the same code path with different executors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol


class Executor(Protocol):
    def __call__(self, name: str, fn: Callable[..., Any], *args: Any) -> Any: ...

    def map(
        self, name: str, fn: Callable[..., Any], calls: Sequence[tuple], after: Callable[[], None] | None = None
    ) -> list[Any]:
        """Every call of ``fn``, in order; ``after()`` once each has finished (progress lines)."""
        ...


class Inline:
    """Each stage is a plain function call in this process."""

    def __call__(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def map(
        self, name: str, fn: Callable[..., Any], calls: Sequence[tuple], after: Callable[[], None] | None = None
    ) -> list[Any]:
        return [_then(fn(*args), after) for args in calls]


class PrefectTasks:
    """Each stage is a Prefect task run, named after the stage and its iteration/shard.

    Prefect's result cache is off: the artifact store is the source of truth, so a resumed
    run works with PREFECT_HOME wiped, and no model or tensor is ever hashed or pickled.
    Without ``parallel`` shards run one after another in this process (they share its one
    model); with it they are submitted to the flow's task runner (Dask workers, each with
    its own model cache) and gathered in order.
    """

    def __init__(self, parallel: bool = False):
        self.parallel = parallel

    def _task(self, name: str, fn: Callable[..., Any]):
        from prefect import task
        from prefect.cache_policies import NO_CACHE

        stage = name.split("-")[0]
        return task(fn, name=stage, task_run_name=name, cache_policy=NO_CACHE, persist_result=False)

    def __call__(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        return self._task(name, fn)(*args)

    def map(
        self, name: str, fn: Callable[..., Any], calls: Sequence[tuple], after: Callable[[], None] | None = None
    ) -> list[Any]:
        tasks = [self._task(f"{name}-shard{i:03d}", fn) for i in range(len(calls))]
        if not self.parallel:
            return [_then(t(*args), after) for t, args in zip(tasks, calls)]
        futures = [t.submit(*args) for t, args in zip(tasks, calls)]
        return [_then(future.result(), after) for future in futures]


def _then(result: Any, after: Callable[[], None] | None) -> Any:
    if after is not None:
        after()
    return result
