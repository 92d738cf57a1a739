"""Calibration stage: cut the text source into fixed-length token windows.

Documents are tokenized with the model's own tokenizer (BOS as the tokenizer adds it at a
document's start, EOS appended at its end), concatenated, and cut into non-overlapping
windows of ``seq_len`` tokens; the first ``pool`` windows are kept.  Each iteration then
draws its ``calib_samples`` windows from this pool with its own seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch

from bonsai.artifacts import ArtifactRef, Store
from bonsai.stages.core.data import documents
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.model_io import load_tokenizer
from bonsai.stages.core.progress import Progress
from bonsai.stages.core.rng import generator

VERSION = "1"
FILE = "windows.parquet"


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    seq_len: int
    calib_pool: int  # windows cut from the start of the text
    calib_samples: int  # the fewest windows that will do


def run(parent: ArtifactRef, data: ArtifactRef, cfg: CalibrationConfig, store: Store) -> ArtifactRef:
    def build(out: Path) -> dict:
        tokenizer = load_tokenizer(parent.path)
        windows, tokens_read = cut_windows(tokenizer, data.path, cfg.seq_len, cfg.calib_pool)
        if len(windows) < cfg.calib_samples:
            need = cfg.calib_samples * cfg.seq_len
            raise UserError(
                f"--data {data.path}: {tokens_read} tokens make {len(windows)} windows of {cfg.seq_len}; "
                f"at least {cfg.calib_samples} windows ({need} tokens) are needed: give more text, or ask for "
                f"fewer or shorter windows"
            )
        table = pl.DataFrame(
            {"window": list(range(len(windows))), "tokens": windows},
            schema={"window": pl.Int32, "tokens": pl.List(pl.Int32)},
        )
        table.write_parquet(out / FILE)
        return {"windows": len(windows), "tokens_read": tokens_read}

    return store.produce("calibration", VERSION, cfg, [parent, data], build)


def cut_windows(tokenizer, spec: str, seq_len: int, pool: int, joined: bool = False) -> tuple[list[list[int]], int]:
    """The first ``pool`` non-overlapping windows of ``seq_len`` tokens of SOURCE, and how
    many tokens were read.  By default each document gets the tokenizer's BOS and an EOS;
    ``joined`` instead joins documents with a blank line under a single BOS (the usual
    protocol for perplexity on corpora such as wikitext)."""
    eos = tokenizer.eos_token_id
    progress = Progress("tokenizing", pool, "windows")
    buffer: list[int] = []
    windows: list[list[int]] = []
    read, first = 0, True
    for text, starts, ends in documents(spec):
        if joined:
            ids = tokenizer(text if first else "\n\n" + text, add_special_tokens=first)["input_ids"]
        else:
            ids = tokenizer(text, add_special_tokens=starts)["input_ids"]
            if ends and eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
        first = False
        read += len(ids)
        buffer.extend(ids)
        while len(buffer) >= seq_len and len(windows) < pool:
            windows.append(buffer[:seq_len])
            del buffer[:seq_len]
            progress.advance()
        if len(windows) >= pool:
            break
    return windows, read


def pool_for(calib_pool: int, calib_samples: int, samples: int) -> int:
    """The pool a draw of ``samples`` windows besides an iteration's ``calib_samples`` comes
    from: the run's, or where that holds too few (the published repair's), a longer one cut the
    same way, so its first windows are the run's."""
    return max(calib_pool, samples + calib_samples)


def draw(calibration: ArtifactRef, seed: int, iteration: int, count: int) -> list[int]:
    """The window ids iteration ``iteration`` uses: a seeded draw without replacement."""
    total = int(calibration.info()["windows"])
    order = torch.randperm(total, generator=generator(seed, "windows", iteration))
    return order[:count].tolist()


def iteration_windows(calibration: ArtifactRef, seed: int, iteration: int, count: int) -> torch.Tensor:
    """The (count, seq_len) token windows iteration ``iteration`` scores everything on."""
    return load_windows(calibration, draw(calibration, seed, iteration, count))


def load_windows(calibration: ArtifactRef, ids: list[int]) -> torch.Tensor:
    table = pl.read_parquet(calibration.file(FILE)).sort("window")
    rows = table["tokens"].to_list()
    return torch.tensor([rows[i] for i in ids], dtype=torch.long)
