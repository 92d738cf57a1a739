"""Pipeline stages: plain functions over the artifact store, no Prefect, no global state
beyond the process's model cache (model_io.shared_models).

Each stage module has ``VERSION`` (bumped when its output would change), a frozen config
dataclass, and ``run(inputs..., cfg, store[, device]) -> ArtifactRef``:

    calibration  text source -> token windows
    priors       current model -> per-unit wanda / activation / fluctuation priors
    masks        priors -> candidates and sampled sub-models (with complements)
    evaluate     one shard of sub-models -> utilities
    importance   utilities (or priors) -> importance per candidate
    select       importance -> cumulative keep-state
    export       keep-state -> sliced model directory
"""
