"""LLaMA 1/2/3 (MHA and GQA): RMSNorm, SwiGLU MLP, no biases unless `attention_bias`."""

from bonsai.stages.core.families.base import Family

FAMILY = Family(name="llama", model_types=("llama",), gguf=True, notes="RMSNorm, SwiGLU; MHA or GQA")
