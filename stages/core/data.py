"""Text sources: local .txt / .jsonl / .parquet files, folders of them, or ``hf:NAME[:CONFIG[:SPLIT]]``
for a `datasets` dataset that is already on disk (a ``save_to_disk`` folder, a local
dataset folder, or a hub dataset in the local cache; nothing is downloaded)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from bonsai.artifacts.digest import DigestCache
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.paths import cache_dir

SUFFIXES = (".txt", ".jsonl", ".parquet")
HF_PREFIX = "hf:"
_TXT_BLOCK = 1 << 20  # read big .txt files in ~1 MB blocks of whole lines


def _files(spec: str, flag: str) -> list[Path]:
    path = Path(spec)
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise UserError(f"{flag} {spec}: unsupported file type; use .txt, .jsonl, .parquet or hf:NAME")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise UserError(f"{flag} {spec}: the folder holds no .txt, .jsonl or .parquet files")
        return files
    raise UserError(f"{flag} {spec}: no such file or directory")


def _parse_hf(spec: str) -> tuple[str, str | None, str]:
    parts = spec[len(HF_PREFIX) :].split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


def _load_hf(spec: str, flag: str):
    import datasets

    name, config, split = _parse_hf(spec)
    try:
        if Path(name).is_dir() and (Path(name) / "dataset_info.json").is_file():
            data = datasets.load_from_disk(name)
            return data[split] if isinstance(data, datasets.DatasetDict) else data
        return datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise UserError(
            f"{flag} {spec}: not readable from local disk ({first}); download it once on a "
            f"connected machine (datasets.load_dataset) or point {flag} at local files"
        ) from None


def check_data(spec: str, flag: str = "--data") -> None:
    """What can be refused without reading the text (a local file's existence and type)."""
    if not spec.startswith(HF_PREFIX):
        _files(spec, flag)


def source_digest(spec: str, flag: str = "--data") -> str:
    """Identity of the text: file contents, or the dataset's own fingerprint."""
    h = hashlib.sha256()
    if spec.startswith(HF_PREFIX):
        data = _load_hf(spec, flag)
        if "text" not in data.column_names:
            raise UserError(
                f"{flag} {spec}: the dataset has no 'text' column (columns: {', '.join(data.column_names)})"
            )
        h.update(f"{spec}|{data._fingerprint}".encode())
        return h.hexdigest()
    root, files = Path(spec), list(_files(spec, flag))

    def read_all() -> str:
        for path in files:
            h.update(str(path.relative_to(root) if root.is_dir() else path.name).encode() + b"\0")
            with open(path, "rb") as f:
                while chunk := f.read(8 << 20):
                    h.update(chunk)
        return h.hexdigest()

    # remembered by the files' (path, size, mtime), as the model's are: the command checks its
    # inputs before Prefect starts and the flow prepares them again, and a resume reads them a
    # third time; a large text is read once
    cache = DigestCache(cache_dir() / "file-digests.json")
    digest = cache.remember(files, read_all, kind="text|")
    cache.save()
    return digest


def documents(spec: str, flag: str = "--data") -> Iterator[tuple[str, bool, bool]]:
    """Yield (text, starts_document, ends_document) in a fixed order.  Big .txt files come
    in blocks of whole lines: only the first starts the document, only the last ends it."""
    if spec.startswith(HF_PREFIX):
        data = _load_hf(spec, flag)
        if "text" not in data.column_names:
            raise UserError(f"{flag} {spec}: the dataset has no 'text' column")
        for row in data:
            if row["text"]:
                yield row["text"], True, True
        return
    for path in _files(spec, flag):
        if path.suffix == ".txt":
            yield from _txt_blocks(path)
        elif path.suffix == ".jsonl":
            yield from ((t, True, True) for t in _jsonl_texts(path, flag))
        else:
            yield from ((t, True, True) for t in _parquet_texts(path, flag))


def _txt_blocks(path: Path) -> Iterator[tuple[str, bool, bool]]:
    first, pending = True, None
    block: list[str] = []
    size = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            block.append(line)
            size += len(line)
            if size >= _TXT_BLOCK:
                if pending is not None:
                    yield pending, first, False
                    first = False
                pending, block, size = "".join(block), [], 0
    if block:
        if pending is not None:
            yield pending, first, False
            first = False
        pending = "".join(block)
    if pending is not None and pending.strip():
        yield pending, first, True


def _jsonl_texts(path: Path, flag: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise UserError(f"{flag} {path}: line {number} is not JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f"{flag} {path}: line {number} has no string field 'text'")
            if record["text"]:
                yield record["text"]


def _parquet_texts(path: Path, flag: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except Exception as exc:
        raise UserError(f"{flag} {path}: not a readable Parquet file ({exc})") from None
    if "text" not in handle.schema_arrow.names:
        raise UserError(f"{flag} {path}: no 'text' column (columns: {', '.join(handle.schema_arrow.names)})")
    for batch in handle.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


def describe(spec: str) -> str:
    return spec if spec.startswith(HF_PREFIX) else os.path.abspath(spec)
