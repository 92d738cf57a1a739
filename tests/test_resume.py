"""Kill a real `bonsai prune` process with SIGKILL and resume it: the final model must be
byte-identical to an uninterrupted run, and finished work must never be redone."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bonsai.artifacts import file_digest
from bonsai.flows.prune import run_prune
from bonsai.stages.core.options import PruneOptions, build

from tiny import PRUNE_SMALL, bonsai, env, popen, prune_args


def as_config(flags: list[str]):
    pairs = dict(zip(flags[0::2], flags[1::2]))
    return build(PruneOptions, {k[2:].replace("-", "_"): v for k, v in pairs.items()})


def manifests(run) -> dict:
    return {p: p.stat().st_mtime_ns for p in run.glob("*/*/manifest.json")}


def reference_digest(zoo, corpus, tmp, flags) -> str:
    """The uninterrupted run, in process (the Prefect flow must reproduce its bytes)."""
    summary = run_prune(str(zoo["llama-gqa"]), str(corpus), str(tmp / "reference"), as_config(flags))
    return file_digest(f"{summary['model']}/model.safetensors")


def test_killed_at_every_stage_resumes_to_identical_bytes(prefect_api, zoo, corpus, tmp_path):
    args = prune_args(zoo["llama-gqa"], corpus, tmp_path / "run", *PRUNE_SMALL)
    expected = reference_digest(zoo, corpus, tmp_path, PRUNE_SMALL)
    run = tmp_path / "run"
    # each run resumes the one before and is killed further on (12 masks in 3 shards of
    # 2 batches: the 3rd batch is the middle of the 2nd shard)
    points = ["priors", "evaluate-batch#3", "importance", "reconstruct", "slice", "export", "commit"]
    for point in points:
        before = manifests(run)
        result = bonsai(args, tmp_path, BONSAI_KILL_AT=point)
        assert result.returncode == -signal.SIGKILL, f"{point}: {result.stderr[-2000:]}"
        after = manifests(run)
        assert all(after.get(p) == t for p, t in before.items()), f"{point}: finished work was redone"
        # every point lies inside a stage's build: its half-written output sits in .tmp,
        # where no lookup reads it, and the next run clears it
        assert list((run / ".tmp").iterdir()), f"{point}: expected a half-built artifact"
        if point == "evaluate-batch#3":
            shards = list(run.glob("evaluate/*/manifest.json"))
            assert len(shards) == 1  # shard 0 done, shard 1 lost mid-way: at most one shard lost
    final = bonsai(args, tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resuming" in final.stderr
    assert file_digest(run / "model" / "model.safetensors") == expected


def test_killed_from_outside_at_an_arbitrary_moment(prefect_api, zoo, corpus, tmp_path):
    flags = [*PRUNE_SMALL, "--masks-per-iter", "40"]  # 10 shards per iteration: time to hit one
    args = prune_args(zoo["llama-gqa"], corpus, tmp_path / "run", *flags)
    expected = reference_digest(zoo, corpus, tmp_path, flags)
    process = popen(args, tmp_path)
    deadline = time.time() + 300
    while len(list((tmp_path / "run").glob("evaluate/*/manifest.json"))) < 3:
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    done = manifests(tmp_path / "run")
    final = bonsai(args, tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    assert all(manifests(tmp_path / "run").get(p) == t for p, t in done.items())
    assert file_digest(tmp_path / "run" / "model" / "model.safetensors") == expected


def _state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of a process, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _children(pid: int) -> list[int]:
    return [
        int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and (_state(int(p.name)) or ("", 0))[1] == pid
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_run_takes_its_temporary_prefect_server_with_it(zoo, corpus, tmp_path):
    environment = env(tmp_path)
    environment.pop("PREFECT_API_URL", None)  # no server configured: the run starts its own
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bonsai.flows.cli",
            "prune",
            "--model",
            str(zoo["llama"]),
            "--data",
            str(corpus),
            "--out",
            str(tmp_path / "run"),
            *PRUNE_SMALL,
        ],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (servers := _children(process.pid)):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.time() + 30
    while any((_state(pid) or ("Z",))[0] != "Z" for pid in servers):
        assert time.time() < deadline, f"temporary Prefect server {servers} outlived its killed run"
        time.sleep(0.1)


def evaluations(run: Path) -> dict[str, tuple]:
    """Per evaluation artifact: what it evaluated (its config and its inputs' digests)."""
    import json

    found = {}
    for path in (run / "evaluate").glob("*/manifest.json"):
        manifest = json.loads(path.read_text())
        inputs = tuple(sorted((i["stage"], i["digest"]) for i in manifest["inputs"]))
        found[path.parent.name] = (json.dumps(manifest["config"], sort_keys=True), inputs)
    return found


def test_a_run_killed_by_0_2_0_resumes_redoing_nothing_it_finished(tmp_path):
    """tests/fixtures/run-0.2.0: a run 0.2.0 left inside its second iteration (see its README).
    Stages whose configs this version names differently make their artifacts again, so every
    evaluation 0.2.0 finished whose inputs come out the same bytes is found: none is computed
    twice, iteration 0's are all found, the two missing shards are made, and the model is the
    one this version's uninterrupted run makes.  In a child process with the kernels pinned, as
    the fixture was made.  Pinned kernels do not give every CPU the same bits: on the fixture's
    CPU the re-made repair of iteration 0 is 0.2.0's, byte for byte, so only the two missing
    shards are computed and the model is 0.2.0's; on a CPU whose least squares round otherwise
    (an AMD EPYC, Zen 4), iteration 1's first shard evaluates another repair and is computed too."""
    import json
    import os
    import shutil

    import tiny

    fixture = Path(__file__).parent / "fixtures" / "run-0.2.0"
    root = tmp_path / "fixture"
    shutil.copytree(fixture, root)
    expected = json.loads((root / "expected.json").read_text())
    before, finished = manifests(root / "run"), evaluations(root / "run")
    options = (
        f"build(PruneOptions, {expected['flags']!r}, "
        # --rival none, the estimator's own units and the last repair damped as the others, as
        # README says for a run begun before 0.6.0 (auto settles on flap under the chain), before
        # 0.7.0 and before 0.9.0, and the chain of repairs published, as before 0.10.0
        "{'rival': 'none', 'unit_order': 'estimator', 'reconstruct_final_damping': 0.1, "
        "'reconstruct_publish': 'chain'})"
    )
    script = (
        "import json; from bonsai.flows.prune import run_prune; "
        "from bonsai.stages.core.options import PruneOptions, build; "
        f"resumed = run_prune('model', 'train.txt', 'run', {options}); "
        f"afresh = run_prune('model', 'train.txt', 'afresh', {options}); "
        "print(json.dumps([resumed, afresh]))"
    )
    child = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, **tiny.KERNELS}, cwd=root, capture_output=True, text=True
    )
    assert child.returncode == 0, child.stderr[-3000:]
    resumed, afresh = json.loads(child.stdout.strip().splitlines()[-1])
    assert all(p.stat().st_mtime_ns == t for p, t in before.items()), "finished work was rewritten"
    computed = {k: v for k, v in evaluations(root / "run").items() if k not in finished}
    assert not set(computed.values()) & set(finished.values()), "a finished evaluation was computed again"
    made = sorted((json.loads(config)["iteration"], json.loads(config)["shard"]) for config, _ in computed.values())
    assert {(1, 1), (1, 2)} <= set(made) and all(iteration == 1 for iteration, _ in made), made
    model = file_digest(root / "run" / "model" / "model.safetensors")
    assert model == file_digest(root / "afresh" / "model" / "model.safetensors")
    assert resumed["iterations"][-1]["sparsity"] == pytest.approx(expected["sparsity"])
    if made == [(1, 1), (1, 2)]:  # this CPU re-made 0.2.0's repair of iteration 0 byte for byte
        assert model == expected["model_safetensors_sha256"]


