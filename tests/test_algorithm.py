"""The pieces of Algorithm 1 on their own: candidates, sampling with complements, the
regression and its cross-validation, priors against a direct computation, batched
sub-model evaluation against sliced models, and the global removal budget."""

from __future__ import annotations

import logging

import numpy as np
import polars as pl
import pytest
import torch

from bonsai.artifacts import Store, external_ref
from bonsai.stages import importance, masks, select
from bonsai.stages.core.errors import UserError
from bonsai.stages.core.families import FAMILIES
from bonsai.stages.core.model_io import load_model
from bonsai.stages.core.nll import row_nll
from bonsai.stages.core.regression import fit_importance, folds_of, tau
from bonsai.stages.core.rng import generator
from bonsai.stages.core.slicing import slice_model
from bonsai.stages.core.taps import Taps, unit_priors
from bonsai.stages.core.units import CHANNEL, HEAD, KeepState, layer_shapes
from bonsai.stages.evaluate import evaluate_masks


def priors_table(groups: dict[tuple[int, str], list[float]]) -> pl.DataFrame:
    rows = []
    for (layer, kind), values in groups.items():
        for unit, value in enumerate(values):
            rows.append(
                {
                    "iteration": 0,
                    "layer": layer,
                    "kind": kind,
                    "unit": unit,
                    "position": unit,
                    "params": 10 if kind == CHANNEL else 100,
                    "wanda": value,
                }
            )
    return pl.DataFrame(rows)


# --- candidates and masks ---------------------------------------------------------------


def test_candidates_are_the_bottom_two_p_of_each_group():
    table = priors_table({(0, CHANNEL): [5, 1, 4, 2, 3, 9, 8, 7, 6, 10], (0, HEAD): [3.0, 1.0]})
    cands = masks.candidates(table, prune_frac=0.1, prior="wanda")
    channel = cands.filter(pl.col("kind") == CHANNEL)
    assert sorted(channel["unit"].to_list()) == [1, 3]  # priors 1 and 2: ceil(0.2 * 10) = 2
    assert cands.filter(pl.col("kind") == HEAD)["unit"].to_list() == [1]  # ceil(0.2 * 2) = 1
    assert cands["candidate"].to_list() == list(range(cands.height))


def test_each_mask_drops_half_of_every_group_and_its_complement_the_other_half():
    table = priors_table({(0, CHANNEL): list(range(1, 11)), (1, CHANNEL): list(range(1, 13))})
    cands = masks.candidates(table, prune_frac=0.25, prior="wanda")  # 5 and 6 candidates
    keep, pair, complement = masks.sample(cands, 7, generator(0, "t"))
    assert keep.shape == (8, 11) and list(pair) == [0, 0, 1, 1, 2, 2, 3, 3]
    layer = cands["layer"].to_numpy()
    for row in range(0, 8, 2):
        assert (keep[row] == ~keep[row + 1]).all() and not complement[row] and complement[row + 1]
        assert keep[row][layer == 0].sum() in (2, 3) and keep[row][layer == 1].sum() == 3


def test_lone_candidates_are_kept_independently_of_each_other():
    """One candidate per layer must not be kept by every mask (it would be collinear with
    every other lone candidate and with the mask/complement split)."""
    table = priors_table({(layer, HEAD): [1.0, 5.0, 5.0, 5.0] for layer in range(4)})
    cands = masks.candidates(table, prune_frac=0.1, prior="wanda")  # ceil(0.8) = 1 per layer
    assert cands.height == 4
    keep, _, _ = masks.sample(cands, 400, generator(0, "lone"))
    primaries = keep[0::2].astype(float)
    assert abs(primaries.mean() - 0.5) < 0.08
    correlation = np.corrcoef(primaries.T)
    assert np.abs(correlation[~np.eye(4, dtype=bool)]).max() < 0.2


def test_sampling_is_seeded_and_favours_high_priors():
    table = priors_table({(0, CHANNEL): [1.0, 1.0, 1.0, 20.0] + [100.0] * 4})
    cands = masks.candidates(table, prune_frac=0.25, prior="wanda")  # the four lowest
    a, _, _ = masks.sample(cands, 4000, generator(0, "t"))
    b, _, _ = masks.sample(cands, 4000, generator(0, "t"))
    assert (a == b).all()
    primaries = a[0::2]
    assert primaries[:, 3].mean() > 0.9  # the prior-20 unit is almost always kept
    assert abs(primaries[:, :3].mean() - 1 / 3) < 0.05


# --- regression ---------------------------------------------------------------------------


