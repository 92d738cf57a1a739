"""A pruned model as a GGUF file that stock llama.cpp runs, quantized or not.

llama.cpp's ``deci`` architecture (written for NVIDIA's Nemotron, whose layers differ in size)
reads per-layer arrays of head counts, key/value head counts and MLP widths, so a model whose
every layer keeps a different number of heads and channels is an ordinary file to it.  Its
graph (src/models/deci.cpp in llama.cpp) has four quirks, each met exactly here:

- the key length and rope dimensions are read only when layer 0 has heads (they default from
  layer 0's head count): layer 0 always keeps at least one head, a zero-output one if pruning
  took them all;
- a layer with heads and no MLP drops its attention output (the MLP-free branch skips the
  residual sum): such a layer gets a zero MLP of ``DUMMY_CHANNELS`` channels;
- ``head_count > 0`` with ``head_count_kv == 0`` is Nemotron's "linear attention", so a layer
  with no heads is written with both 0 (its attention output bias, if the repair gave it one,
  rides on a zero head instead);
- a layer with neither heads nor channels (and no bias) is the identity and is left out.

Quantized rows are blocks of 32 values, so an MLP width that is not a multiple of 32 is padded
with zero channels (silu(0) * 0 = 0: exact).  Q and K are permuted per layer for llama.cpp's
rotary layout with that layer's own head counts.  Families: those whose layers ``deci`` can
express (``Family.gguf``); the tokenizer comes from the parent's own GGUF file when it came as
one, otherwise from its Hugging Face tokenizer (tokenizer.py).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bonsai.stages.core.errors import UserError
from bonsai.stages.core.progress import Progress

log = logging.getLogger("bonsai.gguf")

ARCHITECTURE = "deci"
DUMMY_CHANNELS = 32  # a zero MLP this wide keeps a layer's attention output in deci's graph
QUANT_BLOCK = 32  # values per quantized block: a quantized tensor's rows are a multiple of it

# Hugging Face tensor names of a LLaMA-layout layer -> llama.cpp's
_LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _ggml(kind: str):
    import gguf

    return {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
    }[kind]


def _file_type(kind: str) -> int:
    import gguf

    return {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[kind]


@dataclass(frozen=True)
class Block:
    """One written block: which layer it holds and the sizes llama.cpp reads for it."""

    layer: int  # the model's layer index
    kv_heads: int  # key/value heads written (0: no attention)
    heads: int  # query heads written
    channels: int  # MLP channels written, zero padding included (0: no MLP)
    zero_head: bool  # the one head written is a zero-output stand-in
    kept_channels: int  # the model's own channels (the rest of ``channels`` are zero)


def plan_blocks(
    kv_heads: list[int], channels: list[int], per_group: int, head_bias: list[bool], mlp_bias: list[bool], pad: int
) -> list[Block]:
    """The blocks to write for a model with these per-layer sizes (see the module docstring).
    ``head_bias``/``mlp_bias``: whether a layer's attention / MLP output projection has a bias;
    ``pad``: MLP widths are rounded up to a multiple of it."""
    blocks = []
    for layer, (groups, width) in enumerate(zip(kv_heads, channels)):
        zero_head = groups == 0 and (not blocks or head_bias[layer])
        attends = groups > 0 or zero_head
        if not attends and width == 0 and not mlp_bias[layer]:
            continue  # the identity
        written = width
        if width == 0 and (attends or mlp_bias[layer]):
            written = DUMMY_CHANNELS
        written = -(-written // pad) * pad if written else 0
        heads = (groups * per_group) if groups else (1 if zero_head else 0)
        blocks.append(Block(layer, groups or (1 if zero_head else 0), heads, written, zero_head, width))
    if not blocks:
        raise UserError("the pruned model has no layer left that llama.cpp can write")
    if blocks[0].kv_heads == 0:  # the first block written must have a head (key length, rope dims)
        first = blocks[0]
        blocks[0] = Block(first.layer, 1, 1, first.channels or DUMMY_CHANNELS, True, first.kept_channels)
    return blocks


def permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a Q or K projection (or bias) reordered from Hugging Face's rotate-half layout to
    llama.cpp's interleaved pairs, head by head."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


class Weights:
    """The tensors of a saved model directory, read one at a time (safetensors, any sharding)."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.files = {}
        for path in sorted(directory.glob("*.safetensors")):
            handle = safe_open(str(path), framework="pt")
            for name in handle.keys():
                self.files[name] = handle

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.files[name].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self.files[name].get_tensor(name).float()


@dataclass(frozen=True)
class Planned:
    """One tensor to write: its GGUF name, its float32 shape, and how to make it."""

    name: str
    shape: tuple[int, ...]
    make: object  # () -> float32 tensor


