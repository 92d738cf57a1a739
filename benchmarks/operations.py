"""Scale-out and recovery of `bonsai prune` on this machine, through the real command line.

    python benchmarks/operations.py dask     # evaluation throughput: sequential, 1 and 2 Dask workers
    python benchmarks/operations.py resume   # SIGKILL mid-evaluation -> resumed run doing new work

dask: one iteration (10% sparsity) of the trained tiny parent with 200 sub-models in 10
shards.  The evaluation phase runs from the first shard's start (its manifest's time minus
its build time) to the last shard's end; throughput is the tokens it scored divided by that.
Per-shard overhead = (1-worker phase - sequential phase) / shards: scheduling, pickling of
arguments, the worker's model load amortised, and Prefect's task-run bookkeeping.
resume: the same run killed after its 3rd shard; then the time from starting the same
command again to the next shard's manifest, with a temporary Prefect server and with a
persistent one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import common

OUT = common.RESULTS / "operations"
FLAGS = [
    "--sparsity",
    "0.1",
    "--prune-frac",
    "0.1",
    "--masks-per-iter",
    "200",
    "--calib-samples",
    "8",
    "--seq-len",
    "128",
    "--batch-size",
    "16",
    "--shard-size",
    "20",
    "--calib-pool",
    "256",
    "--device",
    "cpu",
]


def prune(run: Path, *extra: str, env: dict | None = None, kill_at: str | None = None) -> float:
    model, train, _ = common.parent()
    environment = {**os.environ, **(env or {})}
    if kill_at:
        environment["BONSAI_KILL_AT"] = kill_at
    start = time.perf_counter()
    with open(run.parent / f"{run.name}.log", "a") as log:  # a file, not a pipe: nothing can hold it open
        subprocess.run(
            common.prune_command(model, train, run, *FLAGS, *extra),
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=not kill_at,
        )
    return time.perf_counter() - start


def evaluation_phase(run: Path) -> tuple[float, int, int]:
    """(seconds from the first shard's start to the last shard's end, shards, tokens scored)."""
    shards = [json.loads(p.read_text()) | {"mtime": p.stat().st_mtime} for p in run.glob("evaluate/*/manifest.json")]
    start = min(s["mtime"] - s["wall_s"] for s in shards)
    end = max(s["mtime"] for s in shards)
    tokens = sum(int(s["info"]["masks"]) for s in shards) * 8 * 127
    return end - start, len(shards), tokens


def dask() -> None:
    rows, phases = [], {}
    for label, extra in (
        ("sequential", ()),
        ("Dask, 1 worker", ("--runner", "dask", "--dask-address", "local:1")),
        ("Dask, 2 workers", ("--runner", "dask", "--dask-address", "local:2")),
    ):
        run = OUT / label.replace(" ", "-").replace(",", "")
        shutil.rmtree(run, ignore_errors=True)
        total = prune(run, *extra)
        phase, shards, tokens = evaluation_phase(run)
        phases[label] = (phase, shards)
        rows.append([label, total, phase, tokens / phase])
    overhead = (phases["Dask, 1 worker"][0] - phases["sequential"][0]) / phases["sequential"][1]
    print(common.markdown(["evaluation runs on", "whole command (s)", "evaluation phase (s)", "tokens/s"], rows))
    print(f"\nper-shard overhead of the Dask task runner: {overhead:.2f} s")


def _wait_for_new_shard(run: Path, before: int, process: subprocess.Popen, start: float) -> float:
    while len(list(run.glob("evaluate/*/manifest.json"))) <= before:
        if process.poll() is not None:
            raise SystemExit("the resumed run ended before doing new work")
        time.sleep(0.05)
    return time.perf_counter() - start


def resume() -> None:
    model, train, _ = common.parent()
    rows = []
    server = None
    try:
        for label in ("temporary Prefect server", "persistent Prefect server"):
            env = {}
            if label.startswith("persistent"):
                port = 4321
                env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
                server = subprocess.Popen(
                    [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
                time.sleep(30)
            run = OUT / "resume"
            shutil.rmtree(run, ignore_errors=True)
            prune(run, env=env, kill_at="evaluate-batch#31")  # 10 batches a shard: killed inside shard 3
            before = len(list(run.glob("evaluate/*/manifest.json")))
            start = time.perf_counter()
            process = subprocess.Popen(
                common.prune_command(model, train, run, *FLAGS),
                env={**os.environ, **env},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            seconds = _wait_for_new_shard(run, before, process, start)
            process.wait()
            shard = json.loads(
                sorted(run.glob("evaluate/*/manifest.json"), key=lambda p: p.stat().st_mtime)[-1].read_text()
            )["wall_s"]
            rows.append([label, before, seconds, shard, seconds - shard])
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
    print(
        common.markdown(
            [
                "with",
                "shards done before the kill",
                "restart to next shard done (s)",
                "of which the shard itself (s)",
                "time to useful work (s)",
            ],
            rows,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=["dask", "resume"])
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    dask() if args.which == "dask" else resume()


if __name__ == "__main__":
    main()
