"""`bonsai eval`: perplexity, lm-eval harness tasks and speed, of a run's models and their parent.

target (RUN or model dir) ->  perplexity(model)   for each model
                              harness(model)      for each model
                              speed(model)        for each model, measured now
                          ->  report (results.parquet/json, report.md, speed.png)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bonsai.artifacts import ArtifactRef, Store, external_ref
from bonsai.flows.executors import Executor, Inline
from bonsai.flows.preflight import run_parent
from bonsai.stages.core.data import describe, source_digest
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.model_dirs import inspect_model_dir, model_digest
from bonsai.stages.core.model_source import ModelSource
from bonsai.stages.core.model_source import resolve as resolve_model
from bonsai.stages.core.options import DEFAULT_PPL_DATA, EvalOptions


@dataclass(frozen=True)
class Targets:
    models: dict[str, str]  # label -> model directory, parent first when there is one
    out: Path
    source: ModelSource  # where the parent (or the model, without one) came from: a GGUF file's tokenizer


def resolve_targets(target: str, options: EvalOptions) -> Targets:
    """The models to evaluate: a run's pruned (and adapted) model and its parent, or any model
    (a directory, a GGUF file, a hub id) with an optional --parent (the same kinds)."""
    where = Path(target)
    parent = None
    if (where / "run.json").is_file():
        if not (where / "model" / "config.json").is_file():
            raise UserError(f"{target}: the run has no pruned model yet; finish `bonsai prune` first")
        models = {"pruned": str(where / "model")}
        if (where / "adapted" / "config.json").is_file():
            models["adapted"] = str(where / "adapted")
        if not options.parent:
            parent = run_parent(json.loads((where / "run.json").read_text()))
        out = Path(options.out) if options.out else where / "evaluation"
        source = parent
    else:
        source = resolve_model(target, dtype=lambda: _dtype(options), flag="bonsai eval")
        inspect_model_dir(source.path, flag="bonsai eval")
        models = {"model": source.path}
        out = Path(options.out) if options.out else Path(f"eval-{Path(source.spec).name.removesuffix('.gguf')}")
    if options.parent:
        parent = resolve_model(options.parent, dtype=lambda: _dtype(options), flag="--parent")
    if parent:
        inspect_model_dir(parent.path, flag="--parent")
        check_same_tokenizer(parent.path, next(iter(models.values())))
        models = {"parent": parent.path, **models}
    if options.speed and options.engine == "llama.cpp":
        from bonsai.flows.export import check_family

        for directory in models.values():
            check_family(directory)
    return Targets(models, out, parent or source)


def _dtype(options: EvalOptions) -> str:
    from bonsai.stages.core.devices import dtype_name, resolve_device, resolve_dtype

    return dtype_name(resolve_dtype(options.dtype, resolve_device(options.device)))


def check_same_tokenizer(parent: str, model: str) -> None:
    from bonsai.stages.core.model_io import load_tokenizer

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
    from bonsai.stages import harness, perplexity
    from bonsai.stages.reports import eval_report, speed

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
        cfg = perplexity.PerplexityConfig(
            seq_len=seq_len, max_windows=options.max_windows, batch_size=options.batch_size, dtype=options.dtype
        )
        for label, ref in refs.items():
            info = execute(f"perplexity-{label}", perplexity.run, ref, data, cfg, store, options.device).info()
            ppl[label] = {**info, "data": source}
            protocols[label] = info["protocol"]
    if spec is not None:
        import lm_eval

        cfg = harness.HarnessConfig(
            tasks=spec.names,
            include=spec.include,
            tasks_digest=spec.digest,
            registered=spec.registered,
            limit=options.limit,
            batch_size=options.batch_size,
            dtype=options.dtype,
            lm_eval_version=getattr(lm_eval, "__version__", "?"),
        )
        for label, ref in refs.items():
            tables[label] = harness.read(execute(f"harness-{label}", harness.run, ref, cfg, store, options.device))
    if options.speed and options.engine == "llama.cpp":
        from bonsai.flows.export import gguf_families, tokenizer_source
        from bonsai.stages import gguf

        tokenizer, files = tokenizer_source(targets.source), {}
        for label, ref in refs.items():
            cfg = gguf.GgufConfig(type=options.gguf_type, name=label)
            made = execute(f"gguf-{label}", gguf.run, ref, tokenizer, cfg, store, gguf_families())
            files[label] = str(made.file(gguf.file_name(cfg)))
        speeds = execute("speed", speed.measure_llama_cpp, files, speed.SpeedConfig())
    elif options.speed:
        # every model at once, interleaved repeats: a drifting machine slows them alike
        speeds = execute("speed", speed.measure, targets.models, speed.SpeedConfig(dtype=options.dtype), options.device)
    results = eval_report.results_table(ppl, tables, speeds)
    engine = f"llama.cpp, {options.gguf_type} GGUF files" if options.engine == "llama.cpp" else "torch"
    markdown = execute("report", eval_report.write, targets.out, results, protocols, engine)
    return {"out": str(targets.out), "report": markdown, "results": results.to_dicts()}
