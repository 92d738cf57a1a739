"""Golden outputs of the small tiny run: a stage whose output changes without a VERSION bump
fails here (a resumed run would otherwise mix old and new outputs under one key).

After a deliberate change (with its VERSION bumped), rewrite the goldens with
``BONSAI_UPDATE_GOLDEN=1 ./scripts/test.sh tests/test_golden.py`` and commit them.
Floats are compared to a relative 1e-5, so a different CPU's rounding does not fail the test.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from bonsai.artifacts import file_digest

import tiny

GOLDEN = Path(__file__).parent / "golden"
SETTINGS = {"small-run": {}, "small-run-paper": {"estimator": "paper-regression", "reconstruct": "none"}}


def outputs(run: Path) -> dict[str, dict]:
    """Per artifact, named by stage, iteration and shard: its VERSION and output files."""
    found = {}
    for manifest_file in sorted(run.glob("*/*/manifest.json")):
        manifest = json.loads(manifest_file.read_text())
        config = manifest["config"]
        name = manifest["stage"] + "".join(
            f"-{k}{config[k]}" for k in ("iteration", "shard") if isinstance(config, dict) and k in config
        )
        files = {f: manifest_file.parent / f for f in manifest["files"]}
        found[name] = {"version": manifest["version"], "files": files}
    return found


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_stage_outputs_match_the_goldens(zoo, corpus, tmp_path, setting):
    tiny.prune(zoo["llama-gqa"], corpus, tmp_path / "run", **SETTINGS[setting])
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
                elif path.suffix == ".safetensors":  # weights: the digest suffices (copies of the parent's)
                    target.with_name(target.name + ".sha256").write_text(file_digest(path) + "\n")
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
                assert file_digest(path) == digest, f"{name}/{file} changed"
