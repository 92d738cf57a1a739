"""Supported model families, registered explicitly.

Adding a family: write ``stages/core/families/<name>.py`` with a ``FAMILY = Family(...)`` table
(see base.py for the fields), add it to ``_REGISTERED`` below, and add it to the family
list in tests/test_families.py, which checks masking, slicing, export and reload for it.
"""

from __future__ import annotations

from bonsai.stages.core.families import gemma, gemma3, llama, mistral, phi, qwen2, qwen3
from bonsai.stages.core.families.base import Family

_REGISTERED: tuple[Family, ...] = (
    llama.FAMILY,
    mistral.FAMILY,
    qwen2.FAMILY,
    qwen3.FAMILY,
    phi.FAMILY,
    gemma.FAMILY,
    gemma3.FAMILY,
)

FAMILIES: dict[str, Family] = {f.name: f for f in _REGISTERED}

EXPORT_PREFIX = "bonsai_"


def supported_model_types() -> list[str]:
    return sorted(t for f in _REGISTERED for t in f.model_types)


def gguf_architecture_names() -> list[str]:
    """GGUF architectures that name a registered family (transformers decides which it reads)."""
    return sorted({*supported_model_types(), *(a for f in _REGISTERED for a in f.gguf_architectures)})


def family_for_model_type(model_type: str) -> Family | None:
    """The family of a config's model_type; a Bonsai export maps back to its parent family."""
    base = model_type[len(EXPORT_PREFIX) :] if model_type.startswith(EXPORT_PREFIX) else model_type
    for family in _REGISTERED:
        if base in family.model_types:
            return family
    return None


__all__ = ["FAMILIES", "Family", "family_for_model_type", "gguf_architecture_names", "supported_model_types"]
