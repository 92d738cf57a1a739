"""GGUF stage: a pruned (or adapted) model as a GGUF file that stock llama.cpp runs.

The maths of the file is in core/gguf_export.py, its tokenizer in core/gguf_tokenizer.py.  The
artifact is one file, keyed by the model directory's digest, the tokenizer source's and the
type, so re-running an export is free and a changed model is exported again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bonsai.artifacts import ArtifactRef, Store, kill_point
from bonsai.stages.core import gguf_export, gguf_tokenizer

VERSION = "1"


@dataclass(frozen=True, kw_only=True)
class GgufConfig:
    type: str  # gguf_export.TYPES
    name: str  # the file's stem and general.name: <model>-<type>.gguf


def file_name(cfg: GgufConfig) -> str:
    return f"{cfg.name}-{cfg.type}.gguf"


def run(model: ArtifactRef, tokenizer: ArtifactRef, cfg: GgufConfig, store: Store, families: str) -> ArtifactRef:
    """``model``: a model directory (RUN/model, RUN/adapted); ``tokenizer``: the parent's GGUF
    file, whose tokenizer keys are copied, or its Hugging Face directory; ``families``: the
    families that export, named when a tokenizer is refused."""

    def build(out: Path) -> dict:
        source = Path(tokenizer.path)
        if source.is_file():
            keys = gguf_tokenizer.copy_keys(source)
        else:
            keys = gguf_tokenizer.from_directory(source, families)
        info = gguf_export.write(Path(model.path), out / file_name(cfg), cfg.type, keys, cfg.name)
        kill_point("gguf")
        return {**info, "bytes": (out / file_name(cfg)).stat().st_size}

    return store.produce("gguf-file", VERSION, cfg, [model, tokenizer], build)
