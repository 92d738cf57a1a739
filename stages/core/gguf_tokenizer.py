"""The tokenizer keys of an exported GGUF file.

``tokenizer.*`` keys do not depend on the architecture, so a parent that came as a GGUF file
gives its own, copied key by key with their types (the conversion keeps them in
``tokenizer.gguf`` next to the dequantized weights: model_source.py).  A parent that came as a
Hugging Face directory gives its tokenizer.json: a byte-level BPE (LLaMA 3, Qwen2, SmolLM2,
GPT-2 style) written as llama.cpp's ``gpt2`` tokenizer with the pre-tokenizer llama.cpp names
after it, or a LLaMA 2 / Mistral style BPE with byte fallback written as its ``llama``
tokenizer.  Anything else is refused in one line.  The chat template goes along, so that
`llama-cli` chats with the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from bonsai.stages.core.errors import UserError

TOKENIZER_FILE = "tokenizer.gguf"  # the parent GGUF's tokenizer keys, kept by the conversion
PREFIX = "tokenizer."

# llama.cpp's names for byte-level pre-tokenizers, by what tokenizer.json's pre_tokenizer does
# (its splitting regex, if any, and whether digits are split one by one)
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    ("byte-level", False): "gpt-2",
    ("byte-level", True): "smollm",
    (_LLAMA3, False): "llama-bpe",
    (_QWEN2, False): "qwen2",
    (_GPT2, False): "gpt-2",
}


def copy_keys(source: Path) -> Callable:
    """A writer callback adding every ``tokenizer.*`` key of the GGUF file ``source``."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    fields = [(name, field) for name, field in reader.fields.items() if name.startswith(PREFIX)]
    if not any(name == "tokenizer.ggml.model" for name, _ in fields):
        raise UserError(f"{source}: holds no tokenizer (tokenizer.ggml.model)")
    values = [(name, field.contents(), field.types) for name, field in fields]

    def add(writer) -> None:
        for name, value, types in values:
            sub = types[-1] if types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, value, types[0], sub_type=sub)

    return add


def save_keys(source: Path, out: Path) -> None:
    """Keep the ``tokenizer.*`` keys of GGUF file ``source`` as a GGUF file of their own."""
    import gguf

    writer = gguf.GGUFWriter(str(out), "tokenizer")
    copy_keys(source)(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def _pre_tokenizer(config: dict) -> str | None:
    """llama.cpp's name for a byte-level BPE's pre-tokenizer, None if it has none."""
    parts = config.get("pretokenizers", [config]) if config.get("type") == "Sequence" else [config]
    regex, digits, byte_level_regex = None, False, False
    for part in parts:
        kind = part.get("type")
        if kind == "Split":
            regex = part.get("pattern", {}).get("Regex")
        elif kind == "Digits":
            digits = bool(part.get("individual_digits"))
        elif kind == "ByteLevel":
            byte_level_regex = part.get("use_regex", True)
        else:
            return None
    key = (regex, digits) if regex is not None else (("byte-level", digits) if byte_level_regex else None)
    return PRE_TOKENIZERS.get(key) if key else None


def from_directory(model_dir: Path, families: str) -> Callable:
    """A writer callback adding the tokenizer of a Hugging Face directory (see the module
    docstring); ``families``: named in the refusal of any other tokenizer."""
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"GGUF export: {model_dir} has no tokenizer.json (the fast tokenizers of {families} export)")
    config = json.loads(path.read_text())
    model = config.get("model", {})
    decoder = (config.get("decoder") or {}).get("type")
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder == "ByteLevel":
        pre = _pre_tokenizer(config.get("pre_tokenizer") or {})
        if pre is None:
            raise UserError(
                f"GGUF export: the byte-level tokenizer of {model_dir} splits text in a way llama.cpp has no "
                f"name for here (the tokenizers of {families} export)"
            )
        vocab, name = gguf.BpeVocab(model_dir), "gpt2"
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        vocab, name, pre = gguf.LlamaHfVocab(model_dir), "llama", "default"
    else:
        raise UserError(
            f"GGUF export: the {model.get('type', 'unknown')} tokenizer of {model_dir} is not one llama.cpp "
            f"reads as gpt2 or llama (the tokenizers of {families} export)"
        )
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    special = gguf.SpecialVocab(model_dir, load_merges=name == "gpt2", n_vocab=len(tokens))

    def add(writer) -> None:
        writer.add_tokenizer_model(name)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        if name == "llama":
            writer.add_token_scores(scores)
        writer.add_token_types(types)
        special.add_to_gguf(writer, quiet=True)

    return add
