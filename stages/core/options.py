"""Every option of every command, in one place.

Each command's options are one keyword-only frozen dataclass; a field's metadata carries its
help text, its allowed values and whether it belongs to the run's identity.  The command
line (flows/cli.py builds every command's flags from these classes), YAML presets and run
files, and the Prefect flows' parameters all go through them, so a name, a default or a
meaning is written exactly once.  Importing this module imports neither torch nor Prefect.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bonsai.stages.core.errors import UserError
from bonsai.stages.core.plan import ESTIMATORS

# obs: the error a unit's removal leaves after the repair (stages/saliency.py); flap: FLAP's
# standardised score, for --estimator flap
PRIORS = ("wanda", "activation", "fluctuation", "obs", "flap")
DTYPES = ("auto", "float32", "float16", "bfloat16")
PENALTIES = ("l1", "l2")
RECONSTRUCT = ("lsq", "lsq-final", "none")
# what the repair fits: the kept columns (weights), those and an output bias (least squares with
# an intercept, so a removed unit's mean output moves into the bias), or the bias alone (FLAP's
# bias compensation, b += W_P mean(x_P), the kept columns unchanged)
RECONSTRUCT_FITS = ("weights", "weights+bias", "bias")
# fit tokens per kept column a projection needs for --reconstruct-final-damping (BENCHMARKS.md: 4.7 too few, 9.3 enough)
FINAL_TOKENS_PER_COLUMN = 8
# which repair the published model carries, by name the aim of one repair of the parent for the whole
# removal (core/repair_fit.py AIMS: the parent's residual stream, or the projection's own output on the
# repaired layers' input), or None: the iterations' chain is published (flows/prune.py)
PUBLISH_AIMS = {"parent-stream": "stream", "parent": "model", "chain": None}
RECONSTRUCT_PUBLISH = tuple(PUBLISH_AIMS)
# how a sampled sub-model's dropped units are scored: zeroed (the paper's), or with their inputs
# imputed as the repair's one-shot least-squares update would (stages/compensate.py)
SUB_MODEL_REPAIRS = ("none", "lsq")
# a second ranking beside the estimator's each iteration, repaired the same way, the repaired
# model with the lower held-out loss kept (stages/arbitrate.py); none: the estimator's alone; auto
# (settled when the options are made): flap for a regression repaired every iteration whose chain
# is published, else none (under the repair from the parent it bought 0.06 at 20 % on SmolLM2
# and 2.1 on the tiny parent at 50 % for 1.4x the run's time; a baseline is measured alone)
RIVALS = ("auto", "none", "flap")
# which units of a layer the estimator's removal takes, once it has chosen how many: its own, or
# the lowest of FLAP's fluctuation of the current model (stages/select.py); auto: flap for a
# regression repaired every iteration or beside the flap rival, the estimator's otherwise
UNIT_ORDERS = ("auto", "estimator", "flap")

# The evaluation budget per iteration when the command line leaves it out, per kind of device:
# on a GPU the paper's setting (not measured here); on a CPU the knee of BENCHMARKS.md's budget
# curve (SmolLM2 at 20 %, three seeds): 256 sub-models were no better, 32 broke the selection in
# two seeds of three, and 16 windows bought 0.24 perplexity for 1.6x the time.  The repair's
# windows: on a GPU 128 of 2,048 tokens; a CPU's windows are 16x shorter, and 512 of them (the
# repair's passes in bfloat16; a quarter of a GPU's tokens) beat 256 with 0.8.0's rival and
# unit order on SmolLM2 and Python's documentation: on every seed at 20 %, on the mean at 30 %.
# The published repair's: no choice rests on it, so on a CPU 1,024 windows (2x the iterations')
# with less damping; 512 saved a 20 % SmolLM2 run a fifth of its time but cost the tiny parent at
# 50 % 2.4 (BENCHMARKS.md, "0.13.0"); on a GPU the same tokens, not measured.
BUDGETS: dict[str, dict[str, int]] = {
    "cpu": {"masks_per_iter": 128, "calib_samples": 8, "seq_len": 128, "reconstruct_samples": 512,
            "reconstruct_publish_samples": 1024},
    "cuda": {"masks_per_iter": 200, "calib_samples": 32, "seq_len": 2048, "reconstruct_samples": 128,
             "reconstruct_publish_samples": 64},
}  # fmt: skip


def _per_device(name: str) -> str:
    return "per device: " + ", ".join(f"{b[name]} on {'a CPU' if k == 'cpu' else 'a GPU'}" for k, b in BUDGETS.items())


# Regularisation grids searched by cross-validation (Appendix A.1 searches a grid too).
# Utilities are standardised before fitting, so the same grid serves every model size.
DEFAULT_ALPHAS = {"l1": (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1), "l2": (0.1, 1.0, 10.0, 100.0, 1000.0)}


def option(
    default: Any,
    help: str,
    choices: tuple | None = None,
    identity: bool = True,
    path: bool = False,
):
    """A field of an options class.  ``identity``: a run refuses to continue under another
    value; ``path``: a file or folder, relative to the run file when it comes from one."""
    return field(default=default, metadata={"help": help, "choices": choices, "identity": identity, "path": path})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class Options:
    """What the three options classes share: choice checks, identity, field lookup."""

    def _check_choices(self) -> None:
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices is not None and value is not None:
                _check(value in choices, f"{flag(f.name)} must be one of {', '.join(choices)}; got {value!r}")

    def _check_at_least(self, minimum: int, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            _check(value is None or value >= minimum, f"{flag(name)} must be at least {minimum}")

    def identity(self) -> dict[str, Any]:
        """The fields that change results: a run directory refuses to continue if these differ."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("identity", True)}