def block_tensors(weights: Weights, block: Block, number: int, hidden: int, head_dim: int) -> list[Planned]:
    """The tensors of one written block (``blk.<number>.*``), made only when written."""
    prefix, out = f"model.layers.{block.layer}.", []

    def add(name: str, shape, make) -> None:
        out.append(Planned(f"blk.{number}.{name}", tuple(shape), make))

    def source(name: str, transform=None):
        def make():
            tensor = weights.get(prefix + name)
            return transform(tensor) if transform is not None else tensor

        return make

    if block.kv_heads:
        add("attn_norm.weight", (hidden,), source("input_layernorm.weight"))
        if block.zero_head:
            for name, shape in (("q", (head_dim, hidden)), ("k", (head_dim, hidden)), ("v", (head_dim, hidden))):
                add(f"attn_{name}.weight", shape, functools.partial(torch.zeros, shape))
            add("attn_output.weight", (hidden, head_dim), functools.partial(torch.zeros, (hidden, head_dim)))
            if prefix + "self_attn.o_proj.bias" in weights:
                add("attn_output.bias", (hidden,), source("self_attn.o_proj.bias"))
        else:
            for hf, heads in (("q", block.heads), ("k", block.kv_heads), ("v", 0), ("o", 0)):
                gguf_name = "attn_output" if hf == "o" else f"attn_{hf}"
                for part in ("weight", "bias"):
                    name = f"self_attn.{hf}_proj.{part}"
                    if prefix + name in weights:
                        rotary = functools.partial(permute, heads=heads) if heads else None
                        add(f"{gguf_name}.{part}", weights.shape(prefix + name), source(name, rotary))
    if block.channels:
        add("ffn_norm.weight", (hidden,), source("post_attention_layernorm.weight"))
        pad = block.channels - block.kept_channels
        for hf, dim in (("gate", 0), ("up", 0), ("down", 1)):
            shape = (block.channels, hidden) if dim == 0 else (hidden, block.channels)
            zeros = (pad, hidden) if dim == 0 else (hidden, pad)
            if block.kept_channels:
                padded = functools.partial(_pad, zeros=zeros, dim=dim)
                make = source(f"mlp.{hf}_proj.weight", padded)
            else:
                make = functools.partial(torch.zeros, shape)
            add(f"ffn_{hf}.weight", shape, make)
        if prefix + "mlp.down_proj.bias" in weights:
            add("ffn_down.bias", (hidden,), source("mlp.down_proj.bias"))
    return out


def _pad(tensor: torch.Tensor, zeros: tuple[int, int], dim: int) -> torch.Tensor:
    return torch.cat([tensor, torch.zeros(zeros)], dim=dim) if zeros[dim] else tensor


def model_config(model_dir: Path):
    """(config.json as a dict, the family's transformers config built from it)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from bonsai.stages.core.families import EXPORT_PREFIX

    raw = json.loads((model_dir / "config.json").read_text())
    base = raw["model_type"].removeprefix(EXPORT_PREFIX)
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map", "architectures")}
    return raw, CONFIG_MAPPING[base].from_dict(fields)


def layer_sizes(raw: dict, config) -> tuple[list[int], list[int]]:
    """(KV heads, MLP channels) per layer: a Bonsai export's per-layer fields, else uniform."""
    layers = config.num_hidden_layers
    kv = raw.get("layer_num_key_value_heads") or [config.num_key_value_heads] * layers
    ff = raw.get("layer_intermediate_sizes") or [config.intermediate_size] * layers
    return [int(k) for k in kv], [int(f) for f in ff]


def _encoded(shape: tuple[int, ...], kind: str):
    """(numpy dtype, byte shape, GGML type) a float32 tensor of ``shape`` is written as under
    export type ``kind``: 1-D tensors (norms, biases) stay float32, as llama.cpp's converter
    keeps them; a matrix whose rows are not whole blocks of 32 is written as F16."""
    import gguf

    types = gguf.GGMLQuantizationType
    if len(shape) == 1 or kind == "f32":
        return np.float32, shape, types.F32
    if kind == "f16" or (kind != "bf16" and shape[-1] % QUANT_BLOCK):
        return np.float16, shape, types.F16
    qtype = _ggml(kind)
    if qtype == types.BF16:
        return np.uint16, shape, qtype
    return np.uint8, tuple(gguf.quant_shape_to_byte_shape(shape, qtype)), qtype


def _encode(tensor: torch.Tensor, kind: str) -> np.ndarray:
    import gguf

    data = tensor.detach().float().contiguous().numpy()
    dtype, _, qtype = _encoded(data.shape, kind)
    if dtype == np.float32:
        return data
    if dtype == np.float16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def _kind_for(tensor_name: str, kind: str) -> str:
    """Q4_0 keeps the embedding and output matrices at Q8_0 (llama.cpp's quantizer keeps the
    output wider too); every other type applies to every matrix."""
    if kind == "q4_0" and tensor_name in ("token_embd.weight", "output.weight"):
        return "q8_0"
    return kind


