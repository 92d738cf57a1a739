"""`bonsai demo` end to end, as a user runs it: trains the tiny parent (a few minutes), prunes
it through the Prefect flow, and prints the comparison."""

from __future__ import annotations

import re

import pytest

from tiny import bonsai


@pytest.mark.slow
def test_demo_prints_parent_and_pruned_model(prefect_api, tmp_path):
    # under 4 minutes on an idle 2-core machine; the limit leaves room for a busy one
    result = bonsai(["demo", "--out", str(tmp_path / "demo")], tmp_path, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    rows = {m.group(1): m for m in re.finditer(r"^\s*(parent|pruned)\s+([\d,]+)\s+([\d.]+)\s+([\d,]+)", out, re.M)}
    assert set(rows) == {"parent", "pruned"}, out
    params = {k: int(v.group(2).replace(",", "")) for k, v in rows.items()}
    assert params["pruned"] < 0.75 * params["parent"]
    assert "pruned to 5" in out and "Iterations:" in out
    assert "Do you wish to run the custom code" not in out + result.stderr
    assert (tmp_path / "demo" / "run" / "model" / "model.safetensors").is_file()