@dataclass(frozen=True, kw_only=True)
class PruneOptions(Options):
    sparsity: float = option(0.5, "target fraction of attention+MLP parameters to remove, in (0, 1)")
    masks_per_iter: int | None = option(
        None, f"sub-models evaluated per iteration (pairs of mask and complement; {_per_device('masks_per_iter')})"
    )
    prune_frac: float = option(0.05, "p_iter: fraction of parameters removed per iteration")
    calib_samples: int | None = option(
        None, f"calibration windows per iteration (each sub-model is scored on all; {_per_device('calib_samples')})"
    )
    seq_len: int | None = option(None, f"tokens per calibration window ({_per_device('seq_len')})")
    prior: str = option("wanda", "prior that guides sampling", PRIORS)
    estimator: str = option(
        "regression",
        "how importances are estimated (the paper's Figure 2 ablations; random is a baseline)",
        tuple(ESTIMATORS),
    )
    seed: int = option(0, "seed of every random choice (windows, masks, CV folds)")
    device: str = option("auto", "torch device: auto, cpu, cuda, cuda:N", identity=False)
    dtype: str = option(
        "auto",
        "dtype of sub-model evaluation (auto: bfloat16 on a GPU or a CPU with native bf16, else float32)",
        DTYPES,
    )
    batch_size: int = option(
        8, "rows (mask x window) per forward pass; several masks share a batch when it exceeds calib-samples"
    )
    shard_size: int = option(20, "sub-models per evaluation shard: the most work a kill can lose")
    calib_pool: int = option(1024, "windows cut from the start of SOURCE, from which each iteration draws")
    penalty: str = option("l1", "paper-regression's penalty (the paper uses l1; l2 for Phi-2)", PENALTIES)
    alphas: tuple[float, ...] | None = option(
        None, "paper-regression's penalty strengths to cross-validate (default: a grid per penalty)"
    )
    cv_folds: int = option(5, "folds of held-out mask pairs that choose the regressions' penalties")
    reconstruct: str = option(
        "lsq",
        "repair the kept columns of each layer's output projections by least squares after every "
        "iteration (lsq), once after the last (lsq-final), or not at all (none: the paper's method)",
        RECONSTRUCT,
    )
    reconstruct_samples: int | None = option(
        None,
        "most calibration windows the repair is fitted and checked on (never an iteration's evaluation windows; "
        f"{_per_device('reconstruct_samples')})",
    )
    reconstruct_fit: str = option(
        "weights",
        "what the repair fits: the kept columns (weights), those and each projection's output bias "
        "(weights+bias: least squares with an intercept, so a removed unit's mean output is kept), or the bias "
        "alone (bias: FLAP's bias compensation); a bias where the parent had none is written into the export",
        RECONSTRUCT_FITS,
    )
    reconstruct_damping: float = option(
        0.1, "shrinks the repaired weights toward their current values: a multiple of G's mean diagonal"
    )
    reconstruct_final_damping: float = option(
        0.01,
        "--reconstruct-damping of the last iteration's repair (lsq-final's only one) in each projection with at "
        f"least {FINAL_TOKENS_PER_COLUMN} fit tokens per kept column: no later iteration is chosen on what it leaves",
    )
    reconstruct_publish: str = option(
        "parent-stream",
        "the repair the published model carries: the chain of the iterations' repairs (chain), each fitted to the "
        "model before its removal, or one repair of the parent for the whole removal after the last iteration, "
        "configured as the last repair but for its windows and damping, each layer's kept columns fitted to the "
        "parent's residual stream after their sum (parent-stream; parent for the Gemma family, whose 2 and 3 "
        "normalise the sums, and for a --reconstruct-fit with a bias) or to the projection's own output on the "
        "repaired layers' input (parent); from the parent, the last iteration repairs only where --rival judges it",
        RECONSTRUCT_PUBLISH,
    )
    reconstruct_publish_samples: int | None = option(
        None,
        "windows the published repair (but for --reconstruct-publish chain) is fitted and checked on, cut from the "
        "start of SOURCE as the pool is (a pool of its own where --calib-pool holds fewer), as many as SOURCE holds "
        f"({_per_device('reconstruct_publish_samples')}; chain: --reconstruct-samples, the last repair's)",
    )
    reconstruct_publish_damping: float = option(
        0.001,
        "--reconstruct-damping of the published repair where --reconstruct-final-damping would apply "
        "(chain: --reconstruct-final-damping, the last repair's)",
    )
    sub_model_repair: str = option(
        "none",
        "how each sampled sub-model is scored: with its dropped units zeroed (none, the paper's), or as the "
        "repair would leave it (lsq: their inputs imputed from the kept ones by the repair's least squares, "
        "from the repair's windows), so the regression measures what a removal costs after repair",
        SUB_MODEL_REPAIRS,
    )
    rival: str = option(
        "auto",
        "a second ranking formed each iteration beside the estimator's (flap: FLAP's standardised fluctuation "
        "of the current model, ranked globally) and repaired the same way; of the two repaired models the one "
        "with the lower loss on calibration windows that neither the evaluation nor the repairs were fitted on "
        "goes on (an arbitrate stage per iteration); auto: flap with a regression estimator, --reconstruct lsq "
        "and --reconstruct-publish chain, else none",
        RIVALS,
    )
    unit_order: str = option(
        "auto",
        "which units of a layer the estimator's removal takes once it has chosen how many: its own (estimator), "
        "or the lowest of FLAP's fluctuation of the current model (flap, the statistics --rival flap takes); "
        "auto: flap with a regression estimator and --reconstruct lsq or with --rival flap, else estimator",
        UNIT_ORDERS,
    )

    def __post_init__(self) -> None:
        _check(0.0 < self.sparsity < 1.0, f"--sparsity must be in (0, 1), got {self.sparsity}")
        _check(0.0 < self.prune_frac <= 0.5, f"--prune-frac must be in (0, 0.5], got {self.prune_frac}")
        _check(self.prune_frac <= self.sparsity, "--prune-frac must not exceed --sparsity")
        self._check_at_least(1, "masks_per_iter", "calib_samples", "seq_len", "batch_size", "shard_size", "calib_pool")
        self._check_choices()
        regressed = ESTIMATORS[self.estimator].regression and self.reconstruct == "lsq"
        if self.rival == "auto":  # run.json records what it settled on
            object.__setattr__(self, "rival", "flap" if regressed and not self.publishes_from_parent else "none")
        if self.unit_order == "auto":  # likewise recorded as settled
            object.__setattr__(self, "unit_order", "flap" if regressed or self.rival == "flap" else "estimator")
        if not self.publishes_from_parent:  # the published repair, if any, is the last iteration's
            object.__setattr__(self, "reconstruct_publish_samples", self.reconstruct_samples)
            object.__setattr__(self, "reconstruct_publish_damping", self.reconstruct_final_damping)
        _check(self.cv_folds >= 2, "--cv-folds must be at least 2")
        # a budget left out (None) is the device's, checked when for_device fills it in
        masks, windows = self.masks_per_iter, self.calib_samples
        _check(
            masks is None or masks >= 2 * self.cv_folds or not ESTIMATORS[self.estimator].regression,
            f"--masks-per-iter must be at least 2 x cv-folds ({2 * self.cv_folds}) for the regression",
        )
        _check(windows is None or self.calib_pool >= windows, "--calib-pool must be at least --calib-samples")
        _check(
            (self.estimator == "flap") == (self.prior == "flap"),
            "--estimator flap and --prior flap (FLAP's standardised fluctuation, which can be negative, so it "
            "cannot guide sampling) go together (configs/flap.yaml)",
        )
        for name in ("reconstruct_damping", "reconstruct_final_damping", "reconstruct_publish_damping"):
            _check(getattr(self, name) >= 0, f"{flag(name)} must not be negative, got {getattr(self, name)}")
        for name in ("reconstruct_samples", "reconstruct_publish_samples"):
            _check(
                getattr(self, name) is None or getattr(self, name) >= 2,
                f"{flag(name)} must be at least 2 (windows to fit and to check)",
            )
        _check(
            windows is None
            or self.reconstruct_samples is None
            or (self.reconstruct == "none" and self.prior != "obs" and self.sub_model_repair == "none")
            or self.calib_pool >= windows + self.reconstruct_samples,
            f"--calib-pool ({self.calib_pool}) must hold --calib-samples and --reconstruct-samples "
            f"({windows} + {self.reconstruct_samples}) windows",
        )
        _check(
            self.sub_model_repair == "none" or self.reconstruct != "none",
            "--sub-model-repair lsq scores sub-models as the repair leaves them: it needs --reconstruct lsq "
            "or lsq-final",
        )
        _check(
            self.rival == "none" or self.reconstruct == "lsq",
            f"--rival {self.rival} compares the two removals as repaired: it needs --reconstruct lsq",
        )
        _check(
            self.rival == "none" or self.estimator != self.rival,
            f"--rival {self.rival} would repeat --estimator {self.estimator}: choose another estimator or --rival none",
        )
        if self.alphas is not None:
            object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
            _check(len(self.alphas) > 0 and all(a >= 0 for a in self.alphas), "--alphas must be non-negative")

    @property
    def publishes_from_parent(self) -> bool:
        """Whether one repair of the parent, after the last iteration, is what is published."""
        return self.reconstruct != "none" and PUBLISH_AIMS[self.reconstruct_publish] is not None

    def for_device(self, kind: str) -> PruneOptions:
        """The options with the budget left out filled in for a device of ``kind`` ("cpu", or
        "cuda" for any accelerator), checked again with the values it will run with."""
        budget = BUDGETS["cpu" if kind == "cpu" else "cuda"]
        return dataclasses.replace(self, **{k: v for k, v in budget.items() if getattr(self, k) is None})

    @property
    def alpha_grid(self) -> tuple[float, ...]:
        return self.alphas if self.alphas is not None else DEFAULT_ALPHAS[self.penalty]


