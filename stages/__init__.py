"""The pipeline's stages, and what they are built from.

The modules at this level are the DAG's stages and nothing else.  Each has ``VERSION``
(bumped when its output would change), a keyword-only frozen config dataclass, and
``run(inputs..., cfg, store[, device]) -> ArtifactRef``; none imports Prefect:

    calibration  text source -> token windows
    saliency     current model -> the repair-aware prior (--prior obs)
    priors       current model -> per-unit wanda / activation / fluctuation / flap priors
    masks        priors -> candidates and sampled sub-models (with complements)
    compensate   current model -> what scoring sub-models as repaired needs (--sub-model-repair lsq)
    evaluate     one shard of sub-models -> utilities
    importance   utilities (or priors) -> importance per candidate
    select       importance -> cumulative keep-state
    reconstruct  keep-state -> least-squares repair of the kept output-projection columns
    export       keep-state + repairs -> sliced model directory (and ``publish`` into RUN/model)
    gguf         model directory -> a GGUF file that stock llama.cpp runs
    logits       parent -> cached top-k teacher log-probabilities, one shard of windows
    adapt        pruned model + teacher cache -> LoRA / full fine-tune, merged model
    perplexity   model + text -> held-out perplexity
    harness      model -> lm-evaluation-harness task scores
    tiny_parent  Python's own docs -> a small trained LLaMA (demo, benchmarks)

core/     what stages are built from: the options and the prune plan, model families, taps
          (virtual masks and activation statistics), slicing, units, the regressions (the
          paper's and the group-scale one), the least-squares repair, distillation, model
          loading, model directories and model sources (GGUF, hub), text sources, devices, seeds.
reports/  read-only views of runs and models: status, audit, evaluation report, speed,
          parent-vs-pruned comparison, and the markdown / terminal / plot helpers.
"""
