"""Mistral: LLaMA's tensors with GQA and sliding-window attention (the window needs no change)."""

from bonsai.stages.core.families.base import Family

FAMILY = Family(name="mistral", model_types=("mistral",), gguf=True, notes="GQA, sliding-window attention")