@dataclass(frozen=True, kw_only=True)
class AdaptOptions(Options):
    data: str | None = option(None, "adaptation text SOURCE (default: the run's --data)", path=True)
    steps: int = option(1000, "optimizer steps")
    lora_rank: int = option(128, "LoRA rank (Table 10: 128)")
    lora_alpha: int = option(512, "LoRA alpha (Table 10: 4 x rank)")
    distill_weight: float = option(0.01, "lambda of the distillation term (Table 10: 0.01); 0 trains without a teacher")
    top_k: int = option(64, "teacher log-probabilities cached per position")
    lr: float = option(1e-4, "peak learning rate (linear warm-up, cosine decay)")
    full_finetune: bool = option(False, "train every weight instead of LoRA (for models small enough)")
    seq_len: int | None = option(None, "tokens per training sequence (default: the run's --seq-len)")
    sequences: int = option(1024, "sequences cut from SOURCE; the teacher cache covers them all")
    batch_size: int = option(8, "sequences per step")
    checkpoint_every: int = option(100, "steps between checkpoints (what a kill can lose)")
    logits_shard_size: int = option(64, "sequences per teacher-cache shard")
    seed: int = option(0, "seed of the data order and the LoRA initialisation")
    device: str = option("auto", "torch device", identity=False)
    dtype: str = option(
        "auto", "teacher forward dtype and training autocast (auto: float32 on CPU, bfloat16 on GPU)", DTYPES
    )

    def __post_init__(self) -> None:
        self._check_at_least(
            1,
            "steps",
            "lora_rank",
            "lora_alpha",
            "top_k",
            "sequences",
            "batch_size",
            "checkpoint_every",
            "logits_shard_size",
            "seq_len",
        )
        _check(self.lr > 0 and self.distill_weight >= 0, "--lr must be positive and --distill-weight not negative")
        self._check_choices()


