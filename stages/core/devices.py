"""Devices and dtypes by name, as the command line and the configs spell them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from bonsai.stages.core.errors import UserError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX-BF16), read
    from the flags the kernel reports, never guessed; False where there are none to read."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pruning_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype sub-models are evaluated in: ``auto`` is bfloat16 on a GPU and on a CPU with
    native bfloat16 (2.5-4x float32's throughput there; BENCHMARKS.md measures that the
    utilities keep the differences the regression fits), float32 on other CPUs."""
    if name == "auto" and device.type == "cpu" and native_bf16():
        return torch.bfloat16
    return resolve_dtype(name, device)


def model_dtype(evaluation: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype everything but the sub-model evaluation works in while pruning: float32 on a
    CPU (the priors' statistics, the repair and the weights it writes stay wide; a bfloat16
    copy of the model serves the evaluation), the evaluation's on a GPU, where memory is short."""
    return torch.float32 if device.type == "cpu" else evaluation


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def stored_dtype(path: str | os.PathLike) -> torch.dtype:
    """The dtype the checkpoint was saved in (exports keep it), float32 if unstated."""
    raw = json.loads((Path(path) / "config.json").read_text())
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return DTYPES.get(str(name).replace("torch.", ""), torch.float32)