def synthetic(n_pairs=100, units=30, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    beta = rng.normal(size=units)
    keep = rng.random((n_pairs, units)) < 0.5
    keep = np.concatenate([keep, ~keep], axis=1).reshape(2 * n_pairs, units)
    utility = keep @ beta + noise * rng.normal(size=2 * n_pairs) - 3.0
    return keep, utility, np.repeat(np.arange(n_pairs), 2), beta


@pytest.mark.parametrize("penalty, alphas", [("l1", (1e-4, 1e-3, 1e-2, 1e-1)), ("l2", (0.1, 1.0, 10.0))])
def test_regression_recovers_the_ranking_of_modules(penalty, alphas):
    keep, utility, groups, beta = synthetic()
    fit = fit_importance(keep, utility, groups, penalty, alphas, 5, seed=0)
    assert tau(fit.beta, beta) > 0.9
    assert fit.cv_tau > 0.8 and len(fit.cv) == 5 * len(alphas)
    np.testing.assert_allclose(fit.beta, beta, atol=0.1)


def test_cross_validation_prefers_regularisation_when_modules_outnumber_masks():
    """100 sub-models, 150 modules of which 8 matter: least squares (alpha 0) interpolates
    the noise and ranks held-out masks badly; the Kendall-tau criterion picks a penalty."""
    keep, _, groups, _ = synthetic(n_pairs=50, units=150)
    rng = np.random.default_rng(1)
    beta = np.zeros(150)
    beta[:8] = 3 * rng.normal(size=8)
    utility = keep @ beta + 0.3 * rng.normal(size=len(keep))
    fit = fit_importance(keep, utility, groups, "l1", (0.0, 1e-2, 1e-1), 5, seed=0)
    assert fit.alpha == 1e-2 and fit.cv_tau > 0.8
    assert tau(fit.beta[:8], beta[:8]) > 0.9


def test_folds_never_split_a_mask_from_its_complement():
    groups = np.repeat(np.arange(23), 2)
    fold = folds_of(groups, 5, seed=3)
    assert (fold[0::2] == fold[1::2]).all() and len(set(fold)) == 5


def test_constant_utilities_give_zero_importance():
    keep, _, groups, _ = synthetic(n_pairs=10, units=5)
    fit = fit_importance(keep, np.ones(len(keep)), groups, "l1", (0.1,), 3, seed=0)
    assert not fit.beta.any()


# --- priors against a direct computation ----------------------------------------------------


def test_priors_match_the_appendix_f_formulas(zoo):
    model = load_model(zoo["llama-gqa"], torch.float32, torch.device("cpu"))
    family = FAMILIES["llama"]
    ids = torch.randint(0, model.config.vocab_size, (3, 10), generator=generator(0, "ids"))
    captured = {}
    layer = model.model.layers[1]
    hooks = [
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("mlp", a[0].clone())),
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("attn", a[0].clone())),
    ]
    with Taps(model, family, stat_groups=1) as taps, torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    got = unit_priors(taps)
    a = captured["mlp"].reshape(-1, captured["mlp"].shape[-1]).double()
    w = layer.mlp.down_proj.weight.double()
    torch.testing.assert_close(got[(1, CHANNEL)]["activation"], a.abs().mean(0))
    torch.testing.assert_close(got[(1, CHANNEL)]["wanda"], a.pow(2).mean(0).sqrt() * w.abs().mean(0))
    torch.testing.assert_close(got[(1, CHANNEL)]["fluctuation"], a.var(0, unbiased=False) * w.pow(2).sum(0))
    shape = layer_shapes(model, family)[1]
    width = shape.per_group * shape.head_dim
    h = captured["attn"].reshape(-1, shape.groups, width).double()  # tokens x group x features
    wo = layer.self_attn.o_proj.weight.double().reshape(-1, shape.groups, width)
    torch.testing.assert_close(got[(1, HEAD)]["activation"], h.abs().mean((0, 2)))
    torch.testing.assert_close(got[(1, HEAD)]["wanda"], (h.pow(2).mean(0).sqrt() * wo.abs().mean(0)).mean(1))


# --- evaluation -----------------------------------------------------------------------------