DEFAULT_PPL_DATA = "hf:wikitext:wikitext-2-raw-v1:test"
ENGINES = ("torch", "llama.cpp")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")  # core/gguf_export.py writes each


@dataclass(frozen=True, kw_only=True)
class EvalOptions(Options):
    parent: str | None = option(
        None, "parent model: a directory, a .gguf file or a hub id (default: the run's --model)", path=True
    )
    ppl_data: str | None = option(
        None, f"text SOURCE for perplexity (default: {DEFAULT_PPL_DATA} when on disk)", path=True
    )
    seq_len: int | None = option(None, "window length for perplexity (default: min(2048, the model's context))")
    max_windows: int = option(4096, "perplexity scores at most this many windows")
    tasks: tuple[str, ...] = option((), "lm-eval task names, or task YAML files or folders", path=True)
    limit: int | None = option(None, "at most this many examples per task")
    speed: bool = option(False, "measure prefill throughput and decode latency against the parent")
    engine: str = option(
        "torch",
        "what --speed times: the models in torch (transformers), or their GGUF files in llama.cpp "
        "(llama-cpp-python; each model exported to --gguf-type first)",
        ENGINES,
    )
    gguf_type: str = option("q8_0", "the GGUF type --engine llama.cpp times (parent and pruned alike)", GGUF_TYPES)
    batch_size: int = option(8, "rows per forward pass")
    device: str = option("auto", "torch device", identity=False)
    dtype: str = option("auto", "dtype for every model (auto: float32 on CPU, bfloat16 on GPU)", DTYPES)
    out: str | None = option(None, "where results go (default: RUN/evaluation, or eval-<name>)", path=True)

    def __post_init__(self) -> None:
        self._check_choices()
        self._check_at_least(1, "seq_len", "limit", "batch_size", "max_windows")
        object.__setattr__(self, "tasks", tuple(self.tasks))


