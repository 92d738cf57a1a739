"""Harness stage: lm-evaluation-harness tasks on the in-memory model, through lm_eval's API.

Tasks are registered names (their datasets must already be in the local `datasets` cache)
or task YAML files / folders on disk, which lm-eval reads through its ``include_path``.
The key includes the YAML texts and the lm-eval version, so editing a task re-runs it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import yaml

from bonsai.artifacts import ArtifactRef, Store, text_digest
from bonsai.stages.core.devices import resolve_device, resolve_dtype
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.model_io import load_model, load_tokenizer

VERSION = "1"
JSON_FILE = "harness.json"
TABLE_FILE = "harness.parquet"
SCHEMA = {
    "task": pl.Utf8,
    "metric": pl.Utf8,
    "filter": pl.Utf8,
    "value": pl.Float64,
    "stderr": pl.Float64,
    "samples": pl.Int64,
}

log = logging.getLogger("bonsai.harness")


@dataclass(frozen=True)
class TaskSpec:
    names: tuple[str, ...]  # task names as lm-eval knows them
    include: tuple[str, ...]  # folders holding the local YAML files
    digest: str  # of the local YAML texts (empty for registered tasks)
    registered: bool  # some names come from lm-eval's own registry (indexing it takes seconds)


@dataclass(frozen=True, kw_only=True)
class HarnessConfig:
    tasks: tuple[str, ...]
    include: tuple[str, ...]
    tasks_digest: str
    registered: bool
    limit: int | None
    batch_size: int
    dtype: str
    lm_eval_version: str


def _yaml_task_names(path: Path) -> list[str]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return []  # lm-eval's own YAML tags (!function) fail safe_load; such files name no task here
    names = data.get("task") if isinstance(data, dict) else None
    if isinstance(names, str):
        return [names]
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def resolve_tasks(specs: list[str]) -> TaskSpec:
    """Split ``--tasks`` into registered names and local YAML files/folders; check both."""
    names, include, texts, registered = [], [], [], []
    for spec in specs:
        path = Path(spec)
        if path.is_file() and path.suffix in (".yaml", ".yml"):
            found = _yaml_task_names(path)
            if not found:
                raise UserError(f"--tasks {spec}: the YAML file names no task (a 'task:' key)")
            names += found
            include.append(str(path.parent.resolve()))
            texts.append(path.read_text())
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*.y*ml"))
            found = [n for f in files for n in _yaml_task_names(f)]
            if not found:
                raise UserError(f"--tasks {spec}: no task YAML files in the folder")
            names += found
            include.append(str(path.resolve()))
            texts += [f.read_text() for f in files]
        else:
            registered.append(spec)
    if registered:
        from lm_eval.tasks import TaskManager

        known = set(TaskManager(include_path=include or None).all_tasks)
        unknown = [t for t in registered if t not in known]
        if unknown:
            raise UserError(
                f"--tasks {', '.join(unknown)}: neither a registered lm-eval task nor a local task YAML file or folder"
            )
        names += registered
    digest = text_digest("\n---\n".join(texts)) if texts else ""
    return TaskSpec(tuple(names), tuple(dict.fromkeys(include)), digest, bool(registered))


def run(model: ArtifactRef, cfg: HarnessConfig, store: Store, device: str = "auto") -> ArtifactRef:
    def build(out: Path) -> dict:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        dev = resolve_device(device)
        lm = HFLM(
            pretrained=load_model(model.path, resolve_dtype(cfg.dtype, dev), dev),
            tokenizer=load_tokenizer(model.path),
            batch_size=cfg.batch_size,
            device=str(dev),
        )
        manager = TaskManager(include_path=list(cfg.include) or None, include_defaults=cfg.registered)
        try:
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(cfg.tasks),
                task_manager=manager,
                limit=cfg.limit,
                log_samples=False,
                random_seed=0,
                numpy_random_seed=0,
                torch_random_seed=0,
                fewshot_random_seed=0,
            )
        except (ConnectionError, FileNotFoundError) as exc:  # hub and datasets "not on disk" errors
            raise UserError(_offline_message(cfg.tasks, exc)) from None
        table = results_table(results)
        table.write_parquet(out / TABLE_FILE)
        keep = {k: results.get(k) for k in ("results", "versions", "n-shot", "n-samples", "higher_is_better")}
        (out / JSON_FILE).write_text(json.dumps(keep, indent=1, sort_keys=True, default=str))
        return {"tasks": list(cfg.tasks), "rows": table.height}

    return store.produce("harness", VERSION, cfg, [model], build)


def _offline_message(tasks: tuple[str, ...], exc: Exception) -> str:
    first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
    return (
        f"--tasks {', '.join(tasks)}: the task data is not readable from this machine ({first}); "
        f"lm-eval needs each dataset on disk: load it once with network (datasets.load_dataset) so it is "
        f"in the local cache, or write a task YAML with 'dataset_path: json' and local 'data_files'"
    )


def results_table(results: dict) -> pl.DataFrame:
    """One row per (task, metric, filter) from lm-eval's results dict."""
    rows = []
    samples = results.get("n-samples", {})
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or key.startswith(("alias",)) or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "filter": filt,
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                    "samples": (samples.get(task) or {}).get("effective"),
                }
            )
    return pl.DataFrame(rows, schema=SCHEMA)


def read(harness: ArtifactRef) -> pl.DataFrame:
    return pl.read_parquet(harness.file(TABLE_FILE))
