"""The config schema: validation, presets, and the CLI flags derived from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bonsai.flows.cli import build_parser, options_from
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.options import PruneOptions, build, fields_of, load_preset
from bonsai.stages.core.plan import PrunePlan

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_preset_is_valid(preset):
    values = load_preset(preset)
    config = build(PruneOptions, values)
    assert values and all(getattr(config, key) == value for key, value in values.items())
    for device in ("cpu", "cuda"):
        assert PrunePlan.of(config.for_device(device)).iterations >= 1


def test_there_are_presets():
    assert {p.stem for p in CONFIGS} >= {"paper-llama2-7b", "tiny-cpu"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sparsity": 1.5}, "--sparsity must be in (0, 1)"),
        ({"sparsity": 0.0}, "--sparsity must be in (0, 1)"),
        ({"prune_frac": 0.7}, "--prune-frac must be in (0, 0.5]"),
        ({"prior": "magnitude"}, "--prior must be one of wanda, activation, fluctuation"),
        ({"masks_per_iter": 0}, "--masks-per-iter must be at least 1"),
        ({"seq_len": "long"}, "--seq-len: cannot use 'long'"),
    ],
)
def test_bad_values_are_one_clear_line(overrides, message):
    with pytest.raises(UserError) as err:
        build(PruneOptions, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_preset_key_is_named(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("sparsity: 0.4\nmask-count: 3\n")
    with pytest.raises(UserError) as err:
        load_preset(preset)
    assert "mask_count" in str(err.value) and f"--config {preset}" in str(err.value)


def test_flags_override_preset_and_dashes_work(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("sparsity: 0.4\nprune-frac: 0.1\nalphas: [0.01, 0.1]\n")
    config = build(PruneOptions, load_preset(preset), {"sparsity": 0.3})
    assert (config.sparsity, config.prune_frac, config.alphas) == (0.3, 0.1, (0.01, 0.1))


def test_iteration_count_is_robust_to_float_noise():
    assert PrunePlan.of(PruneOptions(sparsity=0.5, prune_frac=0.05).for_device("cpu")).iterations == 10
    assert PrunePlan.of(PruneOptions(sparsity=0.3, prune_frac=0.1).for_device("cpu")).iterations == 3
    assert PrunePlan.of(PruneOptions(sparsity=0.5, prune_frac=0.3).for_device("cpu")).iterations == 2


def test_the_last_iteration_repairs_only_where_something_uses_its_repair():
    """Every iteration but the last repairs for the next one's evaluation; the last one's repair
    is the published model's under the chain, the rival's arbitration's with a rival, and used by
    nothing where the published model is repaired from the parent."""

    def repairs(**kw) -> tuple[bool, bool]:
        plan = PrunePlan.of(PruneOptions(sparsity=0.2, prune_frac=0.1, **kw).for_device("cpu"))
        return plan.repairs_after(0, last=False), plan.repairs_after(1, last=True)

    assert repairs() == (True, False)  # the default: the repair from the parent's stream
    assert repairs(reconstruct_publish="parent") == (True, False)
    assert repairs(reconstruct_publish="chain") == (True, True)
    assert repairs(rival="flap") == (True, True)
    assert repairs(reconstruct="lsq-final", reconstruct_publish="chain") == (False, True)
    assert repairs(reconstruct="lsq-final") == (False, False)  # the published repair is the only one
    assert repairs(reconstruct="none") == (False, False)


def test_device_is_not_part_of_the_run_identity():
    assert "device" not in PruneOptions().identity() and "sparsity" in PruneOptions().identity()


def test_every_field_is_a_prune_flag_with_the_issue_names():
    args = build_parser().parse_args(
        [
            "prune",
            "--model",
            "m",
            "--data",
            "d",
            "--out",
            "o",
            "--masks-per-iter",
            "4",
            "--prune-frac",
            "0.1",
            "--calib-samples",
            "2",
            "--seq-len",
            "16",
            "--prior",
            "activation",
            "--estimator",
            "perturbed-prior",
            "--seed",
            "3",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--sparsity",
            "0.3",
        ]
    )
    options = options_from(args, PruneOptions)
    assert (options.masks_per_iter, options.estimator, options.seed) == (4, "perturbed-prior", 3)
    given = {"masks_per_iter", "prune_frac", "calib_samples", "seq_len", "prior", "estimator", "seed", "device"}
    given |= {"dtype", "sparsity"}
    settled = {"rival": "none", "unit_order": "estimator"}  # auto's choices for perturbed-prior
    for field in fields_of(PruneOptions):  # every flag not given takes the schema's default
        if field.name not in given:
            assert getattr(options, field.name) == settled.get(field.name, field.default), field.name


def test_the_command_line_answers_bad_input_before_loading_torch():
    """Flags come from option dataclasses; building them must not import the heavy stack."""
    import subprocess
    import sys

    code = (
        "import sys, bonsai.flows.cli as cli; cli.build_parser()\n"
        "heavy = [m for m in ('torch', 'transformers', 'prefect', 'lm_eval') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


RUN_FILES = sorted((Path(__file__).parent.parent / "configs" / "runs").glob("*.yaml"))


@pytest.mark.parametrize("run_file", RUN_FILES, ids=[p.stem for p in RUN_FILES])
def test_every_run_file_is_valid(run_file):
    from bonsai.flows.chain import load_spec

    spec = load_spec(run_file)
    assert spec.prune.sparsity > 0 and Path(spec.out).is_absolute()


def test_run_file_problems_are_one_line(tmp_path):
    from bonsai.flows.chain import load_spec

    bad = tmp_path / "run.yaml"
    for text, message in [
        ("adapt: {steps: 3}\n", "needs a 'prune' section"),
        ("prune: {model: m, data: d}\n", "the prune section needs out"),
        ("prune: {model: m, data: d, out: o}\nextra: {}\n", "unknown section(s) extra"),
        ("prune: {model: m, data: d, out: o}\nadapt: {stepz: 3}\n", "unknown option(s) stepz"),
        ("prune: {model: m, data: d, out: o, sparsity: 3}\n", "--sparsity must be in (0, 1)"),
        ("prune: {model: m, data: d, out: o, reconstruct_damping: -1}\n", "--reconstruct-damping must not be negative"),
        (
            "prune: {model: m, data: d, out: o, reconstruct_final_damping: -1}\n",
            "--reconstruct-final-damping must not be negative",
        ),
    ]:
        bad.write_text(text)
        with pytest.raises(UserError, match=re.escape(message)):
            load_spec(bad)


def test_the_readme_option_table_agrees_with_the_schema():
    """Every prune option is in README's table with its default, and the table names no other."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    rows = re.findall(r"^\| `--([a-z-]+)` \| ([^|]+) \|", readme, re.M)
    documented = {name.replace("-", "_"): default.strip() for name, default in rows}
    fields = {f.name: f.default for f in fields_of(PruneOptions)}
    assert set(documented) == set(fields)
    for name, default in fields.items():
        per = "per penalty" if name == "alphas" else "per device"  # options.BUDGETS
        assert documented[name] == (per if default is None else str(default)), name


