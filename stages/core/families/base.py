"""What a model family is, to Bonsai: where the tensors of a head and of an MLP channel live.

A family is a table, not code.  Heads are pruned by whole key/value group (under GQA a KV
head and the query heads that read it go together; under MHA a group is one head).  A
group's parameters are its rows of every ``query`` and ``key_value`` projection and its
columns of ``attention_out``; an MLP channel is a row of every ``mlp_in`` projection and a
column of ``mlp_out``.  Masking, slicing, priors and export all read these names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # Hugging Face `config.model_type` values it covers
    layers: str = "model.layers"  # dotted path to the decoder layers
    attention: str = "self_attn"
    query: tuple[str, ...] = ("q_proj",)
    key_value: tuple[str, ...] = ("k_proj", "v_proj")
    attention_out: str = "o_proj"
    mlp: str = "mlp"
    mlp_in: tuple[str, ...] = ("gate_proj", "up_proj")
    mlp_out: str = "down_proj"
    # the MLP output projection's output is added to the residual stream as it is (no norm
    # after it), so a change of its weight changes the layer output by x @ dW^T
    mlp_out_adds_to_residual: bool = True
    tolerance: float = 1e-5  # max |logit| gap, masked parent vs sliced export, float32 (tested)
    # its layers are what llama.cpp's `deci` architecture computes (RMSNorm, SwiGLU, rotary Q/K,
    # optional q/k/v and output biases), so `bonsai export --gguf` writes it (core/gguf_export.py)
    gguf: bool = False
    # GGUF `general.architecture` names transformers reads as this family, where they differ
    # from its model_types (Gemma 3's `gemma3` becomes `gemma3_text`)
    gguf_architectures: tuple[str, ...] = ()
    notes: str = ""  # what differs from LLaMA, shown by `bonsai families`

    def layout(self) -> dict:
        """The module names, as written into an exported config for the remote code."""
        keys = ("layers", "attention", "query", "key_value", "attention_out", "mlp", "mlp_in", "mlp_out")
        data = asdict(self)
        return {k: list(data[k]) if isinstance(data[k], tuple) else data[k] for k in keys}
