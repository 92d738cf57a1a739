"""Operations: status, audit, Dask scale-out, schedules on a real Prefect server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from bonsai.artifacts import RunLock, file_digest

import tiny
from tiny import PRUNE_SMALL, SMALL, assert_one_line_error, bonsai, env, popen


def snapshot(run) -> dict:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run.rglob("*") if p.is_file()}


def test_status_says_where_a_stopped_run_resumes_and_changes_nothing(prefect_api, zoo, corpus, tmp_path):
    run = tmp_path / "run"
    args = tiny.prune_args(zoo["llama-gqa"], corpus, run, *PRUNE_SMALL)
    assert bonsai(args, tmp_path, BONSAI_KILL_AT="evaluate-batch#3").returncode == -signal.SIGKILL
    before = snapshot(run)
    shown = bonsai(["status", str(run)], tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "next:       evaluate shard 1 of iteration 0 (1/3 shards done)" in shown.stdout
    assert "not running" in shown.stdout and "half-built: 1" in shown.stdout
    data = json.loads(bonsai(["status", str(run), "--format", "json"], tmp_path).stdout)
    assert data["sub_models_left"] == 2 * 4 + 12 and data["iterations_done"] == 0
    assert snapshot(run) == before  # read-only
    with RunLock(run):
        assert f"running (pid {os.getpid()})" in bonsai(["status", str(run)], tmp_path).stdout
    assert bonsai(args, tmp_path).returncode == 0
    assert "next:       nothing: pruned" in bonsai(["status", str(run)], tmp_path).stdout


def test_audit_prints_tables_draws_plots_and_publishes(prefect_api, zoo, corpus, tmp_path):
    run = tmp_path / "run"
    tiny.prune(zoo["llama"], corpus, run)
    shown = bonsai(["audit", str(run)], tmp_path)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "## Iterations" in shown.stdout and "cv_kendall_tau" in shown.stdout
    assert (run / "audit" / "layers.png").stat().st_size > 0 and (run / "audit" / "progress.png").stat().st_size > 0
    data = json.loads(bonsai(["audit", str(run), "--format", "json"], tmp_path).stdout)
    assert [r["iteration"] for r in data["iterations"]] == [0, 1]
    layers = {(r["iteration"], r["layer"]): r for r in data["layers"]}
    assert layers[(-1, 0)]["heads"] == 4 and layers[(-1, 0)]["channels"] == 96
    # work an earlier version of a stage left beside this version's (a run resumed after an
    # upgrade) is not this run's: the audit reads the result's lineage only
    for stage in ("select", "importance", "priors"):
        finished = sorted((run / stage).iterdir())[0]
        shutil.copytree(finished, run / stage / ("0" * 20))
    again = json.loads(bonsai(["audit", str(run), "--format", "json"], tmp_path).stdout)
    assert again["iterations"] == data["iterations"] and again["layers"] == data["layers"]
    found = httpx.post(
        f"{prefect_api}/artifacts/filter",
        json={"artifacts": {"key": {"any_": ["bonsai-audit", "bonsai-audit-iterations"]}}},
    ).json()
    assert {a["key"] for a in found} == {"bonsai-audit", "bonsai-audit-iterations"}


def test_unreachable_servers_and_bad_schedules_are_one_line(zoo, corpus, tmp_path):
    out = tmp_path / "run"
    args = tiny.prune_args(zoo["llama"], corpus, out, *PRUNE_SMALL)
    result = bonsai(args, tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api")
    assert_one_line_error(result, "cannot reach the Prefect server at http://127.0.0.1:9/api")
    assert "the run directory is untouched" in result.stderr and not out.exists()
    result = bonsai([*args, "--runner", "dask", "--dask-address", "tcp://127.0.0.1:9"], tmp_path)
    assert_one_line_error(result, "cannot reach the Dask scheduler at tcp://127.0.0.1:9")
    assert not out.exists()
    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"prune: {{model: {zoo['llama']}, data: {corpus}, out: {out}}}\n")
    assert_one_line_error(
        bonsai(["schedule", "--config", str(run_file), "--cron", "0 25 * * *"], tmp_path), "--cron '0 25 * * *'"
    )
    no_server = {**env(tmp_path), "PREFECT_API_URL": ""}
    result = subprocess.run(
        [sys.executable, "-m", "bonsai.flows.cli", "schedule", "--config", str(run_file), "--cron", "0 2 * * *"],
        env=no_server,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(result, "schedules need a running Prefect server")


@pytest.mark.slow
def test_dask_workers_give_the_sequential_bytes(prefect_api, zoo, corpus, tmp_path):
    reference = tiny.prune(zoo["llama-gqa"], corpus, tmp_path / "reference")
    run = tmp_path / "run"
    result = bonsai(
        [
            "prune",
            "--model",
            str(zoo["llama-gqa"]),
            "--data",
            str(corpus),
            "--out",
            str(run),
            *PRUNE_SMALL,
            "--runner",
            "dask",
            "--dask-address",
            "local:2",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert file_digest(run / "model" / "model.safetensors") == file_digest(f"{reference['model']}/model.safetensors")
    assert "Starting temporary server" not in result.stderr  # the workers report to the session's server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, seconds: float, what: str):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_schedule_on_a_real_server_runs_and_resumes_a_half_finished_run(zoo, corpus, tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    server_env = {**env(tmp_path), "PREFECT_API_URL": api, "PREFECT_UI_ENABLED": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=server_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    serving = None
    try:
        _wait(lambda: _healthy(api), 180, "the Prefect server")
        run = tmp_path / "run"
        run_file = tmp_path / "run.yaml"
        run_file.write_text(
            json.dumps({"prune": {"model": str(zoo["llama"]), "data": str(corpus), "out": str(run), **SMALL}})
        )
        killed = bonsai(
            tiny.prune_args(zoo["llama"], corpus, run, *PRUNE_SMALL),
            tmp_path,
            PREFECT_API_URL=api,
            BONSAI_KILL_AT="importance#2",
        )
        assert killed.returncode == -signal.SIGKILL
        done_before = {p: p.stat().st_mtime_ns for p in run.glob("*/*/manifest.json")}
        serving = popen(
            ["schedule", "--config", str(run_file), "--cron", "0 2 * * *", "--name", "nightly"],
            tmp_path,
            PREFECT_API_URL=api,
        )
        deployment = _wait(lambda: _deployment(api, "nightly"), 180, "the deployment")
        assert deployment["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
        subprocess.run(
            [sys.executable, "-m", "prefect", "deployment", "run", "bonsai-run/nightly"],
            env=server_env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        state = _wait(lambda: _final_state(api, deployment["id"]), 300, "the triggered flow run")
        assert state == "COMPLETED"
        assert (run / "model" / "model.safetensors").is_file()
        assert all(p.stat().st_mtime_ns == t for p, t in done_before.items())  # resumed, not redone
    finally:
        for process in (serving, server):
            if process is not None:
                os.killpg(process.pid, signal.SIGTERM) if process is server else process.terminate()
                process.wait(timeout=60)


def _healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _deployment(api: str, name: str) -> dict | None:
    found = httpx.post(f"{api}/deployments/filter", json={"deployments": {"name": {"any_": [name]}}}).json()
    return found[0] if found else None


def _final_state(api: str, deployment_id: str) -> str | None:
    runs = httpx.post(f"{api}/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment_id]}}}).json()
    final = [r["state"]["type"] for r in runs if r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED")]
    return final[0] if final else None
