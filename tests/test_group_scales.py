"""The split sampling design and the group-scale regression on synthetic utilities: the
design makes per-group effects identifiable, the fit recovers them, and without information
it falls back to the prior's order."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from bonsai.stages import importance, masks
from bonsai.stages.core.group_scales import Groups, fit_group_scales
from bonsai.stages.core.plan import ESTIMATORS
from bonsai.stages.core.regression import tau
from bonsai.stages.core.rng import generator
from bonsai.stages.core.units import CHANNEL, HEAD, KINDS


def candidates(layers=6, channels=40, heads=1, seed=0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(layers):
        for kind, count in ((HEAD, heads), (CHANNEL, channels)):
            for unit in range(count):
                rows.append(
                    {
                        "candidate": len(rows),
                        "iteration": 0,
                        "layer": layer,
                        "kind": kind,
                        "unit": unit,
                        "position": unit,
                        "params": 100 if kind == HEAD else 10,
                        "prior": float(rng.uniform(0.2, 1.0)),
                        "prior_norm": 1.0,
                        "group_prior_mean": 1.0,
                    }
                )
    return pl.DataFrame(rows)


def groups_of(cands: pl.DataFrame):
    table = cands.select("layer", "kind").unique(maintain_order=True).with_row_index("group")
    group_of = cands.join(table, on=["layer", "kind"], how="left")["group"].to_numpy()
    kind_index = {k: i for i, k in enumerate(KINDS)}
    groups = Groups.build(group_of, np.array([kind_index[k] for k in table["kind"]]), cands["prior"].to_numpy())
    return groups, np.array([kind_index[k] for k in cands["kind"]]), table


def test_every_estimator_has_an_implementation():
    assert set(importance.ESTIMATES) == set(ESTIMATORS)


def test_split_design_varies_fractions_and_keeps_heads_in_channel_pairs():
    cands = candidates()
    keep, pair, complement, perturbs = masks.sample_split(cands, 400, generator(0, "t"))
    again = masks.sample_split(cands, 400, generator(0, "t"))
    assert (keep == again[0]).all() and perturbs == again[3]
    heads = cands["kind"].to_numpy() == HEAD
    assert perturbs[0::4] == perturbs[1::4] == ["channel"] * 100  # pairs 0, 2, 4, ...: channels only
    assert perturbs[2::4] == perturbs[3::4] == ["channel,head"] * 100
    channel_rows = np.array([p == "channel" for p in perturbs])
    assert keep[channel_rows][:, heads].all()  # mask and complement keep every candidate head
    assert (keep[0::2] ^ keep[1::2])[~channel_rows[0::2]].all()  # the complement flips what is perturbed
    layer0 = (cands["layer"].to_numpy() == 0) & ~heads
    kept = keep[0::2][:, layer0].mean(1)
    assert 0.08 < kept.min() and kept.max() < 0.92 and kept.std() > 0.15  # fractions vary per sub-model
    assert abs(keep[:, layer0].mean() - 0.5) < 0.02  # and are one half on average
    table = masks.masks_table(0, keep, pair, complement).with_columns(pl.Series("perturbs", perturbs))
    assert masks.perturbed_kinds(table, KINDS)[0].tolist() == [False, True]


def synthetic_utilities(cands, keep, scales, noise=0.002, seed=0):
    """Utilities of a model in which group g's candidates are worth scales[g] in total,
    shared by prior (the group-scale model without corrections), plus noise."""
    groups, _, _ = groups_of(cands)
    rng = np.random.default_rng(seed)
    return groups.features(keep) @ scales - 3.0 + noise * rng.normal(size=len(keep))


def test_group_scales_are_recovered_from_the_split_design():
    cands = candidates()
    groups, kinds, table = groups_of(cands)
    rng = np.random.default_rng(1)
    truth = np.where(
        table["kind"].to_numpy() == HEAD, rng.uniform(0.0, 0.5, len(table)), rng.uniform(0.0, 0.05, len(table))
    )
    keep, pair, _, perturbs = masks.sample_split(cands, 200, generator(0, "fit"))
    utility = synthetic_utilities(cands, keep, truth)
    perturbed = np.array([[k in p.split(",") for k in KINDS] for p in perturbs])
    fit = fit_group_scales(keep, utility, pair, perturbed, groups, kinds, folds=5, seed=0)
    channel_groups = table["kind"].to_numpy() == CHANNEL
    assert np.corrcoef(fit.scales[channel_groups], truth[channel_groups])[0, 1] > 0.9
    assert np.corrcoef(fit.scales[~channel_groups], truth[~channel_groups])[0, 1] > 0.9
    expected = truth[groups.of] * groups.weight
    assert tau(fit.beta, expected) > 0.8
    by_kind = {KINDS[k.kind]: k for k in fit.kinds}
    assert by_kind[CHANNEL].rows == 100  # channels: fitted on the channel-only pairs
    assert by_kind[HEAD].rows == 100 and by_kind[CHANNEL].cv_mse < 0.2


def test_half_design_cannot_tell_groups_apart_but_split_can():
    """Every half-design mask keeps half of each group: a group's total is the same in every
    sub-model, so its scale is not identifiable (the diagnosis of the paper's regression)."""
    cands = candidates(heads=0)
    groups, _, _ = groups_of(cands)
    half, _, _ = masks.sample(cands, 200, generator(0, "h"))
    split, _, _, _ = masks.sample_split(cands, 200, generator(0, "s"))
    counts_half = np.stack([half[:, groups.of == g].sum(1) for g in range(len(groups.kind))], axis=1)
    counts_split = np.stack([split[:, groups.of == g].sum(1) for g in range(len(groups.kind))], axis=1)
    assert counts_half.std(0).max() == 0 and counts_split.std(0).min() > 5


@pytest.mark.parametrize("utility", ["constant", "noise"])
def test_without_information_the_prior_order_stands_within_groups(utility):
    cands = candidates()
    groups, kinds, _ = groups_of(cands)
    keep, pair, _, perturbs = masks.sample_split(cands, 60, generator(0, "u"))
    values = np.ones(len(keep)) if utility == "constant" else np.random.default_rng(0).normal(size=len(keep))
    perturbed = np.array([[k in p.split(",") for k in KINDS] for p in perturbs])
    fit = fit_group_scales(keep, values, pair, perturbed, groups, kinds, folds=5, seed=0)
    prior = cands["prior"].to_numpy()
    if utility == "constant":
        assert not fit.beta.any()  # importance ties everywhere: select falls back to the prior's order
        return
    # noise: a small scale per group, never a reversal of the prior's order within one
    ordered = [g for g in range(len(groups.kind)) if (groups.of == g).sum() > 1 and fit.beta[groups.of == g].any()]
    assert ordered, "the noise gave every group a zero scale: this seed tests nothing"
    for g in ordered:
        assert tau(fit.beta[groups.of == g], prior[groups.of == g]) > 0.99


def test_a_kind_with_few_candidates_per_layer_is_one_group_across_layers():
    cands = candidates(layers=5, channels=12, heads=1)
    usable = masks.masks_table(0, *masks.sample_split(cands, 8, generator(0, "p"))[:3]).with_columns(
        pl.lit(0.0).alias("utility")
    )
    table, problem = importance.group_problem(cands, usable)
    heads = table.filter(pl.col("kind") == HEAD)
    assert heads.height == 1 and heads["layer"][0] is None  # one scale for the five lone heads
    assert table.filter(pl.col("kind") == CHANNEL)["layer"].to_list() == list(range(5))
    head_weights = problem["groups"].weight[cands["kind"].to_numpy() == HEAD]
    assert abs(head_weights.sum() - 1.0) < 1e-9  # shares of the pooled group's (normalised) prior mass