def test_a_run_made_before_0_2_0_is_refused_in_one_line_naming_that_version():
    """0.1.0 recorded adaptive sampling's options, earlier runs had format 1 or fewer options: their
    priors and masks were computed or keyed differently, so resuming here would silently redo
    every evaluation; each is refused instead, and a run 0.2.0 made is taken as it is."""
    from bonsai.stages.core.run_identity import recorded_identity

    now = PruneOptions().identity()
    made_by = {
        "adaptive sampling, which 0.2.0 removed": {**now, "sampling": "adaptive", "round_size": 16},
        "it records 0.1.0's sampling options": {**now, "sampling": "fixed", "round_size": 16},
        "it has no --reconstruct, --reconstruct-fit": {
            k: v for k, v in now.items() if k not in ("reconstruct", "reconstruct_fit")
        },
    }
    for how, config in made_by.items():
        with pytest.raises(UserError, match=rf"made by bonsai 0\.1\.0 or earlier \({how}\).*git checkout 160127d"):
            recorded_identity({"format": 2, "identity": {"config": config}})
    with pytest.raises(UserError, match="made by bonsai 0.1.0 or earlier"):
        recorded_identity({"format": 1, "identity": {"config": now}})
    assert recorded_identity({"format": 2, "identity": {"config": now}})["config"] == now
    # 0.2.0 recorded --reconstruct-tokens-per-input, which 0.3.0 removed: at 0 the run is this version's
    made_by_0_2 = {"format": 2, "identity": {"config": {**now, "reconstruct_tokens_per_input": 0.0}}}
    assert recorded_identity(made_by_0_2)["config"] == now
    made_by_0_2["identity"]["config"]["reconstruct_tokens_per_input"] = 12.0
    with pytest.raises(UserError, match=r"made by bonsai 0\.2\.0 with --reconstruct-tokens-per-input.*d8cbe03"):
        recorded_identity(made_by_0_2)
    # 0.4 recorded no --rival: its runs did what --rival none does, and continue under it (not
    # under 0.5.0-0.12.0's default, which settled on flap)
    made_by_0_4 = {"format": 2, "identity": {"config": {k: v for k, v in now.items() if k != "rival"}}}
    assert recorded_identity(made_by_0_4)["config"] == {**now, "rival": "none"}
    # 0.6 recorded no --unit-order: its runs took the estimator's own units, and continue so
    made_by_0_6 = {"format": 2, "identity": {"config": {k: v for k, v in now.items() if k != "unit_order"}}}
    assert recorded_identity(made_by_0_6)["config"] == {**now, "unit_order": "estimator"}
    assert now["unit_order"] == "flap"
    # 0.8 recorded no --reconstruct-final-damping: its last repair was damped like the others
    made_by_0_8 = {"format": 2, "identity": {"config": {**now, "reconstruct_damping": 0.3}}}
    del made_by_0_8["identity"]["config"]["reconstruct_final_damping"]
    assert recorded_identity(made_by_0_8)["config"]["reconstruct_final_damping"] == 0.3
    assert now["reconstruct_final_damping"] == 0.01
    # 0.9 recorded no --reconstruct-publish: it published the chain of repairs, and continues so
    made_by_0_9 = {"format": 2, "identity": {"config": {k: v for k, v in now.items() if k != "reconstruct_publish"}}}
    assert recorded_identity(made_by_0_9)["config"] == {**now, "reconstruct_publish": "chain"}
    assert now["reconstruct_publish"] == "parent-stream"
    # 0.10 and 0.11 repaired the parent aiming at the projections' outputs: recorded so, continued so
    made_by_0_11 = {"format": 2, "identity": {"config": {**now, "reconstruct_publish": "parent"}}}
    assert recorded_identity(made_by_0_11)["config"]["reconstruct_publish"] == "parent"
    # 0.10 recorded no published repair's windows or damping: it took the last repair's
    resolved = PruneOptions().for_device("cpu").identity()
    made_by_0_10 = {"format": 2, "identity": {"config": {**resolved, "reconstruct_samples": 300}}}
    for name in ("reconstruct_publish_samples", "reconstruct_publish_damping"):
        del made_by_0_10["identity"]["config"][name]
    upgraded = recorded_identity(made_by_0_10)["config"]
    assert (upgraded["reconstruct_publish_samples"], upgraded["reconstruct_publish_damping"]) == (300, 0.01)
    assert (resolved["reconstruct_publish_samples"], resolved["reconstruct_publish_damping"]) == (1024, 0.001)
    # under the chain the published repair is the last one: its options settle to that one's
    chain = PruneOptions(reconstruct_publish="chain", reconstruct_publish_samples=64).for_device("cpu").identity()
    assert (chain["reconstruct_publish_samples"], chain["reconstruct_publish_damping"]) == (512, 0.01)


