"""`bonsai run --config run.yaml`: prune, then adapt, then evaluate, as one flow.

run.yaml has a `prune` section (model, data, out, and any `bonsai prune` option), and
optional `adapt` and `eval` sections with the options of those commands, for example:

    prune: {model: models/llama, data: corpus.jsonl, out: runs/llama-50, sparsity: 0.5}
    adapt: {steps: 2000, lora-rank: 64}
    eval:  {ppl-data: "hf:wikitext:wikitext-2-raw-v1:test", tasks: [arc_easy], speed: true}

Each step resumes from the run directory like its own command, so a scheduled or re-run
chain continues where the last one stopped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bonsai.stages.config import PruneConfig, build_config, normalise_keys, read_yaml
from bonsai.stages.errors import UserError

from .adapt import AdaptOptions
from .evaluate import EvalOptions
from .executors import Executor, Inline

SECTIONS = ("prune", "adapt", "eval")


@dataclass(frozen=True)
class ChainSpec:
    model: str
    data: str
    out: str
    prune: PruneConfig
    adapt: AdaptOptions | None
    eval: EvalOptions | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ChainSpec":
        return cls(data["model"], data["data"], data["out"], PruneConfig(**data["prune"]),
                   AdaptOptions(**data["adapt"]) if data.get("adapt") is not None else None,
                   EvalOptions(**data["eval"]) if data.get("eval") is not None else None)


PATH_OPTIONS = {"data", "ppl_data", "parent", "out"}


def _resolve(base: Path, value: Any, create: bool = False) -> Any:
    """A path relative to the run file's folder (scheduled runs start elsewhere); hf: specs,
    absolute paths and names that are not files (registered task names) stay as they are."""
    if not isinstance(value, str) or value.startswith("hf:") or Path(value).is_absolute():
        return value
    candidate = base / value
    return str(candidate.resolve()) if create or candidate.exists() else value


def _section_options(cls, section: dict, name: str, base: Path):
    values = {str(k).replace("-", "_"): v for k, v in (section or {}).items()}
    for key in PATH_OPTIONS & set(values):
        values[key] = _resolve(base, values[key], create=key == "out")
    if isinstance(values.get("tasks"), list):
        values["tasks"] = [_resolve(base, t) for t in values["tasks"]]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"run config, section {name}: unknown option(s) {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(known))}")
    if "tasks" in values and isinstance(values["tasks"], (str, list)):
        values["tasks"] = tuple([values["tasks"]] if isinstance(values["tasks"], str) else values["tasks"])
    try:
        return cls(**values)
    except TypeError as exc:
        raise UserError(f"run config, section {name}: {exc}") from None


def load_spec(path: str | Path) -> ChainSpec:
    path = Path(path)
    data = read_yaml(path, "sections prune, adapt, eval")
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
    where = {k: _resolve(base, str(prune.pop(k)), create=True) for k in ("model", "data", "out")}
    config = build_config(normalise_keys(prune, where=f"--config {path}, section prune"))
    adapt = _section_options(AdaptOptions, data["adapt"], "adapt", base) if "adapt" in data else None
    evaluate = _section_options(EvalOptions, data["eval"], "eval", base) if "eval" in data else None
    return ChainSpec(where["model"], where["data"], where["out"], config, adapt, evaluate)


def run_chain(spec: ChainSpec, execute: Executor = Inline()) -> dict:
    from .adapt import run_adapt
    from .evaluate import run_eval
    from .prune import run_prune

    result: dict[str, Any] = {"prune": run_prune(spec.model, spec.data, spec.out, spec.prune, execute)}
    if spec.adapt is not None:
        result["adapt"] = run_adapt(spec.out, spec.adapt, execute)
    if spec.eval is not None:
        result["eval"] = run_eval(spec.out, spec.eval, execute)
    return result
