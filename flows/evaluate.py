"""`bonsai eval`: perplexity, lm-eval harness tasks and speed, of a run's models and their parent.

    target (RUN or model dir) ->  perplexity(model)   for each model
                                  harness(model)      for each model
                                  speed(model)        for each model, measured now
                              ->  report (results.parquet/json, report.md, speed.png)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bonsai.artifacts import ArtifactRef, Store, external_ref
from bonsai.stages.checkpoints import inspect_model_dir, model_digest
from bonsai.stages.data import describe, source_digest
from bonsai.stages.errors import UserError

from .executors import Executor, Inline

DEFAULT_PPL_DATA = "hf:wikitext:wikitext-2-raw-v1:test"


@dataclass(frozen=True)
class EvalOptions:
    parent: str | None = field(default=None, metadata={"help": "parent model directory (default: the run's --model)"})
    ppl_data: str | None = field(default=None, metadata={"help": f"text SOURCE for perplexity (default: {DEFAULT_PPL_DATA} when on disk)"})
    seq_len: int | None = field(default=None, metadata={"help": "window length for perplexity (default: min(2048, the model's context))"})
    max_windows: int = field(default=4096, metadata={"help": "perplexity scores at most this many windows"})
    tasks: tuple[str, ...] = field(default=(), metadata={"help": "lm-eval task names, or task YAML files or folders"})
    limit: int | None = field(default=None, metadata={"help": "at most this many examples per task"})
    speed: bool = field(default=False, metadata={"help": "measure prefill throughput and decode latency against the parent"})
    batch_size: int = field(default=8, metadata={"help": "rows per forward pass"})
    device: str = field(default="auto", metadata={"help": "torch device"})
    dtype: str = field(default="auto", metadata={"help": "dtype for every model (auto: float32 on CPU, bfloat16 on GPU)"})
    out: str | None = field(default=None, metadata={"help": "where results go (default: RUN/evaluation, or eval-<name>)"})

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise UserError(f"--dtype must be one of auto, float32, float16, bfloat16; got {self.dtype!r}")
        for name in ("seq_len", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.batch_size < 1 or self.max_windows < 1:
            raise UserError("--batch-size and --max-windows must be at least 1")


@dataclass(frozen=True)
class Targets:
    models: dict[str, str]  # label -> model directory, parent first when there is one
    out: Path


def resolve_targets(target: str, options: EvalOptions) -> Targets:
    where = Path(target)
    parent = options.parent
    if (where / "run.json").is_file():
        if not (where / "model" / "config.json").is_file():
            raise UserError(f"{target}: the run has no pruned model yet; finish `bonsai prune` first")
        models = {"pruned": str(where / "model")}
        if (where / "adapted" / "config.json").is_file():
            models["adapted"] = str(where / "adapted")
        parent = parent or json.loads((where / "run.json").read_text()).get("described", {}).get("model")
        out = Path(options.out) if options.out else where / "evaluation"
    else:
        inspect_model_dir(target, flag="bonsai eval")
        models = {"model": str(where)}
        out = Path(options.out) if options.out else Path(f"eval-{where.resolve().name}")
    if parent:
        inspect_model_dir(parent, flag="--parent")
        check_same_tokenizer(parent, next(iter(models.values())))
        models = {"parent": parent, **models}
    return Targets(models, out)


def check_same_tokenizer(parent: str, model: str) -> None:
    from bonsai.stages.model_io import load_tokenizer

    a, b = load_tokenizer(parent), load_tokenizer(model)
    if a.get_vocab() != b.get_vocab() or (a.bos_token_id, a.eos_token_id) != (b.bos_token_id, b.eos_token_id):
        raise UserError(f"--parent {parent}: its tokenizer differs from {model}'s; comparisons need the same tokenizer")


def _context(model_dir: str) -> int:
    return int(json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings") or 2048)


def ppl_source(options: EvalOptions) -> str | None:
    if options.ppl_data:
        return options.ppl_data
    try:
        source_digest(DEFAULT_PPL_DATA)
    except UserError:
        return None  # wikitext-2 is not on this machine; perplexity only when asked for
    return DEFAULT_PPL_DATA


def run_eval(target: str, options: EvalOptions, execute: Executor = Inline()) -> dict:
    # imported here, not at the top: the CLI builds its flags from EvalOptions and checks
    # targets before torch, transformers and lm-eval are loaded
    from bonsai.stages import eval_report, harness, perplexity, speed

    targets = resolve_targets(target, options)
    source = ppl_source(options)
    spec = harness.resolve_tasks(list(options.tasks)) if options.tasks else None
    if source is None and spec is None and not options.speed:
        raise UserError("nothing to evaluate: give --ppl-data SOURCE (wikitext-2 is not on disk), --tasks, or --speed")
    store = Store(targets.out)
    refs = {label: external_ref("model", d, model_digest(d)) for label, d in targets.models.items()}
    ppl, protocols, tables, speeds = {}, {}, {}, {}
    if source is not None:
        data = ArtifactRef("data", key="text", path=describe(source), digest=source_digest(source, flag="--ppl-data"))
        seq_len = options.seq_len or min(2048, *(_context(d) for d in targets.models.values()))
        cfg = perplexity.PerplexityConfig(seq_len, options.max_windows, options.batch_size, options.dtype)
        for label, ref in refs.items():
            info = execute(f"perplexity-{label}", perplexity.run, ref, data, cfg, store, options.device).info()
            ppl[label] = {**info, "data": source}
            protocols[label] = info["protocol"]
    if spec is not None:
        import lm_eval

        cfg = harness.HarnessConfig(spec.names, spec.include, spec.digest, spec.registered, options.limit,
                                    options.batch_size, options.dtype, getattr(lm_eval, "__version__", "?"))
        for label, ref in refs.items():
            tables[label] = harness.read(execute(f"harness-{label}", harness.run, ref, cfg, store, options.device))
    if options.speed:
        cfg = speed.SpeedConfig(dtype=options.dtype)
        for label, directory in targets.models.items():
            speeds[label] = execute(f"speed-{label}", speed.measure, directory, cfg, options.device)
    results = eval_report.results_table(ppl, tables, speeds)
    markdown = execute("report", eval_report.write, targets.out, results, protocols)
    return {"out": str(targets.out), "report": markdown, "results": results.to_dicts()}