def test_rival_auto_settles_on_flap_for_a_repaired_regression_whose_chain_is_published():
    """The rival's FLAP removal is formed beside a regression estimator's where every iteration is
    repaired and the chain of repairs is published; where the published model is repaired once
    from the parent (the default) the rival costs a third of the run for little, and a baseline
    estimator, FLAP itself, or no per-iteration repair runs alone.  The settled value is what
    run.json records, so a later default cannot change a recorded run."""
    assert PruneOptions().rival == "none" and PruneOptions().identity()["rival"] == "none"
    assert PruneOptions(reconstruct_publish="chain").rival == "flap"
    assert PruneOptions(estimator="paper-regression", reconstruct_publish="chain").rival == "flap"
    for alone in (
        {"reconstruct_publish": "parent"},
        {"reconstruct": "none"},
        {"reconstruct": "lsq-final", "reconstruct_publish": "chain"},
        {"estimator": "flap", "prior": "flap", "reconstruct_publish": "chain"},
        {"estimator": "prior-only", "reconstruct_publish": "chain"},
        {"estimator": "random", "reconstruct_publish": "chain"},
    ):
        assert PruneOptions(**alone).rival == "none", alone
    assert PruneOptions(rival="flap").rival == "flap"


def test_unit_order_auto_takes_flaps_units_for_a_repaired_regression():
    """FLAP's order within a layer: auto settles on it for a regression estimator repaired every
    iteration (with or without the rival, whose statistics are the same) and beside the flap rival,
    on the estimator's own units otherwise; either can be asked for."""
    assert PruneOptions().unit_order == "flap" and PruneOptions().identity()["unit_order"] == "flap"
    assert PruneOptions(rival="none").unit_order == "flap"
    assert PruneOptions(reconstruct_publish="chain").unit_order == "flap"
    assert PruneOptions(estimator="prior-only").unit_order == "estimator"
    assert PruneOptions(reconstruct="lsq-final").unit_order == "estimator"
    assert PruneOptions(estimator="prior-only", rival="flap").unit_order == "flap"
    assert PruneOptions(unit_order="estimator").rival == "none"


