"""`bonsai adapt`: teacher cache, the distillation objective, LoRA on pruned shapes, resume."""

from __future__ import annotations

import json
import shutil
import signal

import polars as pl
import pytest
import torch

from bonsai.artifacts import Store, external_ref, file_digest
from bonsai.flows.adapt import run_adapt
from bonsai.stages import adapt, calibration
from bonsai.stages.core.distill import distill_kl
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.families import family_for_model_type
from bonsai.stages.core.model_io import load_model
from bonsai.stages.core.options import AdaptOptions
from bonsai.stages.core.units import layer_shapes
from bonsai.stages.logits import top_k_logprobs

import tiny
from tiny import assert_one_line_error, awkward_state, bonsai, export_state, reload_elsewhere

QUICK = dict(
    steps=6,
    lora_rank=4,
    lora_alpha=16,
    sequences=16,
    batch_size=4,
    checkpoint_every=2,
    logits_shard_size=8,
    top_k=8,
    lr=1e-3,
)


def test_top_k_cache_keeps_the_tail_mass():
    logits = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(0))
    top, ids, tail = top_k_logprobs(logits, 6)
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(top.exp(), probs.gather(-1, ids))
    torch.testing.assert_close(tail.exp(), 1 - probs.gather(-1, ids).sum(-1))


def test_distillation_is_the_kl_of_the_coarsened_distributions():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 4, 30, generator=g), torch.randn(2, 4, 30, generator=g)
    top, ids, tail = top_k_logprobs(teacher, 5)
    got = distill_kl(student, top, ids, tail)
    p = torch.softmax(student, -1)
    q = torch.softmax(teacher, -1)
    p_buckets = torch.cat([p.gather(-1, ids), 1 - p.gather(-1, ids).sum(-1, keepdim=True)], -1)
    q_buckets = torch.cat([q.gather(-1, ids), 1 - q.gather(-1, ids).sum(-1, keepdim=True)], -1)
    expected = (p_buckets * (p_buckets.log() - q_buckets.log())).sum(-1).mean()
    torch.testing.assert_close(got, expected)
    assert distill_kl(teacher, top, ids, tail).abs() < 1e-5  # a student equal to its teacher