def write(model_dir: Path, out: Path, kind: str, tokenizer, name: str, architecture: str = ARCHITECTURE) -> dict:
    """Write the model saved in ``model_dir`` (a Bonsai export or any LLaMA-layout directory)
    as a GGUF file of type ``kind`` (TYPES); ``tokenizer(writer)`` adds the tokenizer's keys.
    With ``architecture="llama"`` an unpruned model is written as llama.cpp's own converter
    would write it (the tests' GGUF parents).  The header is planned from shapes alone; then
    the tensors are read, converted and written one at a time."""
    import gguf

    raw, config = model_config(model_dir)
    weights = Weights(model_dir)
    kv, ff = layer_sizes(raw, config)
    per_group = config.num_attention_heads // config.num_key_value_heads
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    if architecture == ARCHITECTURE:
        bias = lambda tensor: [f"model.layers.{i}.{tensor}.bias" in weights for i in range(len(kv))]  # noqa: E731
        pad = 1 if kind in ("f32", "f16", "bf16") else QUANT_BLOCK
        blocks = plan_blocks(kv, ff, per_group, bias("self_attn.o_proj"), bias("mlp.down_proj"), pad)
    else:
        blocks = [Block(i, g, g * per_group, c, False, c) for i, (g, c) in enumerate(zip(kv, ff))]
    plan = [
        Planned(
            "token_embd.weight",
            weights.shape("model.embed_tokens.weight"),
            functools.partial(weights.get, "model.embed_tokens.weight"),
        )
    ]
    factors = rope_factors(config) if architecture == ARCHITECTURE else None
    if factors is not None:
        plan.append(Planned("rope_freqs.weight", tuple(factors.shape), lambda: factors))
    for number, block in enumerate(blocks):
        plan += block_tensors(weights, block, number, hidden, head_dim)
    plan.append(Planned("output_norm.weight", (hidden,), functools.partial(weights.get, "model.norm.weight")))
    if "lm_head.weight" in weights and not getattr(config, "tie_word_embeddings", False):
        plan.append(
            Planned("output.weight", weights.shape("lm_head.weight"), functools.partial(weights.get, "lm_head.weight"))
        )

    writer = gguf.GGUFWriter(str(out), architecture)
    _metadata(writer, config, blocks, kind, name, architecture, head_dim)
    tokenizer(writer)
    for item in plan:
        dtype, shape, qtype = _encoded(item.shape, _kind_for(item.name, kind))
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(item.name, shape, np.dtype(dtype), nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    progress = Progress(f"gguf ({kind})", len(plan), "tensors")
    for item in plan:
        tensor = item.make()
        if tuple(tensor.shape) != item.shape:
            raise AssertionError(f"{item.name}: planned {item.shape}, made {tuple(tensor.shape)}")
        writer.write_tensor_data(_encode(tensor, _kind_for(item.name, kind)))
        progress.advance()
    writer.close()
    return {"blocks": len(blocks), "tensors": len(plan), "type": kind}


def rope_factors(config) -> torch.Tensor | None:
    """llama.cpp's per-frequency divisors for Llama 3's rope scaling (``rope_freqs.weight``):
    the default inverse frequencies over the scaled ones, from transformers' own rope
    initialisation; None for the other scalings (metadata)."""
    parameters = getattr(config, "rope_parameters", None) or {}
    if parameters.get("rope_type") != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    plain = 1.0 / (parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    return (plain / scaled).float()


def _metadata(writer, config, blocks: list[Block], kind: str, name: str, architecture: str, head_dim: int) -> None:
    import gguf

    writer.add_name(name)
    writer.add_file_type(int(_file_type(kind)))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(len(blocks))
    if architecture == ARCHITECTURE:  # plain Python ints: gguf writes INT32 arrays of them
        writer.add_feed_forward_length([int(b.channels) for b in blocks])
        writer.add_head_count([int(b.heads) for b in blocks])
        writer.add_head_count_kv([int(b.kv_heads) for b in blocks])
    else:
        writer.add_feed_forward_length(int(blocks[0].channels))
        writer.add_head_count(int(blocks[0].heads))
        writer.add_head_count_kv(int(blocks[0].kv_heads))
    # written explicitly: their defaults derive from layer 0's head count, wrong after pruning
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    parameters = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(parameters.get("rope_theta", 10000.0)))
    writer.add_vocab_size(int(config.vocab_size))
    rope_type = parameters.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(parameters["factor"]))
    elif rope_type not in ("default", "llama3"):
        raise UserError(f"GGUF export: rope scaling {rope_type!r} is not supported (default, linear and llama3 are)")
