"""Qwen2 / Qwen2.5: LLaMA's layout with q/k/v biases, which are sliced with their rows."""

from bonsai.stages.core.families.base import Family

FAMILY = Family(name="qwen2", model_types=("qwen2",), gguf=True, notes="q/k/v biases sliced with their rows")
