"""SmolLM2-135M-Instruct pruned to 20 % and 30 %, as GGUF files in stock llama.cpp: size,
prefill and decode speed against the parent's GGUF of the same type, and perplexity of the
GGUF against the transformers model.

    bash scripts/setup-llamacpp.sh                 # llama.cpp (llama-cpp-python), once
    python benchmarks/real_model.py prune --estimator regression --seed 0 --reconstruct lsq
    python benchmarks/gguf_files.py [--run DIR] [--types q8_0 f16] [--repeats 9]

The 20 % model is the run's state after its second iteration, exported by the same export
stage as its final (30 %) model.  The parent is written by the same writer (architecture
``deci``, every layer at full size), so both files run through the same llama.cpp graph;
speeds are medians of interleaved repeats (stages/reports/speed.py), one sequence, all cores.
Perplexity: the real-model benchmark's held-out windows (64 x 256 tokens of Python's
documentation the calibration never saw), scored by llama.cpp and by transformers.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import common
import numpy as np
import real_model
import torch

from bonsai.artifacts import Store, external_ref
from bonsai.flows.export import gguf_families, tokenizer_source
from bonsai.stages import export, gguf
from bonsai.stages.core.model_dirs import model_digest
from bonsai.stages.core.model_io import PrunedModel, load_model
from bonsai.stages.core.model_source import resolve as resolve_model
from bonsai.stages.core.nll import mean_nll
from bonsai.stages.reports.render import pyplot, save
from bonsai.stages.reports.speed import SpeedConfig, measure_llama_cpp, speedup

OUT = common.RESULTS / "gguf"


def model_dirs(run: Path) -> dict[str, Path]:
    """{label: Hugging Face directory}: the parent, and the run's state at 20 % and 30 %."""
    store = Store(run)
    parent = resolve_model(real_model.model(), dtype=lambda: "float32")
    parent_ref = external_ref("parent", parent.path, model_digest(parent.path))
    out = {"parent": Path(parent.path)}
    for sparsity, select, repairs in real_model.states(run):
        label = f"pruned {round(100 * sparsity)} %"
        ref = export.run(PrunedModel(parent_ref, select, tuple(repairs)), export.ExportConfig(), store)
        out[label] = Path(ref.file(export.MODEL))
    return {k: v for k, v in out.items() if k in ("parent", "pruned 20 %", "pruned 30 %")}


def gguf_files(dirs: dict[str, Path], kind: str) -> dict[str, str]:
    store = Store(OUT)
    tokenizer = tokenizer_source(resolve_model(real_model.model(), dtype=lambda: "float32"))
    files = {}
    for label, directory in dirs.items():
        cfg = gguf.GgufConfig(type=kind, name=label.replace(" ", "").replace("%", ""))
        ref = gguf.run(
            external_ref("model", directory, model_digest(str(directory))), tokenizer, cfg, store, gguf_families()
        )
        files[label] = str(ref.file(gguf.file_name(cfg)))
    return files


def llama_cpp_perplexity(path: str, windows: torch.Tensor) -> float:
    from llama_cpp import Llama

    engine = Llama(model_path=path, n_ctx=windows.shape[1], logits_all=True, verbose=False)
    total = 0.0
    for window in windows.tolist():
        engine.reset()
        engine.eval(window)
        logits = np.array(engine.scores[: len(window)], dtype=np.float64)
        top = logits.max(1, keepdims=True)
        logprobs = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
        total -= logprobs[np.arange(len(window) - 1), window[1:]].sum()
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default=str(real_model.OUT / "regression-seed0-lsq"))
    parser.add_argument("--types", nargs="+", default=["q8_0", "f16"])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    common.setup_logging()
    OUT.mkdir(parents=True, exist_ok=True)
    dirs = model_dirs(Path(args.run))
    windows = real_model.Scorer("docs").windows
    cfg = SpeedConfig(shapes=((1, 128), (1, 512)), repeats=args.repeats, warmup=2)
    rows, record = [], {}
    for kind in args.types:
        files = gguf_files(dirs, kind)
        measured = measure_llama_cpp(files, cfg)
        for label, path in files.items():
            size = Path(path).stat().st_size
            ppl = llama_cpp_perplexity(path, windows)
            record[f"{label} {kind}"] = {"bytes": size, "perplexity": ppl, "speed": measured[label]}
        parent = {(r["metric"], r["tokens"]): r for r in measured["parent"]}
        for label in files:
            if label == "parent":
                continue
            size_ratio = record[f"parent {kind}"]["bytes"] / record[f"{label} {kind}"]["bytes"]
            for r in measured[label]:
                if r["metric"] == "weights":
                    continue
                base = parent[(r["metric"], r["tokens"])]
                faster = speedup(base["value"], r["value"], r["unit"])
                rows.append(
                    [
                        label,
                        kind,
                        f"{r['metric']} {r['tokens']}",
                        base["value"],
                        r["value"],
                        r["unit"],
                        faster,
                        size_ratio,
                    ]
                )
    for label, directory in dirs.items():
        model = load_model(directory, torch.float32, torch.device("cpu"))
        record[f"{label} transformers"] = {"perplexity": math.exp(mean_nll(model, windows, 16, torch.device("cpu"))[0])}
    (OUT / "results.json").write_text(json.dumps(record, indent=1))
    print(common.markdown(["model", "type", "measure", "parent", "pruned", "unit", "speed-up", "size ratio"], rows))
    sizes = [[k, v.get("bytes", ""), v["perplexity"]] for k, v in record.items()]
    print(common.markdown(["model", "bytes", "held-out perplexity"], sizes))
    plot(rows, common.PLOTS / "gguf-speed.png")


def plot(rows: list[list], path: Path) -> None:
    """Speed-up over the parent's file of the same type beside the size ratio, per model and type:
    a memory-bound decoder's bar reaches its size ratio's."""
    plt = pyplot()
    measures = sorted({r[2] for r in rows})
    labels = sorted({(r[0], r[1]) for r in rows})
    fig, axes = plt.subplots(1, len(measures), figsize=(3.2 * len(measures), 3.4), sharey=True, squeeze=False)
    for ax, measure in zip(axes[0], measures):
        for i, (label, kind) in enumerate(labels):
            row = next(r for r in rows if (r[0], r[1], r[2]) == (label, kind, measure))
            ax.bar(i, row[6], color="tab:blue")
            ax.plot([i - 0.4, i + 0.4], [row[7], row[7]], color="black", linewidth=2)
        ax.set_xticks(range(len(labels)), [f"{lb}\n{k}" for lb, k in labels], fontsize=7)
        ax.axhline(1.0, color="gray", linestyle=":")
        ax.set_title(measure, fontsize=9)
    axes[0][0].set_ylabel("speed-up over the parent (bar)\nparent size / pruned size (line)")
    fig.suptitle("SmolLM2-135M-Instruct in llama.cpp: pruned GGUF files against the parent's")
    save(fig, path)


if __name__ == "__main__":
    main()
