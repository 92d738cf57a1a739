"""Gemma 3 (270M to 27B, `gemma3_text`): Gemma 2's layout (GeGLU, an explicit `head_dim`,
norms around each block) plus per-head RMSNorms on queries and keys shared by all heads (as
Qwen3's), interleaved sliding-window and global layers with two RoPE bases, and a scaled
embedding.  None of these touch a head's or a channel's own tensors, so the table is LLaMA's.

Its GGUF architecture is `gemma3`, which transformers reads as `gemma3_text`.  The small
sizes (270M, 1B) have one KV head per layer: a layer's heads form a single group and are kept
or removed together, so attention is pruned layer by layer there and the fine-grained
pruning happens in the MLP channels.
"""

from bonsai.stages.core.families.base import Family

FAMILY = Family(
    name="gemma3",
    model_types=("gemma3_text",),
    gguf_architectures=("gemma3",),
    mlp_out_adds_to_residual=False,  # the MLP output is normalised before it joins the residual
    notes="Gemma 2's layout + shared q/k RMSNorm, sliding/global layers; 270M/1B: one KV group per layer",
)
