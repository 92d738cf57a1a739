"""Sub-models scored as repaired: the imputation of dropped inputs equals the repair's one-shot
least-squares update of the kept columns, in the maths and through a real model's evaluation."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from bonsai.stages.core.compensation import LayerStatistics, imputation, inverse_rows
from bonsai.stages.core.families import family_for_model_type
from bonsai.stages.core.model_io import load_model
from bonsai.stages.core.nll import row_nll
from bonsai.stages.core.units import CHANNEL, HEAD, layer_shapes, output_projection
from bonsai.stages.evaluate import evaluate_masks

import tiny


def correlated(tokens=400, width=12, out=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g, dtype=torch.float64) @ torch.randn(
        width, width, generator=g, dtype=torch.float64
    )
    return x + 0.5, torch.randn(out, width, generator=g, dtype=torch.float64)


def repaired(x, w, removed, damping, centred=False):
    """The repair's closed form for one projection: W_K' = W_K + W_P G_PK (G_KK + lambda I)^-1
    (centred: on the covariance, with the intercept keeping the output's mean), applied to x."""
    kept = [c for c in range(x.shape[1]) if c not in removed]
    mu = x.mean(0) if centred else torch.zeros(x.shape[1], dtype=x.dtype)
    xc = x - mu
    g = xc.T @ xc
    lam = damping * g.diagonal().mean()  # as the compensate stage damps: the whole G's mean diagonal
    gkk = g[kept][:, kept] + lam * torch.eye(len(kept), dtype=x.dtype)
    new = w[:, kept] + w[:, removed] @ g[removed][:, kept] @ torch.linalg.inv(gkk)
    bias = w @ mu - new @ mu[kept]
    return x[:, kept] @ new.T + bias


@pytest.mark.parametrize("width", [1, 3])
@pytest.mark.parametrize("centred", [False, True])
def test_imputing_dropped_inputs_is_the_repairs_update_of_the_kept_columns(width, centred):
    x, w = correlated()
    units = torch.tensor([0, 2, 3])  # a projection's candidates (of 12 // width units)
    columns = (units.unsqueeze(1) * width + torch.arange(width)).reshape(-1)
    mu = x.mean(0)
    xc = x - mu if centred else x
    stats = LayerStatistics(units, width, inverse_rows(xc.T @ xc, 0.1, columns), mu if centred else None)
    dropped = torch.tensor([True, False, True])  # units 0 and 3 go, 2 stays
    imp = imputation(stats, dropped, torch.float64)
    removed = stats.columns(torch.tensor([0, 3])).tolist()
    masked = x.clone()
    masked[:, removed] = 0
    imp.apply(masked)
    assert torch.allclose(masked @ w.T, repaired(x, w, removed, 0.1, centred), rtol=1e-7, atol=1e-9)
    assert imputation(stats, torch.zeros(3, dtype=torch.bool), torch.float64) is None  # nothing dropped


def test_mean_imputation_is_flaps_bias_compensation():
    x, w = correlated()
    stats = LayerStatistics(torch.tensor([1, 4]), 1, None, x.mean(0))
    masked = x.clone()
    masked[:, 4] = 0
    imputation(stats, torch.tensor([False, True]), torch.float64).apply(masked)
    expected = x @ w.T - torch.outer(x[:, 4] - x[:, 4].mean(), w[:, 4])  # b += W_P mean(x_P)
    assert torch.allclose(masked @ w.T, expected, rtol=1e-10)


def _gram_rows(model, family, windows, candidates, damping):
    """{(layer, kind): LayerStatistics} from the whole model's inputs, by hooks."""
    seen = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for kind in (HEAD, CHANNEL):
            module = output_projection(layer, family, kind)
            hooks.append(
                module.register_forward_pre_hook(
                    lambda m, a, k=(i, kind): seen.setdefault(k, []).append(a[0].reshape(-1, a[0].shape[-1]))
                )
            )
    with torch.no_grad():
        model(input_ids=windows)
    for h in hooks:
        h.remove()
    out = {}
    for (i, kind), units in candidates.items():
        shape = layer_shapes(model, family)[i]
        x = torch.cat(seen[(i, kind)]).double()
        width = shape.per_group * shape.head_dim if kind == HEAD else 1
        units = torch.tensor(units)
        columns = (units.unsqueeze(1) * width + torch.arange(width)).reshape(-1)
        out[(i, kind)] = LayerStatistics(units, width, inverse_rows(x.T @ x, damping, columns), None)
    return out


def test_a_compensated_evaluation_scores_the_sub_model_with_repaired_weights(zoo, monkeypatch):
    model = load_model(zoo["llama-gqa"], torch.float32, torch.device("cpu"))
    family = family_for_model_type(model.config.model_type)
    g = torch.Generator().manual_seed(0)
    fit = torch.randint(0, model.config.vocab_size, (8, 16), generator=g)
    scored = torch.randint(0, model.config.vocab_size, (3, 16), generator=g)
    candidates = {(0, HEAD): [1], (1, CHANNEL): [2, 5, 7, 9], (2, CHANNEL): [0, 3]}
    stats = _gram_rows(model, family, fit, candidates, damping=0.1)
    rows = [(layer, kind, position) for (layer, kind), units in candidates.items() for position in units]
    cands = pl.DataFrame(rows, schema=["layer", "kind", "position"], orient="row")
    keep = np.array([[False, True, False, True, False, False, True], [True] * 7])  # sub-model 0 drops 4 units
    monkeypatch.setattr("bonsai.stages.evaluate.compensate_stage.read", lambda artifact, widths: stats)
    result = evaluate_masks(model, family, scored, cands, keep, 2, torch.device("cpu"), compensation=object())
    # the same sub-model with each changed projection's weights replaced by the repair's closed form
    seen = {}
    hooks = [
        output_projection(model.model.layers[i], family, k).register_forward_pre_hook(
            lambda m, a, key=(i, k): seen.setdefault(key, []).append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for i, k in candidates
    ]
    with torch.no_grad():
        model(input_ids=fit)
    for h in hooks:
        h.remove()
    dropped = {key: [u for u in units if not keep[0, rows.index((*key, u))]] for key, units in candidates.items()}
    with torch.no_grad():
        for (i, kind), units in dropped.items():
            module = output_projection(model.model.layers[i], family, kind)
            width = stats[(i, kind)].width
            removed = [u * width + c for u in units for c in range(width)]
            x = torch.cat(seen[(i, kind)]).double()
            kept = [c for c in range(x.shape[1]) if c not in removed]
            g_ = x.T @ x
            lam = 0.1 * g_.diagonal().mean()
            w = module.weight.double()
            new = w[:, kept] + w[:, removed] @ g_[removed][:, kept] @ torch.linalg.inv(
                g_[kept][:, kept] + lam * torch.eye(len(kept), dtype=torch.float64)
            )
            module.weight[:, kept] = new.float()
            module.weight[:, removed] = 0
        expected = float(row_nll(model, scored).sum())
    assert result["nll"][0] == pytest.approx(expected, rel=1e-4)
    assert result["nll"][1] != pytest.approx(expected, rel=1e-4)  # the full model: nothing imputed


def test_sub_model_repair_runs_its_stage_once_per_iteration(zoo, corpus, tmp_path):
    summary = tiny.prune(zoo["llama-gqa"], corpus, tmp_path / "run", sub_model_repair="lsq", reconstruct="lsq")
    assert summary["iterations"][-1]["sparsity"] >= 0.5
    run = tmp_path / "run"
    assert len(list((run / "compensate").glob("*/statistics.safetensors"))) == len(summary["iterations"])
    tiny.prune(zoo["llama-gqa"], corpus, tmp_path / "plain", reconstruct="lsq")

    def first_iteration(root, stage, file):
        table = pl.read_parquet(str(root / stage / "*" / file))
        return table.filter(pl.col("iteration") == 0).sort(*(c for c in ("mask", "candidate") if c in table.columns))

    # iteration 0 samples the same sub-models of the same model; only how they are scored differs
    assert first_iteration(run, "masks", "masks.parquet").equals(
        first_iteration(tmp_path / "plain", "masks", "masks.parquet")
    )
    scored = first_iteration(run, "evaluate", "utilities.parquet")
    zeroed = first_iteration(tmp_path / "plain", "evaluate", "utilities.parquet")
    assert scored["mask"].equals(zeroed["mask"]) and (scored["utility"] - zeroed["utility"]).abs().min() > 0


def test_sub_model_repair_needs_a_repair():
    with pytest.raises(Exception, match="--sub-model-repair lsq"):
        tiny.options(sub_model_repair="lsq", reconstruct="none")
