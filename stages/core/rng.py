"""Explicit random generators, one per purpose: results never depend on what ran before,
so a run resumed at iteration 7 draws exactly what the uninterrupted run drew there."""

from __future__ import annotations

import hashlib

import torch


def derived_seed(seed: int, *purpose: object) -> int:
    text = "/".join([str(seed), *map(str, purpose)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *purpose: object) -> torch.Generator:
    """A CPU generator seeded from (run seed, stage, iteration, shard, ...)."""
    return torch.Generator().manual_seed(derived_seed(seed, *purpose))
