"""The artifact store: keys, atomic builds, corruption detection, run identity and lock."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from bonsai.artifacts import RunDir, RunLock, RunLocked, RunMismatch, Store, external_ref


def write(text: str):
    def build(out):
        (out / "a.txt").write_text(text)
        (out / "sub").mkdir()
        (out / "sub" / "b.txt").write_text(text * 2)
        return {"length": len(text)}

    return build


def test_builds_once_then_finds_it(tmp_path):
    store = Store(tmp_path)
    calls = []

    def build(out):
        calls.append(1)
        return write("x")(out)

    first = store.produce("s", "1", {"n": 1}, [], build)
    second = store.produce("s", "1", {"n": 1}, [], build)
    assert first == second and len(calls) == 1
    assert first.info() == {"length": 1}
    assert first.file("sub/b.txt").read_text() == "xx"


def test_key_depends_on_version_config_and_upstream_content(tmp_path):
    store = Store(tmp_path)
    up_a = external_ref("parent", tmp_path, "a" * 64)
    up_b = external_ref("parent", tmp_path, "b" * 64)
    keys = {
        store.key("s", "1", {"n": 1}, [up_a]),
        store.key("s", "2", {"n": 1}, [up_a]),
        store.key("s", "1", {"n": 2}, [up_a]),
        store.key("s", "1", {"n": 1}, [up_b]),
    }
    assert len(keys) == 4
    # same content, different location: same key (digests, not paths, identify inputs)
    assert store.key("s", "1", {"n": 1}, [up_a]) == store.key(
        "s", "1", {"n": 1}, [external_ref("parent", "/x", "a" * 64)]
    )


def test_identical_rebuild_keeps_the_digest(tmp_path):
    one = Store(tmp_path / "one").produce("s", "1", {}, [], write("same"))
    two = Store(tmp_path / "two").produce("s", "1", {}, [], write("same"))
    assert one.digest == two.digest


def test_corrupted_artifact_is_recomputed_with_a_warning(tmp_path, caplog):
    store = Store(tmp_path)
    ref = store.produce("s", "1", {}, [], write("good"))
    ref.file("sub/b.txt").write_text("bad!bad!")
    calls = []

    def build(out):
        calls.append(1)
        return write("good")(out)

    with caplog.at_level(logging.WARNING, logger="bonsai.store"):
        again = store.produce("s", "1", {}, [], build)
    assert calls == [1]
    assert again.digest == ref.digest and again.file("sub/b.txt").read_text() == "goodgood"
    assert "corrupted" in caplog.text and "sub/b.txt" in caplog.text


def test_unreadable_manifest_counts_as_corrupted(tmp_path):
    store = Store(tmp_path)
    ref = store.produce("s", "1", {}, [], write("v"))
    ref.file("manifest.json").write_text("{not json")
    assert store.lookup("s", ref.key) is None


def test_failed_build_leaves_nothing_behind(tmp_path):
    store = Store(tmp_path)

    def build(out):
        (out / "half.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        store.produce("s", "1", {}, [], build)
    assert not (tmp_path / "s").exists()
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_partial_directories_are_cleared(tmp_path):
    store = Store(tmp_path)
    (tmp_path / ".tmp" / "s-key-1234").mkdir(parents=True)
    assert store.clear_partial() == 1


def test_run_identity_refuses_a_different_run(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.open({"model": "m", "config": {"sparsity": 0.5}}, {}) is False
    run.close()
    assert run.open({"model": "m", "config": {"sparsity": 0.5}}, {}) is True
    run.close()
    with pytest.raises(RunMismatch) as err:
        run.probe({"model": "m", "config": {"sparsity": 0.3}})
    assert "config.sparsity: 0.5 there, 0.3 now" in str(err.value)


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunMismatch):
        RunDir(tmp_path).probe({"model": "m"})


def test_empty_new_run_is_discarded(tmp_path):
    run = RunDir(tmp_path / "run")
    run.open({"model": "m"}, {})
    assert run.discard_if_empty()
    assert not (tmp_path / "run").exists()


def test_lock_is_exclusive_across_processes_and_names_the_holder(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path[:0] = sys.argv[2:];"
            "from bonsai.artifacts import RunLock; RunLock(sys.argv[1]).acquire();"
            "print('held', flush=True); time.sleep(60)",
            str(tmp_path),
            *sys.path,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked) as err:
            RunLock(tmp_path).acquire()
        assert str(holder.pid) in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    # the kernel releases a killed holder's lock: no stale lock blocks the resume
    deadline = time.time() + 5
    while True:
        try:
            RunLock(tmp_path).acquire().release()
            break
        except RunLocked:
            assert time.time() < deadline
            time.sleep(0.05)


def test_manifest_records_config_inputs_and_wall_time(tmp_path):
    store = Store(tmp_path)
    up = external_ref("parent", tmp_path, "c" * 64)
    ref = store.produce("s", "7", {"n": 3}, [up], write("m"))
    manifest = json.loads(ref.file("manifest.json").read_text())
    assert manifest["version"] == "7" and manifest["config"] == {"n": 3}
    assert manifest["inputs"][0]["digest"] == "c" * 64
    assert set(manifest["files"]) == {"a.txt", "sub/b.txt"} and manifest["wall_s"] >= 0


def test_lookups_trust_unchanged_files_and_verify_rereads_everything(tmp_path, monkeypatch):
    import os

    import bonsai.artifacts.digest as digest

    store = Store(tmp_path)
    ref = store.produce("s", "1", {}, [], write("good"))
    for f in ref.file("sub").parent.rglob("*.txt"):  # as if written an hour ago
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns - 3600 * 10**9))
    assert store.lookup("s", ref.key) is not None  # hashed once, remembered
    reads = []
    original = digest.file_digest
    monkeypatch.setattr(digest, "file_digest", lambda p: reads.append(p) or original(p))
    assert Store(tmp_path).lookup("s", ref.key) is not None and reads == []
    # a change that keeps size and modification time is invisible to lookups...
    target = ref.file("sub/b.txt")
    stat = target.stat()
    target.write_text("bad!bad!")
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert Store(tmp_path).lookup("s", ref.key) is not None
    # ...but not to verify, after which the next lookup rebuilds the artifact
    checked, problems = Store(tmp_path).verify()
    assert checked == 1 and problems == [(f"s/{ref.key}", "sub/b.txt: digest mismatch")]
    assert Store(tmp_path).lookup("s", ref.key) is None


def test_a_kill_between_manifest_and_rename_leaves_nothing_readable(tmp_path):
    code = (
        "import sys; from bonsai.artifacts import Store; "
        "Store(sys.argv[1]).produce('s', '1', {}, [], lambda out: (out / 'a.txt').write_text('x') and None)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env={**os.environ, "BONSAI_KILL_AT": "commit"})
    assert result.returncode == -signal.SIGKILL
    half = list((tmp_path / ".tmp").iterdir())
    assert len(half) == 1 and (half[0] / "manifest.json").is_file()  # complete, but never renamed
    assert not (tmp_path / "s").exists()
    ref = Store(tmp_path).produce("s", "1", {}, [], lambda out: (out / "a.txt").write_text("x") and None)
    assert ref.file("a.txt").read_text() == "x"


def test_lineage_is_what_a_result_rests_on_not_what_the_directory_holds(tmp_path):
    """A run resumed after a stage's version changed keeps the earlier version's work beside
    the new one; the result's lineage (and so `bonsai audit`) names only what it was built from."""
    store = Store(tmp_path)
    parent = external_ref("parent", tmp_path, "p" * 64)
    old = store.produce("priors", "1", {"iteration": 0}, [parent], write("old"))
    new = store.produce("priors", "2", {"iteration": 0}, [parent], write("new"))
    chosen = store.produce("select", "1", {"iteration": 0}, [new], write("s"))
    result = store.produce("export", "1", {}, [parent, chosen], write("e"))
    assert store.lineage(result.stage, result.key) == {
        ("export", result.key),
        ("select", chosen.key),
        ("priors", new.key),
    }
    assert ("priors", old.key) not in store.lineage(result.stage, result.key)
    run = RunDir(tmp_path)
    assert run.lineage() is None  # not finished: no summary yet
    (tmp_path / "summary.json").write_text(json.dumps({"result": {"stage": "export", "key": result.key}}))
    assert run.lineage() == store.lineage("export", result.key)