@pytest.fixture(scope="module")
def pruned(zoo, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapt") / "run"
    tiny.prune(zoo["llama-gqa"], corpus, out)
    return out


@pytest.fixture(scope="module")
def adapted(pruned):
    return run_adapt(str(pruned), AdaptOptions(**QUICK))


def test_adapted_model_loads_without_bonsai_and_equals_the_adapter(pruned, adapted, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    reload_elsewhere(tmp_path, [(pruned / "adapted", tmp_path / "ids.pt", tmp_path / "out.pt")])
    merged = torch.load(tmp_path / "out.pt")["logits"]
    base = AutoModelForCausalLM.from_pretrained(pruned / "model", trust_remote_code=True)
    with torch.no_grad():
        unmerged = PeftModel.from_pretrained(base, pruned / "adapter")(input_ids=ids).logits
    assert (merged - unmerged).abs().max() < 1e-4
    pruned_only = AutoModelForCausalLM.from_pretrained(pruned / "model", trust_remote_code=True)
    with torch.no_grad():
        assert (pruned_only(input_ids=ids).logits - merged).abs().max() > 1e-4  # training changed it


def test_teacher_cache_index_covers_every_sequence(pruned, adapted):
    index = pl.read_parquet(str(pruned / "logits/*/index.parquet"))
    assert sorted(index["window"].to_list()) == list(range(QUICK["sequences"]))
    assert adapted["teacher_cache_bytes_per_1000_sequences"] > 0
    history = pl.read_parquet(str(pruned / "adapt/*/training.parquet"))
    assert history.height == QUICK["steps"] and (history["distill"] > 0).all()


@pytest.mark.parametrize("spec", list(tiny.SPECS))
def test_lora_trains_through_layers_with_no_heads_or_channels(zoo, corpus, tmp_path, spec):
    model = load_model(zoo[spec], torch.float32, torch.device("cpu"))
    family = family_for_model_type(model.config.model_type)
    student_dir = export_state(tmp_path, zoo[spec], awkward_state(layer_shapes(model, family)), family, model)
    store = Store(tmp_path / "adapt")
    parent = external_ref("parent", zoo[spec], "p" * 64)
    windows = calibration.run(
        parent,
        external_ref("data", corpus, "d" * 64),
        calibration.CalibrationConfig(seq_len=32, calib_pool=8, calib_samples=4),
        store,
    )
    cfg = adapt.AdaptConfig(
        steps=3,
        batch_size=4,
        lr=1e-3,
        lora_rank=4,
        lora_alpha=8,
        distill_weight=0.0,
        top_k=4,
        full_finetune=False,
        seed=0,
        checkpoint_every=2,
        warmup_steps=1,
    )
    ref = adapt.run(external_ref("student", student_dir, "s" * 64), windows, [], cfg, store, "cpu")
    merged = load_model(ref.file(adapt.MODEL), torch.float32, torch.device("cpu"))
    shapes = layer_shapes(merged, family)
    assert shapes[0].groups == 0 and shapes[1].channels == 0


def test_full_finetune_writes_no_adapter_and_drops_a_stale_one(pruned, adapted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pruned, run)  # the shared run stays as the LoRA adaptation left it
    assert (run / "adapter").is_dir()
    summary = run_adapt(str(run), AdaptOptions(**{**QUICK, "full_finetune": True, "distill_weight": 0.0}))
    assert summary["adapter"] is None and summary["teacher_cache_bytes"] == 0
    assert not (run / "adapter").exists()  # it belonged to the LoRA model RUN/adapted no longer is


def test_train_resumes_from_a_checkpoint_to_the_same_weights(zoo, tmp_path, monkeypatch):
    cfg = adapt.AdaptConfig(
        steps=6,
        batch_size=2,
        lr=1e-2,
        lora_rank=4,
        lora_alpha=8,
        distill_weight=0.0,
        top_k=4,
        full_finetune=True,
        seed=0,
        checkpoint_every=2,
        warmup_steps=1,
    )
    data = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    device = torch.device("cpu")

    def fresh():
        model = load_model(zoo["llama"], torch.float32, device)
        model.requires_grad_(True)
        return model

    straight = fresh()
    history = adapt.train(straight, data, cfg, device, checkpoints=tmp_path / "a")
    assert [h["step"] for h in history] == list(range(6))
    assert history[-1]["task"] < history[0]["task"]  # four windows, six steps: it learns them

    real = adapt.save_checkpoint

    def save_then_die(work, step, *args):
        real(work, step, *args)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(adapt, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        adapt.train(fresh(), data, cfg, device, checkpoints=tmp_path / "b")
    monkeypatch.setattr(adapt, "save_checkpoint", real)
    resumed = fresh()
    again = adapt.train(resumed, data, cfg, device, checkpoints=tmp_path / "b")
    assert again == history
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(pruned, monkeypatch):
    real = adapt.task_loss
    calls = []

    def failing(logits, ids):
        calls.append(1)
        value = real(logits, ids)
        return value * float("nan") if len(calls) == 5 else value

    monkeypatch.setattr(adapt, "task_loss", failing)
    with pytest.raises(UserError, match=r"became nan at step 4; the last good checkpoint \(step 4\)"):
        run_adapt(str(pruned), AdaptOptions(**{**QUICK, "seed": 7}))
    assert list((pruned / ".work").glob("adapt-*/checkpoint-00000004"))


def test_bad_adaptation_requests_are_one_clear_line(pruned, zoo, corpus, tmp_path):
    with pytest.raises(UserError, match="exceeds the vocabulary"):
        run_adapt(str(pruned), AdaptOptions(**{**QUICK, "top_k": 10**6}))
    with pytest.raises(UserError, match="not a bonsai run directory"):
        run_adapt(str(tmp_path), AdaptOptions(**QUICK))
    half = tmp_path / "half"
    half.mkdir()
    (half / "run.json").write_text(json.dumps({"identity": {}, "described": {}}))
    with pytest.raises(UserError, match="has no pruned model yet"):
        run_adapt(str(half), AdaptOptions(**QUICK))
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(UserError, match="at least 4 windows"):
        run_adapt(str(pruned), AdaptOptions(**{**QUICK, "data": str(short)}))


def test_a_teacher_of_another_vocabulary_is_refused(zoo, corpus, tmp_path):
    from bonsai.stages import logits

    import tiny

    other = tiny.model_dir(tmp_path / "other", "llama", vocab=300)
    store = Store(tmp_path / "s")
    teacher_ref = external_ref("parent", other, "t" * 64)
    windows = calibration.run(
        teacher_ref,
        external_ref("data", corpus, "d" * 64),
        calibration.CalibrationConfig(seq_len=16, calib_pool=8, calib_samples=4),
        store,
    )
    cache = [
        logits.run(
            teacher_ref,
            windows,
            logits.LogitsConfig(shard=0, shard_size=8, top_k=4, batch_size=4, dtype="float32"),
            store,
            "cpu",
        )
    ]
    cfg = adapt.AdaptConfig(
        steps=2,
        batch_size=4,
        lr=1e-3,
        lora_rank=4,
        lora_alpha=8,
        distill_weight=0.01,
        top_k=4,
        full_finetune=False,
        seed=0,
        checkpoint_every=2,
        warmup_steps=1,
    )
    with pytest.raises(UserError, match="vocabulary of 300 tokens and the student 320"):
        adapt.run(external_ref("student", zoo["llama"], "s" * 64), windows, cache, cfg, store, "cpu")


@pytest.mark.slow  # three CLI runs and two prunes (about 2 minutes here)
def test_killed_adaptation_resumes_to_identical_bytes(prefect_api, zoo, corpus, tmp_path):
    run_dir = tmp_path / "run"
    tiny.prune(zoo["llama-gqa"], corpus, run_dir)
    reference_dir = tmp_path / "reference"
    tiny.prune(zoo["llama-gqa"], corpus, reference_dir)
    run_adapt(str(reference_dir), AdaptOptions(**QUICK))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in QUICK.items()]
    for point in ("logits#2", "adapt-checkpoint#2"):
        killed = bonsai(["adapt", str(run_dir), *flags], tmp_path, BONSAI_KILL_AT=point)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert list((run_dir / ".work").glob("adapt-*/checkpoint-00000004"))
    done = bonsai(["adapt", str(run_dir), *flags], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "teacher cache:" in done.stdout
    assert file_digest(run_dir / "adapted" / "model.safetensors") == file_digest(
        reference_dir / "adapted" / "model.safetensors"
    )
    assert not list((run_dir / ".work").glob("adapt-*"))  # checkpoints go once the artifact is complete


def test_cli_refuses_a_run_without_a_model(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"identity": {}, "described": {}}))
    assert_one_line_error(bonsai(["adapt", str(tmp_path)], tmp_path), "has no pruned model yet")


def test_audit_plots_the_adaptation_losses(pruned, adapted):
    from bonsai.stages.reports.audit import ADAPTATION_PLOT, audit

    plots = audit(str(pruned))["plots"]
    assert any(p.endswith(ADAPTATION_PLOT) for p in plots)
    assert (pruned / "audit" / ADAPTATION_PLOT).stat().st_size > 0
