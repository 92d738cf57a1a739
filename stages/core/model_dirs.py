"""Checking and fingerprinting model directories, without importing torch.

Kept light on purpose: the command line reports a wrong --model in a fraction of a second,
before torch, transformers and Prefect are imported.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from bonsai.artifacts import DigestCache, value_digest
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.families import EXPORT_PREFIX, Family, family_for_model_type, supported_model_types
from bonsai.stages.core.paths import cache_dir

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


@dataclass(frozen=True)
class ModelInfo:
    path: str
    model_type: str
    family: Family
    remote_code: bool  # a Bonsai export (or other custom code) needs trust_remote_code


def inspect_model_dir(path: str | os.PathLike, flag: str = "--model") -> ModelInfo:
    """Check that ``path`` is a local causal LM of a supported family, or say why not."""
    where = Path(path)
    if not where.is_dir():
        raise UserError(f"{flag} {path}: no such directory")
    config_file = where / "config.json"
    if not config_file.is_file():
        raise UserError(f"{flag} {path}: not a Hugging Face model directory (no config.json)")
    try:
        raw = json.loads(config_file.read_text())
    except ValueError as exc:
        raise UserError(f"{flag} {path}: config.json is not valid JSON ({exc})") from None
    model_type = str(raw.get("model_type", ""))
    remote = needs_remote_code(where)
    if not _is_causal_lm(model_type, raw.get("architectures")):
        raise UserError(f"{flag} {path}: model type {model_type or '(none)'!r} is not a causal language model")
    family = family_for_model_type(model_type)
    if family is None:
        raise UserError(
            f"{flag} {path}: model type {model_type!r} is not supported; supported: "
            f"{', '.join(supported_model_types())} (a new family is one module in stages/core/families/)"
        )
    if not any(p.suffix in WEIGHT_SUFFIXES for p in where.iterdir()):
        raise UserError(f"{flag} {path}: no weight files (*.safetensors or *.bin)")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(where, trust_remote_code=remote)
    except Exception as exc:  # any failure here is a broken directory, not a bug of ours
        raise UserError(f"{flag} {path}: transformers cannot read its config ({str(exc).splitlines()[0]})") from None
    return ModelInfo(str(where.resolve()), model_type, family, remote)


def needs_remote_code(path: str | os.PathLike) -> bool:
    """True for directories whose config names custom classes (every Bonsai export)."""
    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return str(raw.get("model_type", "")).startswith(EXPORT_PREFIX) or "auto_map" in raw


def _is_causal_lm(model_type: str, architectures: list | None) -> bool:
    """The checkpoint's declared head decides (a BERT checkpoint is not causal even though
    transformers can build a causal head for BERT); without one, the model type does."""
    if architectures:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or model_type.startswith(EXPORT_PREFIX)


def model_digest(path: str | os.PathLike) -> str:
    """Digest of every file in the model directory (weights, config, tokenizer).

    File digests are remembered in the user cache by (path, size, mtime): an unchanged 13 GB
    checkpoint is not read again on resume.
    """
    cache = DigestCache(cache_dir() / "file-digests.json")
    parts = {
        item.name: cache.digest(item)
        for item in sorted(Path(path).iterdir())
        if item.is_file() and not item.name.startswith(".")
    }
    cache.save()
    return value_digest(parts)
