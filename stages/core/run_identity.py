"""Which run.json this version continues, and as what: the options older versions recorded,
upgraded to the values under which those runs did what they did.

A run's identity is its options; resuming compares them with the command's.  Options added
since a run was made are filled in with the value that reproduces it, so a run made before an
option existed continues as it was begun; runs whose stages this version would compute
differently are refused in one line naming the version that finishes them.
"""

from __future__ import annotations

from bonsai.stages.core.errors import UserError
from bonsai.stages.core.options import PruneOptions, fields_of, flag

RUN_FORMAT = 2  # of run.json; format 1 called the paper's estimator "regression"
# options bonsai 0.1.0 recorded that 0.2.0 removed (adaptive sampling's)
MADE_BY_0_1 = ("sampling", "round_size", "settle_tolerance", "settle_regret")
# options 0.2.0 recorded that 0.3.0 removed, with the value under which a run did what this
# version does (--reconstruct-tokens-per-input: --reconstruct-samples buys the same, BENCHMARKS.md)
REMOVED_IN_0_3 = {"reconstruct_tokens_per_input": 0.0}
# options added since 0.2.0, with the value under which a run recorded without them did what it did
ADDED_IN = {"rival": "none", "unit_order": "estimator", "reconstruct_publish": "chain"}  # 0.5.0, 0.7.0, 0.10.0


def recorded_identity(recorded: dict) -> dict:
    """A run.json's identity, once it is known to be one this version continues.  A run made
    before 0.2.0 (run.json format 1, 0.1.0's sampling options, or options it did not have) is
    refused in one line naming that version: its priors and masks were computed or keyed
    differently, so resuming it here would silently redo its evaluations, the run's whole cost."""
    identity = dict(recorded.get("identity", {}))
    config = dict(identity.get("config", {}))
    for name, same in REMOVED_IN_0_3.items():
        if name in config and config.pop(name) != same:
            raise UserError(
                f"this run was made by bonsai 0.2.0 with {flag(name)}, which 0.3.0 removed: finish it with bonsai "
                "0.2.0 (git checkout d8cbe03), or start a new --out"
            )
    config = {**ADDED_IN, **config}
    if "reconstruct_damping" in config:  # 0.9.0's: until then the last repair was damped like the others
        config.setdefault("reconstruct_final_damping", config["reconstruct_damping"])
    if "reconstruct_final_damping" in config:  # 0.11.0's: until then the published repair was the last one's
        config.setdefault("reconstruct_publish_damping", config["reconstruct_final_damping"])
        config.setdefault("reconstruct_publish_samples", config.get("reconstruct_samples"))
    old = [name for name in MADE_BY_0_1 if name in config]
    missing = [flag(f.name) for f in fields_of(PruneOptions) if f.metadata["identity"] and f.name not in config]
    if recorded.get("format", 1) < RUN_FORMAT or old or missing:
        if config.get("sampling") == "adaptive":
            how = "adaptive sampling, which 0.2.0 removed"
        else:
            how = "it records 0.1.0's sampling options" if old else f"it has no {', '.join(missing[:3])}"
        raise UserError(
            f"this run was made by bonsai 0.1.0 or earlier ({how}); this version would redo its evaluations: "
            "finish it with bonsai 0.1.0 (git checkout 160127d), or start a new --out"
        )
    return {**identity, "config": config}
