"""The Prefect flow against a real (temporary) Prefect server."""

from __future__ import annotations

import dataclasses
import time

import pytest

import tiny


def task_runs(flow_run_id, expected_names: set[str], wait_s: float = 30.0) -> list:
    """The flow run's task runs as the server records them.

    Prefect 3 records a task run from the events its engine sends, asynchronously: a task run
    is created under a default name ("publish-89d") and renamed in a later event, so a read
    right after the flow returns can see the last task half-recorded.  Read again until the
    record has every expected name and every run finished, or ``wait_s`` has passed.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC,
                limit=200,
            )
            settled = {r.name for r in runs} == expected_names and all(
                r.state is not None and r.state.is_final() for r in runs
            )
            if settled or time.monotonic() > deadline:
                return runs
            time.sleep(0.5)


def test_prune_flow_runs_each_stage_as_a_named_task(prefect_api, zoo, corpus, tmp_path):
    from bonsai.flows.pipelines import prune_flow

    config = dataclasses.asdict(tiny.options())
    state = prune_flow(str(zoo["qwen2"]), str(corpus), str(tmp_path / "run"), config, return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert summary["iterations"][-1]["sparsity"] >= 0.5
    # the last iteration's own repair is not made: the published one, from the parent, replaces it
    expected = {"calibration", "calibration-publish", "reconstruct-it00", "reconstruct-publish", "export", "publish"}
    for it in ("it00", "it01"):
        expected |= {f"priors-{it}", f"masks-{it}", f"importance-{it}", f"select-{it}"}
        expected |= {f"evaluate-{it}-shard{s:03d}" for s in range(3)}
    runs = task_runs(state.state_details.flow_run_id, expected)
    assert {r.name for r in runs} == expected
    assert all(r.state.is_completed() for r in runs)
    # resuming is the store's job: a second flow run finds every artifact and returns the same
    again = prune_flow(str(zoo["qwen2"]), str(corpus), str(tmp_path / "run"), config)
    assert again == summary


def test_a_run_on_its_own_temporary_server_finishes(zoo, corpus, tmp_path):
    """No server configured: the command starts one in a background thread while it loads the
    model.  The server must outlive that thread (its parent-death signal follows the thread
    that started it) and serve the whole flow.  Run again, the command finds every artifact and
    ends within seconds of its flow's start, while the server still records that flow's events:
    what the server prints as it is stopped must not follow the command's result."""
    out = tmp_path / "run"
    args = tiny.prune_args(zoo["llama"], corpus, out, *tiny.PRUNE_SMALL)
    result = tiny.bonsai(args, tmp_path, PREFECT_API_URL="")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model" / "config.json").is_file()
    again = tiny.bonsai(args, tmp_path, PREFECT_API_URL="")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr and "Error" not in again.stderr, again.stderr[-3000:]
    assert again.stdout.strip().splitlines()[-1].startswith("pruned model:"), again.stdout[-3000:]


def test_a_temporary_server_that_cannot_start_says_why(monkeypatch, capfd):
    """A server that fails at start-up (here: a database it cannot open) is reported at once,
    with its own last lines, not waited on until the start-up timeout.  Its output goes to its
    log, never to the command's console."""
    from bonsai.flows.prefect_server import QUIET_SERVICES, TemporaryServer

    for service in QUIET_SERVICES:  # what the server sets for itself, undone after the test
        monkeypatch.setenv(f"PREFECT_SERVER_SERVICES_{service}_ENABLED", "false")
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", "sqlite+aiosqlite:////nonexistent/dir/prefect.db")
    server = TemporaryServer()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with status") as error:
        server.wait_until_ready(timeout=120)
    assert time.monotonic() - started < 60
    assert "nonexistent" in str(error.value) or "unable to open" in str(error.value).lower(), str(error.value)
    assert server.process is None
    assert "unable to open" not in capfd.readouterr().err


def test_the_command_prepares_its_inputs_once(prefect_api, zoo, corpus, tmp_path, monkeypatch):
    """`bonsai prune` checks, resolves and fingerprints its inputs before Prefect starts (so a
    wrong one is refused at once) and hands them to the flow, which must not prepare them again."""
    from bonsai.flows import cli, preflight, prune

    calls, real = [], preflight.prepare

    def counting(*args, **kwargs):
        calls.append(args[:3])
        return real(*args, **kwargs)

    monkeypatch.setattr(preflight, "prepare", counting)
    monkeypatch.setattr(prune, "prepare", counting)
    out = tmp_path / "run"
    assert cli.main(tiny.prune_args(zoo["llama"], corpus, out, *tiny.PRUNE_SMALL)) == 0
    assert (out / "model" / "config.json").is_file()
    assert calls == [(str(zoo["llama"]), str(corpus), str(out))]
