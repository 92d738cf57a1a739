"""The repair-aware prior: the error a unit's removal leaves after the least-squares refit,
checked against the refit itself, and `--prior obs` through a whole run."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from bonsai.stages.core.families import family_for_model_type
from bonsai.stages.core.model_io import load_model
from bonsai.stages.core.saliency import repair_aware_priors, unit_errors
from bonsai.stages.core.units import CHANNEL, HEAD, layer_shapes

import tiny


def correlated(tokens=300, width=12, out=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g, dtype=torch.float64) @ torch.randn(
        width, width, generator=g, dtype=torch.float64
    )
    return x, torch.randn(out, width, generator=g, dtype=torch.float64)


def refit_error(x: torch.Tensor, w: torch.Tensor, removed: list[int]) -> float:
    """||x W^T - x_K W_K'^T||^2 with W_K' the least-squares fit: what the repair leaves."""
    kept = [c for c in range(x.shape[1]) if c not in removed]
    fit = torch.linalg.lstsq(x[:, kept], x @ w.T).solution
    return float((x[:, kept] @ fit - x @ w.T).square().sum())


@pytest.mark.parametrize("width", [1, 3])
def test_a_units_saliency_is_the_error_its_removal_leaves_after_the_refit(width):
    x, w = correlated()
    errors = unit_errors(w, x.T @ x, width, damping=0.0)
    expected = [refit_error(x, w, list(range(u * width, (u + 1) * width))) for u in range(12 // width)]
    assert torch.allclose(errors, torch.tensor(expected, dtype=torch.float64), rtol=1e-6)
    # the repair's view differs from the magnitude's: a predictable column is cheap however large
    x[:, 4] = x[:, 0] + 0.01 * x[:, 1]
    w[:, 4] *= 100
    cheap = unit_errors(w, x.T @ x, 1, damping=0.0)
    assert cheap[4] < cheap.median() and w[:, 4].norm() > w.norm(dim=0).median()


@pytest.mark.parametrize("width", [1, 3])
def test_greedy_scores_are_the_increases_of_the_refit_error_in_the_cheapest_order(width):
    x, w = correlated()
    noise = 0.05 * torch.randn(x.shape[0], width, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    x[:, width : 2 * width] = x[:, :width] + noise  # units 0 and 1 nearly predict each other
    units = 12 // width
    scores = unit_errors(w, x.T @ x, width, damping=0.0, steps=2)
    removed, left = [], 0.0
    for _ in range(2):  # brute force: the unit whose removal adds least to what the refit leaves
        gains = {
            u: refit_error(x, w, [c for v in removed + [u] for c in range(v * width, (v + 1) * width)]) - left
            for u in range(units)
            if u not in removed
        }
        best = min(gains, key=gains.get)
        assert scores[best].item() == pytest.approx(gains[best], rel=1e-6)
        removed.append(best)
        left += gains[best]
    others = [u for u in range(units) if u not in removed]
    assert scores[others].min() >= scores[removed].max()  # the greedy pair are the cheapest two


def test_damping_and_centring_are_those_of_the_repair():
    x, w = correlated()
    x = x + 5.0  # a mean the intercept carries
    damped = unit_errors(w, x.T @ x, 1, damping=0.1)
    plain = unit_errors(w, x.T @ x, 1, damping=0.0)
    assert (damped >= plain - 1e-9).all()  # shrinking the refit can only leave more
    centred = x - x.mean(0)
    expected = unit_errors(w, centred.T @ centred, 1, damping=0.0)
    n, total = x.shape[0], x.sum(0)
    assert torch.allclose(unit_errors(w, x.T @ x - torch.outer(total, total) / n, 1, 0.0), expected, rtol=1e-6)


def test_the_layer_by_layer_pass_sees_each_projections_inputs_in_the_whole_model(zoo):
    model = load_model(zoo["llama-gqa"], torch.float32, torch.device("cpu"))
    family = family_for_model_type(model.config.model_type)
    windows = torch.randint(0, model.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(0))
    priors = repair_aware_priors(model, family, windows, damping=0.1, centred=False, batch_size=4)
    seen = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda m, a, k=key: seen.setdefault(k, []).append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for key, module in [((i, HEAD), layer.self_attn.o_proj) for i, layer in enumerate(model.model.layers)]
        + [((i, CHANNEL), layer.mlp.down_proj) for i, layer in enumerate(model.model.layers)]
    ]
    with torch.no_grad():
        model(input_ids=windows)
    for h in hooks:
        h.remove()
    for index, shape in enumerate(layer_shapes(model, family)):
        for kind, module in (
            (HEAD, model.model.layers[index].self_attn.o_proj),
            (CHANNEL, model.model.layers[index].mlp.down_proj),
        ):
            x = torch.cat(seen[(index, kind)]).double()
            width = shape.per_group * shape.head_dim if kind == HEAD else 1
            expected = (unit_errors(module.weight.detach(), x.T @ x, width, 0.1) / x.shape[0]).sqrt()
            assert priors[(index, kind)].shape == (shape.count(kind),)
            assert torch.allclose(priors[(index, kind)], expected, rtol=1e-4)


def test_prior_obs_runs_its_stage_and_guides_the_candidates(zoo, corpus, tmp_path):
    summary = tiny.prune(zoo["llama-gqa"], corpus, tmp_path / "run", prior="obs", reconstruct="lsq")
    assert summary["iterations"][-1]["sparsity"] >= 0.5
    run = tmp_path / "run"
    assert len(list((run / "saliency").glob("*/saliency.parquet"))) == len(summary["iterations"])
    priors = pl.read_parquet(str(run / "priors/*/priors.parquet"))
    assert priors["obs"].is_not_null().all() and (priors["obs"] > 0).all()
    candidates = pl.read_parquet(str(run / "masks/*/candidates.parquet"))
    joined = candidates.join(priors, on=["iteration", "layer", "kind", "unit"])
    assert joined.height == candidates.height and joined["prior"].to_list() == joined["obs"].to_list()
    # the candidates of each (layer, kind) are its units of lowest repair-aware prior
    for (it, layer, kind), group in priors.group_by("iteration", "layer", "kind"):
        chosen = joined.filter((pl.col("iteration") == it) & (pl.col("layer") == layer) & (pl.col("kind") == kind))
        others = group.join(chosen, on="unit", how="anti")
        assert chosen.height and (others.is_empty() or chosen["obs"].max() <= others["obs"].min())
