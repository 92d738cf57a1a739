"""Qwen3: LLaMA's layout plus per-head RMSNorms on queries and keys (q_norm, k_norm).

Those norms act on each head's `head_dim` features with weights shared by all heads, so
removing heads leaves them untouched; a layer with no heads left drops them altogether.
"""

from bonsai.stages.core.families.base import Family

FAMILY = Family(name="qwen3", model_types=("qwen3",), notes="per-head q/k RMSNorm (shared over heads)")
