"""Gemma and Gemma 2: LLaMA's tensor names with GeGLU MLPs, an explicit `head_dim`,
(1 + w) RMSNorms, and for Gemma 2 extra norms around each block, logit soft-capping and
alternating sliding-window layers; none of these touch a head's or a channel's tensors.

Gemma 2B uses multi-query attention (one KV head): a layer's heads form a single group,
so they are kept or removed together.
"""

from bonsai.stages.core.families.base import Family

FAMILY = Family(
    name="gemma",
    model_types=("gemma", "gemma2"),
    mlp_out_adds_to_residual=False,  # Gemma 2 normalises the MLP output before adding it
    notes="GeGLU, explicit head_dim, soft-capping (Gemma 2); MQA heads go together",
)