def test_resuming_under_other_library_versions_says_so_once(zoo, corpus, tmp_path, caplog):
    """A run whose finished artifacts were made with another transformers: they are reused, one
    warning names the versions, and the end says what this resume computed."""
    import json
    import logging
    import shutil

    import tiny

    run = tmp_path / "run"
    first = tiny.prune(zoo["llama-gqa"], corpus, run)
    made = file_digest(Path(first["model"]) / "model.safetensors")
    for manifest in run.glob("*/*/manifest.json"):
        recorded = json.loads(manifest.read_text())
        recorded["libraries"]["transformers"] = "4.0.0"
        manifest.write_text(json.dumps(recorded))
    shutil.rmtree(run / "export")  # left to do: the export
    with caplog.at_level(logging.WARNING, logger="bonsai"):
        again = tiny.prune(zoo["llama-gqa"], corpus, run)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    mixed = [w for w in warnings if "other library versions" in w]
    assert len(mixed) == 1 and "transformers 4.0.0 there" in mixed[0], warnings
    assert any(w == "computed in this resume, with the versions here: export x1" for w in warnings), warnings
    assert file_digest(Path(again["model"]) / "model.safetensors") == made
    from bonsai.stages.reports.status import describe, run_status

    assert "transformers 4.0.0 + " in describe(run_status(str(run))) and "(mixed" in describe(run_status(str(run)))
