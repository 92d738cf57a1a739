"""Golden outputs of the small tiny run: a stage whose output changes without a VERSION bump
fails here (a resumed run would otherwise mix old and new outputs under one key).

After a deliberate change (with its VERSION bumped), rewrite the goldens with
``BONSAI_UPDATE_GOLDEN=1 ./scripts/test.sh tests/test_golden.py`` and commit them.
Floats are compared to a relative 1e-5, so a different CPU's rounding does not fail the test.
Tables and tensors are compared by content, never by file bytes: a parquet or safetensors
writer's version may change how the same values are laid out in the file, and a golden that
fails must mean the project's output changed.

The run is made in a child process with torch's, MKL's and OpenBLAS's kernels fixed
(``tiny.KERNELS``): each picks vectorised kernels by CPU (AVX-512 on one machine of this kind, AVX2
on another), their last-bit differences move priors by about 1e-11 and regression importances
by about 3e-8, and that is enough to flip which of two near-tied units is removed at the
budget's edge.  OpenBLAS is scipy's, which factors the repair's Gram matrices: left to choose,
it gives the repaired weights other last bits on an Intel CPU with AMX than on the machines
that made the goldens before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from polars.testing import assert_frame_equal

import tiny

GOLDEN = Path(__file__).parent / "golden"
# float32 evaluation: bfloat16 matrix products differ by CPU (AMX, AVX512-BF16 or emulated), and a
# golden must hold on every machine
SETTINGS = {
    # the published repair as 0.10.0-0.11.0 made it (aimed at the projections' outputs), so the
    # goldens keep guarding what came before; the stream aim is tested in test_repair_fit.py and
    # test_pipeline.py
    "small-run": {"dtype": "float32", "reconstruct_publish": "parent"},
    "small-run-paper": {"estimator": "paper-regression", "reconstruct": "none", "dtype": "float32"},
}


def tensors_digest(path: Path) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in name order: what the file holds,
    whatever header layout or metadata the safetensors writer gave it."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        for name in sorted(f.keys()):
            tensor = f.get_tensor(name).contiguous()
            digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def outputs(run: Path) -> dict[str, dict]:
    """Per artifact, named by stage, iteration and shard: its VERSION and output files."""
    found = {}
    for manifest_file in sorted(run.glob("*/*/manifest.json")):
        manifest = json.loads(manifest_file.read_text())
        config = manifest["config"]
        stage = manifest["stage"]
        if stage == "reconstruct" and config["iteration"] > 0 and len(manifest["inputs"]) == 3:
            stage = "reconstruct-publish"  # the published model's repair, made from the parent
        if stage == "calibration" and config["calib_pool"] > tiny.SMALL["calib_pool"]:
            stage = "calibration-publish"  # that repair's longer pool
        name = stage + "".join(
            f"-{k}{config[k]}" for k in ("iteration", "shard") if isinstance(config, dict) and k in config
        )
        files = {f: manifest_file.parent / f for f in manifest["files"]}
        found[name] = {"version": manifest["version"], "files": files}
    return found


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_stage_outputs_match_the_goldens(zoo, corpus, tmp_path, setting):
    arguments = f"{str(zoo['llama-gqa'])!r}, {str(corpus)!r}, {str(tmp_path / 'run')!r}, **{SETTINGS[setting]!r}"
    script = f"import tiny; tiny.prune({arguments})"
    child = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **tiny.KERNELS},
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    now = outputs(tmp_path / "run")
    golden = GOLDEN / setting
    if os.environ.get("BONSAI_UPDATE_GOLDEN"):
        shutil.rmtree(golden, ignore_errors=True)
        for name, artifact in now.items():
            for file, path in artifact["files"].items():
                target = golden / name / file
                target.parent.mkdir(parents=True, exist_ok=True)
                if path.suffix == ".parquet":
                    shutil.copy(path, target)
                elif path.suffix == ".safetensors":  # weights: a digest of their contents suffices
                    target.with_name(target.name + ".sha256").write_text(tensors_digest(path) + "\n")
            (golden / name / "VERSION").write_text(artifact["version"] + "\n")
    assert sorted(now) == sorted(p.name for p in golden.iterdir()), "the run's artifacts differ from the goldens'"
    for name, artifact in now.items():
        version = (golden / name / "VERSION").read_text().strip()
        assert artifact["version"] == version, f"{name}: VERSION {artifact['version']}, goldens {version}: update them"
        for file, path in artifact["files"].items():
            if path.suffix == ".parquet":
                expected = pl.read_parquet(golden / name / file)
                assert_frame_equal(pl.read_parquet(path), expected, check_exact=False, rel_tol=1e-5, abs_tol=1e-8)
            elif path.suffix == ".safetensors":
                digest = (golden / name / f"{file}.sha256").read_text().strip()
                assert tensors_digest(path) == digest, f"{name}/{file}: its tensors changed"