def test_batched_multi_mask_utilities_equal_sliced_models(zoo):
    model = load_model(zoo["llama-gqa"], torch.float32, torch.device("cpu"))
    family = FAMILIES["llama"]
    shapes = layer_shapes(model, family)
    table = pl.DataFrame(
        [
            {"iteration": 0, "layer": layer, "kind": kind, "unit": u, "position": u, "params": 1, "wanda": float(u + 1)}
            for layer, s in enumerate(shapes)
            for kind in (HEAD, CHANNEL)
            for u in range(s.count(kind))
        ]
    )
    cands = masks.candidates(table, 0.25, "wanda")
    keep, _, _ = masks.sample(cands, 6, generator(0, "m"))
    windows = torch.randint(0, model.config.vocab_size, (4, 16), generator=generator(0, "w"))
    results = [evaluate_masks(model, family, windows, cands, keep, b, torch.device("cpu"))["nll"] for b in (1, 3, 16)]
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6)
    np.testing.assert_allclose(results[0], results[2], rtol=1e-6)
    for row in (0, 3):  # a mask and a complement, as physically sliced models
        sliced = load_model(zoo["llama-gqa"], torch.float32, torch.device("cpu"))
        state = KeepState.full(shapes)
        dropped = {
            (layer, k, u)
            for (layer, k, u), kept in zip(cands.select("layer", "kind", "unit").iter_rows(), keep[row])
            if not kept
        }
        state = KeepState(
            tuple(tuple(u for u in g if (i, HEAD, u) not in dropped) for i, g in enumerate(state.groups)),
            tuple(tuple(u for u in c if (i, CHANNEL, u) not in dropped) for i, c in enumerate(state.channels)),
        )
        slice_model(sliced, family, state)
        assert float(row_nll(sliced, windows).sum()) == pytest.approx(results[0][row], rel=1e-6)


def test_non_finite_utilities_are_dropped_with_a_warning(tmp_path, caplog):
    store = Store(tmp_path)
    table = priors_table({(0, CHANNEL): list(range(1, 21))})
    parent = external_ref("parent", tmp_path, "p" * 64)
    keep, pair, comp = masks.sample(masks.candidates(table, 0.25, "wanda"), 40, generator(0, "x"))

    def masks_build(out):
        masks.candidates(table, 0.25, "wanda").write_parquet(out / masks.CANDIDATES)
        masks.masks_table(0, keep, pair, comp).write_parquet(out / masks.MASKS)

    mref = store.produce("masks", "t", {}, [parent], masks_build)
    utility = keep[:, :3].sum(1).astype(float)
    utility[[1, 6, 7]] = [np.nan, np.inf, -np.inf]

    def utilities(values):
        def build(out):
            pl.DataFrame(
                {
                    "iteration": 0,
                    "shard": 0,
                    "mask": np.arange(len(values), dtype=np.int32),
                    "nll_sum": -values,
                    "tokens": 1,
                    "utility": values,
                    "finite": np.isfinite(values),
                }
            ).write_parquet(out / "utilities.parquet")

        return build

    eref = store.produce("evaluate", "t", {"v": 1}, [parent], utilities(utility))
    cfg = importance.ImportanceConfig(
        iteration=0, estimator="regression", penalty="l1", alpha_grid=(1e-3, 1e-2), cv_folds=3, seed=0
    )
    with caplog.at_level(logging.WARNING, logger="bonsai.importance"):
        ref = importance.run(mref, [eref], cfg, store)
    assert "3 of 40 sub-models gave a non-finite loss" in caplog.text
    assert ref.info()["masks_used"] == 37 and np.isfinite(importance.read(ref)["importance"].to_numpy()).all()
    mostly_bad = np.where(np.arange(40) < 30, np.nan, utility)
    eref2 = store.produce("evaluate", "t", {"v": 2}, [parent], utilities(mostly_bad))
    with pytest.raises(UserError, match="only 10 of 40 sub-models had a finite loss"):
        importance.run(mref, [eref2], cfg, store)


# --- selection ------------------------------------------------------------------------------


def test_selection_is_global_cumulative_and_overshoots_by_at_most_one_unit(tmp_path):
    store = Store(tmp_path)
    parent = external_ref("parent", tmp_path, "p" * 64)
    table = priors_table({(0, CHANNEL): [1.0] * 10, (1, CHANNEL): [1.0] * 10, (0, HEAD): [1.0] * 2})
    priors_ref = store.produce(
        "priors", "t", {}, [parent], lambda out: table.write_parquet(out / "priors.parquet") or {"model_params": 10_000}
    )
    scores = {(0, CHANNEL): [0.5] * 10, (1, CHANNEL): [0.1 * u for u in range(10)], (0, HEAD): [0.05, 9.0]}
    imp = pl.DataFrame(
        [
            {
                "iteration": 0,
                "layer": layer,
                "kind": k,
                "unit": u,
                "params": 10 if k == CHANNEL else 100,
                "prior": 1.0,
                "prior_norm": 1.0,
                "importance": s,
            }
            for (layer, k), values in scores.items()
            for u, s in enumerate(values)
        ]
    )
    imp_ref = store.produce("importance", "t", {}, [parent], lambda out: imp.write_parquet(out / importance.FILE))
    first = select.run(
        priors_ref, imp_ref, None, select.SelectConfig(iteration=0, sparsity=0.5, prune_frac=0.25), store
    )
    removed = pl.read_parquet(first.file(select.REMOVED))
    # budget 0.25 * 400 = 100 params, in ascending importance across layers and kinds;
    # the head (100 params) overshoots the budget by less than one unit
    assert removed.select("layer", "kind", "unit").rows() == [(1, CHANNEL, 0), (0, HEAD, 0)]
    assert first.info()["sparsity"] == pytest.approx(110 / 400)
    # the next iteration skips units already gone; ties (0.5) go to the lower layer
    second = select.run(
        priors_ref, imp_ref, first, select.SelectConfig(iteration=1, sparsity=0.5, prune_frac=0.25), store
    )
    removed = pl.read_parquet(second.file(select.REMOVED))
    assert removed.select("layer", "kind", "unit").rows() == (
        [(1, CHANNEL, u) for u in range(1, 5)] + [(0, CHANNEL, u) for u in range(5)]
    )
    assert second.info()["sparsity"] == pytest.approx(0.5)
    keep = pl.read_parquet(second.file("keep.parquet"))
    gone = keep.filter(~pl.col("kept"))
    assert gone.height == 11 and gone["removed_iteration"].unique().sort().to_list() == [0, 1]