@dataclass(frozen=True, kw_only=True)
class ExportOptions(Options):
    gguf: bool = option(False, "write RUN/gguf/<model>-<type>.gguf for stock llama.cpp (and for RUN/adapted)")
    type: str = option(
        "q8_0",
        "the GGUF's tensor type: f32, f16, bf16, or quantized q8_0 / q4_0 (q4_0 keeps the embedding at q8_0)",
        GGUF_TYPES,
    )

    def __post_init__(self) -> None:
        self._check_choices()
        _check(self.gguf, "bonsai export writes a GGUF file: give --gguf (the Hugging Face export is RUN/model)")


COMMANDS: dict[str, type[Options]] = {
    "prune": PruneOptions,
    "adapt": AdaptOptions,
    "eval": EvalOptions,
    "export": ExportOptions,
}


def stage_config(cls: type, options: Options, **derived: Any):
    """A stage's config, built one way for every stage: a field named like an option (or like a
    property of the options, such as ``alpha_grid``) takes its value, so a stage that needs an
    option names it and nothing between copies it; the others (the iteration, what the plan
    derives) are given by name and must not shadow an option."""
    names = {f.name for f in dataclasses.fields(cls)}
    options_names = {f.name for f in dataclasses.fields(options)}
    options_names |= {n for n, v in vars(type(options)).items() if isinstance(v, property)}
    shadowing, unknown = sorted(set(derived) & options_names), sorted(set(derived) - names)
    if shadowing or unknown:
        raise TypeError(f"{cls.__name__}: {shadowing or unknown} shadow options or are not fields")
    return cls(**{n: getattr(options, n) for n in names & options_names}, **derived)


