"""Would pruning query heads within a KV group pay on SmolLM2?  What removal costs, per unit.

    python benchmarks/query_heads.py [--windows 8]

Under GQA the pruner removes heads by whole key/value group.  Query heads within a group can be
removed exactly only as many from every group of a layer (the KV heads are shared), so the
finest such unit is a set of one query head from each group.  This measures, per decoder layer
of SmolLM2-135M-Instruct (float32, windows of 128 tokens of the calibration text), the loss
increase of removing, alone (no repair): each single query head, each whole KV group, the set
of each group's cheapest query head, and a block of MLP channels with as many parameters as
that set: the lowest by the Wanda prior (RMS(x_j) * mean |W_down[:, j]|), and the block as deep
in that order as a 20 % run's removal goes, removed on top of the channels below it.  Removing
a head or a channel is exact here by zeroing its columns of the output projection (SmolLM2 has
no biases).  The set of cheapest heads against the marginal block says whether finer head units
would offer the selection a cheaper removal than the channels it takes.
"""

from __future__ import annotations

import argparse
import json

import common
import real_model
import torch

from bonsai.stages.calibration import cut_windows
from bonsai.stages.core.model_dirs import inspect_model_dir
from bonsai.stages.core.model_io import load_model, load_tokenizer
from bonsai.stages.core.model_source import resolve as resolve_model
from bonsai.stages.core.nll import mean_nll
from bonsai.stages.core.taps import Taps, unit_priors
from bonsai.stages.core.units import CHANNEL
from bonsai.stages.reports.render import pyplot, save

OUT = common.RESULTS / "query-heads"
# the MLP channels a layer loses on average when the MLP alone gives 20 % of attention+MLP
# parameters (SmolLM2: attention is 25 % of them)
MARGIN = 0.2 / 0.75


def loss(model, windows) -> float:
    return mean_nll(model, windows, 8, torch.device("cpu"))[0]


@torch.no_grad()
def zeroed(model, windows, weight: torch.Tensor, columns: torch.Tensor) -> float:
    """The loss with ``columns`` of ``weight`` zeroed, then the weight restored."""
    kept = weight[:, columns].clone()
    weight[:, columns] = 0
    try:
        return loss(model, windows)
    finally:
        weight[:, columns] = kept


def channel_prior(model, windows) -> list[torch.Tensor]:
    """Per layer, the pruner's own Wanda prior of every MLP channel (core/taps.py)."""
    family = inspect_model_dir(model.name_or_path).family
    with Taps(model, family, stat_groups=1) as taps:
        loss(model, windows)
    values = unit_priors(taps)
    return [values[(index, CHANNEL)]["wanda"] for index in range(len(taps.shapes))]


def load(windows_count: int, fresh: bool = False) -> tuple[torch.nn.Module, torch.Tensor]:
    """SmolLM2 in float32 and the first ``windows_count`` windows of 128 calibration tokens
    (with ``fresh``, the next ``windows_count``: a check on windows no choice was made on)."""
    parent = resolve_model(real_model.model(), dtype=lambda: "float32").path
    model = load_model(parent, torch.float32, torch.device("cpu"))
    train, _ = common.texts()
    count = 2 * windows_count if fresh else windows_count
    windows, _ = cut_windows(load_tokenizer(parent), train, 128, count, joined=True)
    return model, torch.tensor(windows[count - windows_count :], dtype=torch.long)


def measure(windows_count: int) -> dict:
    model, windows = load(windows_count)
    config = model.config
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    head_dim, per_group = config.hidden_size // heads, heads // groups
    hidden = config.hidden_size
    base = loss(model, windows)
    priors = channel_prior(model, windows)
    head_params = 2 * hidden * head_dim  # q_proj rows and o_proj columns
    channel_params = 3 * hidden  # gate and up rows, down column
    rows = []
    for index, layer in enumerate(model.model.layers):
        o_proj, down = layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight

        def cols(hs):
            return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in hs])

        single = [zeroed(model, windows, o_proj, cols([h])) - base for h in range(heads)]
        group = [
            zeroed(model, windows, o_proj, cols(range(g * per_group, (g + 1) * per_group))) - base
            for g in range(groups)
        ]
        cheapest = [min(range(g * per_group, (g + 1) * per_group), key=lambda h: single[h]) for g in range(groups)]
        head_set = zeroed(model, windows, o_proj, cols(cheapest)) - base
        set_params = groups * head_params
        block = round(set_params / channel_params)
        channels = torch.argsort(priors[index])[:block]
        channel_block = zeroed(model, windows, down, channels) - base
        rows.append(
            {
                "layer": index,
                "single_heads": single,
                "kv_groups": group,
                "cheapest_heads": cheapest,
                "head_set": head_set,
                "head_set_params": set_params,
                "kv_group_params": per_group * head_params + 2 * hidden * head_dim,
                "channels": block,
                "channel_block": channel_block,
                "channel_block_params": block * channel_params,
            }
        )
        print(f"layer {index}: head set {head_set:+.4f}, channel block {channel_block:+.4f}", flush=True)
    return {"windows": windows_count, "tokens": int(windows.numel()), "base_nll": base, "layers": rows}


