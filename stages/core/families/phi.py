"""Phi-1.5 / Phi-2: LayerNorm, attention and MLP in parallel on the same normed input,
a two-matrix GELU MLP (fc1, fc2), an output projection named `dense`, partial rotary
embeddings and biases everywhere.

Masking still acts on the inputs of the two output projections (`dense`, `fc2`), whose
biases belong to no unit, so the parallel block changes nothing; partial rotary acts
within each head.  The paper prunes Phi-2 one-shot (configs/one-shot-l2.yaml).
"""

from bonsai.stages.core.families.base import Family

FAMILY = Family(
    name="phi",
    model_types=("phi",),
    attention_out="dense",
    mlp_in=("fc1",),
    mlp_out="fc2",
    notes="LayerNorm, parallel attention+MLP, fc1/fc2, partial rotary, biases",
)