def test_unit_order_keeps_the_estimators_count_per_layer_and_takes_the_lowest_flap_units(tmp_path):
    """--unit-order flap: the estimator decides how many units of each (layer, kind) go, FLAP's
    score of the current model which ones; the budget is the same, units already gone are
    never taken again, and the summary counts the units the order replaced."""
    store = Store(tmp_path)
    parent = external_ref("parent", tmp_path, "p" * 64)
    table = priors_table({(0, CHANNEL): [1.0] * 6, (1, CHANNEL): [1.0] * 6, (0, HEAD): [1.0] * 2})
    priors_ref = store.produce(
        "priors", "t", {}, [parent], lambda out: table.write_parquet(out / "priors.parquet") or {"model_params": 1_000}
    )
    # the estimator scored four candidates of each layer's channels and the heads
    scores = {(0, CHANNEL): [0.1, 0.2, 0.9, 0.8], (1, CHANNEL): [0.3, 0.4, 0.7, 0.6], (0, HEAD): [5.0, 6.0]}
    imp = pl.DataFrame(
        [
            {"layer": layer, "kind": k, "unit": u, "params": 10 if k == CHANNEL else 100, "prior_norm": 1.0}
            | {"importance": s}
            for (layer, k), values in scores.items()
            for u, s in enumerate(values)
        ]
    )
    imp_ref = store.produce("importance", "t", {}, [parent], lambda out: imp.write_parquet(out / importance.FILE))
    # FLAP's order: layer 0's channels 5 and 4 lowest (the estimator never scored them), layer 1's as scored
    flap = {(0, CHANNEL): [0.5, 0.6, 0.7, 0.8, 0.2, 0.1], (1, CHANNEL): [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}
    order = table.with_columns(
        pl.Series("flap", [v for (layer, k) in [(0, CHANNEL), (1, CHANNEL)] for v in flap[(layer, k)]] + [0.0, 0.0])
    )
    order_ref = store.produce(
        "priors", "t", {"flap": 1}, [parent], lambda out: order.write_parquet(out / "priors.parquet")
    )
    cfg = select.SelectConfig(iteration=0, sparsity=0.2, prune_frac=0.1)
    own = select.run(priors_ref, imp_ref, None, cfg, store)
    ordered = select.run(priors_ref, imp_ref, None, cfg, store, order=order_ref)

    def units(ref):
        return pl.read_parquet(ref.file(select.REMOVED)).select("layer", "kind", "unit").sort("layer", "unit")

    # budget 0.1 * 320 = 32 params: four channels, lowest importance first (0.1, 0.2 in layer 0; 0.3, 0.4 in layer 1)
    assert units(own).rows() == [(0, CHANNEL, 0), (0, CHANNEL, 1), (1, CHANNEL, 0), (1, CHANNEL, 1)]
    assert units(ordered).rows() == [(0, CHANNEL, 4), (0, CHANNEL, 5), (1, CHANNEL, 0), (1, CHANNEL, 1)]
    assert ordered.info()["sparsity"] == own.info()["sparsity"] and ordered.info()["reordered"] == 2
    assert "reordered" not in own.info()
    # the next iteration: the units gone are not taken again, the count is again the estimator's
    second = select.run(
        priors_ref,
        imp_ref,
        ordered,
        select.SelectConfig(iteration=1, sparsity=0.2, prune_frac=0.1),
        store,
        order=order_ref,
    )
    # (64 params in all: three more channels; the estimator's are layer 0's 0 and 1, layer 1's 3)
    assert units(second).rows() == [(0, CHANNEL, 0), (0, CHANNEL, 1), (1, CHANNEL, 2)]
    assert second.info()["sparsity"] == pytest.approx(70 / 320) and second.info()["reordered"] == 1