def add_margins(result: dict, fresh: bool = False) -> None:
    """Each layer's channel block again, at the margin of a 20 % run: its loss increase when
    removed on top of the lowest-prior channels below it (MARGIN of the layer's channels in
    all), as the regression's 20 % runs, which remove only MLP channels, go that deep.  With
    ``fresh``, that and the head set chosen on the first windows, both on the next windows:
    the head set's own figure is biased low, its heads being each group's lowest of three
    measurements on the same tokens (the channels' order comes from those windows' activations:
    a statistic, not a choice by loss)."""
    model, windows = load(result["windows"], fresh)
    priors = channel_prior(model, windows)
    base = loss(model, windows)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    suffix = "_fresh" if fresh else ""
    for row, layer, prior in zip(result["layers"], model.model.layers, priors):
        down = layer.mlp.down_proj.weight
        depth = round(MARGIN * down.shape[1])
        order = torch.argsort(prior)
        below = zeroed(model, windows, down, order[: depth - row["channels"]])
        row["marginal_block" + suffix] = zeroed(model, windows, down, order[:depth]) - below
        row["marginal_depth"] = depth
        if fresh:
            heads = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in row["cheapest_heads"]])
            row["head_set_fresh"] = zeroed(model, windows, layer.self_attn.o_proj.weight, heads) - base
        print(f"layer {row['layer']}: marginal channel block {row['marginal_block' + suffix]:+.4f}", flush=True)


def report(result: dict) -> None:
    rows = result["layers"]
    table = []
    for r in rows:
        table.append(
            [
                r["layer"],
                f"{min(r['single_heads']):+.4f} / {max(r['single_heads']):+.4f}",
                f"{min(r['kv_groups']):+.4f}",
                f"{r['head_set']:+.4f}",
                f"{r['channel_block']:+.4f}",
                f"{r['marginal_block']:+.4f}",
                f"{r['head_set_fresh']:+.4f} / {r['marginal_block_fresh']:+.4f}",
            ]
        )
    print(
        common.markdown(
            [
                "layer",
                "one query head (min / max)",
                "cheapest KV group",
                "cheapest head of each group",
                f"MLP channels ({rows[0]['channels']}, lowest Wanda)",
                f"the same, on top of {rows[0]['marginal_depth'] - rows[0]['channels']} below them",
                "head set / channels at the margin, on the next windows",
            ],
            table,
        )
    )
    first = sum(r["head_set"] < r["channel_block"] for r in rows)
    margin = sum(r["head_set"] < r["marginal_block"] for r in rows)
    fresh = sum(r["head_set_fresh"] < r["marginal_block_fresh"] for r in rows)
    print(
        f"\nlayers where the head set costs less than as many parameters of MLP channels: {first} of {len(rows)} "
        f"(the lowest-prior channels), {margin} of {len(rows)} (the channels at a 20 % run's margin), "
        f"{fresh} of {len(rows)} (at the margin, on the next windows)"
    )
    head_sum = sum(r["head_set_fresh"] for r in rows)
    channel_sum = sum(r["marginal_block_fresh"] for r in rows)
    print(f"summed over layers, on the next windows: head sets {head_sum:+.4f}, channel blocks {channel_sum:+.4f}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    layers = torch.arange(len(rows))
    per_million = {
        "each KV group's cheapest query head (chosen on the first windows)": [
            r["head_set_fresh"] / r["head_set_params"] * 1e6 for r in rows
        ],
        "as many parameters of MLP channels, at a 20 % run's margin": [
            r["marginal_block_fresh"] / r["channel_block_params"] * 1e6 for r in rows
        ],
    }
    for shift, (name, values) in zip((-0.2, 0.2), per_million.items()):
        ax.bar(layers + shift, values, width=0.4, label=name)
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("loss increase per million\nparameters removed (nats)")
    ax.set_title(f"SmolLM2-135M: one removal alone, no repair, on {result['tokens']:,} fresh tokens")
    ax.legend(fontsize=8, loc="upper right")
    save(fig, common.PLOTS / "query-heads-smollm2.png")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=8, help="calibration windows of 128 tokens scored")
    args = parser.parse_args()
    common.setup_logging()
    OUT.mkdir(parents=True, exist_ok=True)
    file = OUT / f"windows{args.windows}.json"
    result = json.loads(file.read_text()) if file.is_file() else measure(args.windows)
    file.write_text(json.dumps(result, indent=1))
    for fresh, key in ((False, "marginal_block"), (True, "head_set_fresh")):
        if key not in result["layers"][0]:
            add_margins(result, fresh)
            file.write_text(json.dumps(result, indent=1))
    report(result)


if __name__ == "__main__":
    main()