# --- reading options from flags, presets and run files ------------------------------------


def fields_of(cls: type[Options]) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


@dataclass(frozen=True)
class FieldKind:
    type: type  # of the value, or of each element of a tuple
    many: bool  # a tuple
    optional: bool  # may be None


def kinds(cls: type[Options]) -> dict[str, FieldKind]:
    """Each field's kind, read from its annotation (so the annotation is the schema)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        optional = False
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            optional, hint = True, args[0]
        many = typing.get_origin(hint) is tuple
        out[name] = FieldKind(typing.get_args(hint)[0] if many else hint, many, optional)
    return out


def coerce(name: str, kind: FieldKind, value: Any) -> Any:
    """A flag's or a YAML file's value as the field's type; a wrong one is one UserError line."""
    try:
        if kind.many:  # a YAML list, flags' words, and "a,b" all work
            items = value if isinstance(value, (list, tuple)) else [value]
            flat = [p for v in items for p in (v.replace(",", " ").split() if isinstance(v, str) else [v])]
            return tuple(_scalar(kind.type, v) for v in flat)
        return _scalar(kind.type, value)
    except (TypeError, ValueError):
        raise UserError(f"{flag(name)}: cannot use {value!r} here") from None


def _scalar(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(value)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return kind(value)


def named(cls: type[Options], layer: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """A layer of option values by field name (dashes or underscores); a name the schema does not
    know is one UserError line saying ``where`` it came from."""
    layer = {str(k).replace("-", "_"): v for k, v in (layer or {}).items()}
    known = kinds(cls)
    unknown = sorted(set(layer) - set(known))
    if unknown:
        raise UserError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return layer


def build(cls: type[Options], *layers: Mapping[str, Any] | None, where: str = "options") -> Options:
    """Defaults, then each layer in turn (a preset, then flags); None values are skipped.  The one
    place values are parsed and checked."""
    known = kinds(cls)
    values: dict[str, Any] = {}
    for layer in layers:
        values.update({k: coerce(k, known[k], v) for k, v in named(cls, layer, where).items() if v is not None})
    return cls(**values)


def read_yaml(path: str | Path, expected: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; every way it can be wrong is one UserError line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected {expected}")
    return data


def load_preset(path: str | Path) -> dict[str, Any]:
    """A YAML preset of `bonsai prune` options by field name; an unknown one names the file.  Its
    values are parsed and checked with the flags', by ``build``."""
    return named(PruneOptions, read_yaml(path, "a mapping of option: value"), f"--config {path}")
