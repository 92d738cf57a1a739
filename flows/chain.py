"""`bonsai run --config run.yaml`: prune, then adapt, then evaluate, as one flow.

run.yaml has a `prune` section (model, data, out, and any `bonsai prune` option), and
optional `adapt`, `export` and `eval` sections with the options of those commands, for example:

    prune:  {model: models/llama, data: corpus.jsonl, out: runs/llama-50, sparsity: 0.5}
    adapt:  {steps: 2000, lora-rank: 64}
    export: {gguf: true, type: q8_0}
    eval:   {ppl-data: "hf:wikitext:wikitext-2-raw-v1:test", tasks: [arc_easy], speed: true}

Each step resumes from the run directory like its own command, so a scheduled or re-run
chain continues where the last one stopped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bonsai.flows.executors import Executor, Inline
from bonsai.flows.preflight import Prepared, prepare
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.model_source import is_hub_id
from bonsai.stages.core.options import (
    AdaptOptions,
    EvalOptions,
    ExportOptions,
    PruneOptions,
    build,
    fields_of,
    read_yaml,
)

SECTIONS = ("prune", "adapt", "export", "eval")


@dataclass(frozen=True)
class ChainSpec:
    model: str
    data: str
    out: str
    prune: PruneOptions
    adapt: AdaptOptions | None
    eval: EvalOptions | None
    export: ExportOptions | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChainSpec:
        return cls(
            data["model"],
            data["data"],
            data["out"],
            PruneOptions(**data["prune"]),
            AdaptOptions(**data["adapt"]) if data.get("adapt") is not None else None,
            EvalOptions(**data["eval"]) if data.get("eval") is not None else None,
            ExportOptions(**data["export"]) if data.get("export") is not None else None,
        )


def _resolve(base: Path, value: Any, create: bool = False) -> Any:
    """A path relative to the run file's folder (scheduled runs start elsewhere); hf: specs,
    absolute paths and names that are not files (registered task names) stay as they are."""
    if not isinstance(value, str) or value.startswith("hf:") or Path(value).is_absolute():
        return value
    candidate = base / value
    return str(candidate.resolve()) if create or candidate.exists() else value


def _section(cls, section: dict | None, name: str, path: Path):
    """A section's options, with the fields marked ``path`` made relative to the run file."""
    values = {str(k).replace("-", "_"): v for k, v in (section or {}).items()}
    base = path.parent.resolve()
    for f in fields_of(cls):
        if f.metadata["path"] and f.name in values:
            value = values[f.name]
            values[f.name] = (
                [_resolve(base, v) for v in value]
                if isinstance(value, list)
                else _resolve(base, value, create=f.name == "out")
            )
    return build(cls, values, where=f"run config, section {name}")


def load_spec(path: str | Path) -> ChainSpec:
    path = Path(path)
    data = read_yaml(path, "sections prune, adapt, export, eval")
    if "prune" not in data:
        raise UserError(f"--config {path}: needs a 'prune' section (model, data, out, options)")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise UserError(f"--config {path}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    prune = dict(data["prune"] or {})
    missing = [k for k in ("model", "data", "out") if k not in prune]
    if missing:
        raise UserError(f"--config {path}: the prune section needs {', '.join(missing)}")
    base = path.parent.resolve()
    where = {k: str(prune.pop(k)) for k in ("model", "data", "out")}
    where = {
        k: v if k == "model" and is_hub_id(v) and not (base / v).exists() else _resolve(base, v, create=True)
        for k, v in where.items()
    }
    config = _section(PruneOptions, prune, "prune", path)
    adapt = _section(AdaptOptions, data["adapt"], "adapt", path) if "adapt" in data else None
    evaluate = _section(EvalOptions, data["eval"], "eval", path) if "eval" in data else None
    export = _section(ExportOptions, data["export"], "export", path) if "export" in data else None
    return ChainSpec(where["model"], where["data"], where["out"], config, adapt, evaluate, export)


def run_chain(spec: ChainSpec, execute: Executor = Inline(), prepared: Prepared | None = None) -> dict:
    """``prepared``: the prune step's inputs as the CLI prepared them (flows/preflight.py)."""
    from bonsai.flows.adapt import run_adapt
    from bonsai.flows.eval import run_eval
    from bonsai.flows.export import run_export
    from bonsai.flows.prune import run_prepared

    prepared = prepared or prepare(spec.model, spec.data, spec.out, spec.prune)
    result: dict[str, Any] = {"prune": run_prepared(prepared, execute)}
    if spec.adapt is not None:
        result["adapt"] = run_adapt(spec.out, spec.adapt, execute)
    if spec.export is not None:  # after adaptation: the adapted model is exported too
        result["export"] = run_export(spec.out, spec.export, execute)
    if spec.eval is not None:
        result["eval"] = run_eval(spec.out, spec.eval, execute)
    return result