def test_a_stage_config_takes_the_options_it_names_and_nothing_renamed():
    """stage_config fills a field named like an option (or an options property) from the options;
    the rest must be given, and a given value may not shadow an option."""
    import dataclasses

    from bonsai.stages import reconstruct
    from bonsai.stages.core.options import stage_config

    options = PruneOptions(reconstruct_samples=40, reconstruct_damping=0.3, calib_samples=8, calib_pool=80)
    cfg = stage_config(reconstruct.ReconstructConfig, options, iteration=2, model_dtype="float32")
    assert (cfg.reconstruct_samples, cfg.reconstruct_damping, cfg.calib_samples, cfg.iteration) == (40, 0.3, 8, 2)

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Fits:
        alpha_grid: tuple[float, ...]
        penalty: str

    assert stage_config(Fits, PruneOptions(penalty="l2")).alpha_grid == PruneOptions(penalty="l2").alpha_grid
    with pytest.raises(TypeError, match="shadow"):
        stage_config(Fits, options, penalty="l2")
    with pytest.raises(TypeError, match="shadow"):
        stage_config(Fits, options, not_a_field=1)
    with pytest.raises(TypeError):
        stage_config(reconstruct.ReconstructConfig, options, iteration=2)  # model_dtype is not an option


def test_the_budget_left_out_is_the_devices_and_given_values_stay():
    """masks_per_iter, calib_samples, seq_len and reconstruct_samples left out take the device's
    budget (options.BUDGETS); given ones are kept; the values the run will use are checked again."""
    from bonsai.stages.core.options import BUDGETS

    for device in ("cpu", "cuda"):
        resolved = PruneOptions().for_device(device)
        assert {k: getattr(resolved, k) for k in BUDGETS[device]} == BUDGETS[device]
    assert PruneOptions(masks_per_iter=16, seq_len=64).for_device("cuda").masks_per_iter == 16
    assert PruneOptions(masks_per_iter=16, seq_len=64).for_device("cuda").calib_samples == 32
    with pytest.raises(UserError, match=r"--calib-pool \(200\) must hold .* \(8 \+ 512\)"):
        PruneOptions(calib_pool=200).for_device("cpu")  # 8 + 512 windows do not fit in 200
    assert PruneOptions(calib_pool=200).for_device("cuda").reconstruct_samples == 128  # 32 + 128 do
    with pytest.raises(ValueError, match="per device"):
        PrunePlan.of(PruneOptions())


def test_prepare_resolves_the_budget_and_the_dtype_for_the_device(zoo, corpus, tmp_path):
    """What a run records is what it ran with: the CPU's budget and evaluation dtype, read from
    this CPU's flags, and the float32 model every other stage works in."""
    from bonsai.flows.preflight import prepare
    from bonsai.stages.core.devices import native_bf16
    from bonsai.stages.core.options import BUDGETS

    p = prepare(str(zoo["llama"]), str(corpus), str(tmp_path / "run"), PruneOptions(calib_pool=600, device="cpu"))
    assert {k: getattr(p.config, k) for k in BUDGETS["cpu"]} == BUDGETS["cpu"]
    assert p.config.dtype == ("bfloat16" if native_bf16() else "float32") and p.model_dtype == "float32"
    given = prepare(str(zoo["llama"]), str(corpus), str(tmp_path / "run"), PruneOptions(seq_len=32, device="cpu"))
    assert given.config.seq_len == 32 and given.config.masks_per_iter == BUDGETS["cpu"]["masks_per_iter"]
    assert not (tmp_path / "run").exists()  # preparing claims nothing
