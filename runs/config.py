"""The training configuration: one frozen dataclass, loadable from TOML, saved as JSON.

Precedence (lowest to highest): the defaults below, `--config run.toml`, a resumed run's saved
config, then command-line flags given explicitly. `resolve_runtime` fills in what depends on the
machine (device, AMP dtype, compile, channels_last) so that the config saved in the run directory
and in every checkpoint says exactly what ran.

TOML layout: top-level keys named like the fields below (dashes or underscores), optionally inside a
`[train]` table, e.g.

    shards = "data/shards"
    model = "resnet_plus50"
    epochs = 60
    loss_weights = [0.7, 0.3]
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cornpipe.choices import (
    BACKENDS,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_OVERSAMPLE,
    DEFAULT_OVERSAMPLE_BY,
    GRADE_HEADS,
    LOGGERS,
    MIN_IMAGE_SIZE,
    OVERSAMPLE_STRATEGIES,
    SEED_MAX,
    oversample_keys,
)
from cornpipe.errors import ConfigError

OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
OPTIMIZER_DEFAULTS: dict[str, tuple[float, float]] = {"adamw": (2e-3, 0.05), "sgd": (0.05, 5e-4)}  # lr, wd
SCHEDULES: tuple[str, ...] = ("plateau", "cosine")
AMP_MODES: tuple[str, ...] = ("auto", "fp16", "bf16", "off")
# Every monitor is "higher is better"; metrics where lower is better enter negated.
#   combined: position_macro_f1 - grade_mae / max(grade_scale)   (both parts in [0, 1]-ish units,
#             so one grade step on 0..9 costs as much as ~11 points of macro-F1)
#             A task constant in the train split is left out of it (runs.tasks).
FOLD_GROUPS: tuple[str, ...] = ("none", "stage", "source")  # built in; any manifest metadata column groups too
DEFAULT_LOSS_WEIGHTS: tuple[float, float] = (0.7, 0.3)  # (position, grade) when loss_weights is not set
MAX_BOOTSTRAP = 10_000  # resamples: memory grows with resamples x val samples, and 1000 already settles a 95 % interval
MONITORS: tuple[str, ...] = ("combined", "position_macro_f1", "position_accuracy", "grade_mae",
                             "grade_qwk", "loss")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Units in the comments."""

    # data
    shards: str = ""  # shard set directory written by `cornpipe convert`
    out: str = ""  # run directory (config.json, metrics.jsonl, best.pt, last.pt, report.md, plots)
    loader: str = "torch"  # backend: ffcv | dali | torch | resident
    oversample: str = DEFAULT_OVERSAMPLE  # per-epoch draw of train rows: none | balanced | sqrt | joint
    # comma-separated keys whose cells the draw balances: position plus any of grade, stage, source or a
    # manifest metadata column, e.g. "position,origin" (loaders.cells; TOML: a string or a list)
    oversample_by: str = ",".join(DEFAULT_OVERSAMPLE_BY)
    image_size: int = DEFAULT_IMAGE_SIZE  # pixels, side of the square crop the model sees
    batch_size: int = 64  # images per optimiser step PER PROCESS; under torchrun the global batch is x world size
    workers: int | None = None  # loader worker processes; None = the backend's default
    # model
    model: str = "resnet_plus18"  # name in models.MODELS
    grade_head: str = "regression"  # regression | corn (ordinal)
    drop_path: float = 0.0  # stochastic depth rate (probability at the deepest block)
    pretrained: bool = False  # timm:NAME only: timm's pretrained weights (its hub or local cache)
    init_weights: str | None = None  # a weights file to start from (cornpipe.models.init_weights)
    allow_partial_init: bool = False  # accept init weights matching < 90 % of the trunk's parameters
    # fine-tuning a pretrained trunk
    freeze_epochs: int = 0  # epochs training the heads only (trunk frozen, its BatchNorm in eval mode)
    trunk_lr_scale: float = 1.0  # the trunk's lr as a fraction of the heads' (schedule applies to both)
    freeze_bn: bool = False  # keep the trunk's BatchNorm statistics fixed (eval mode) the whole run
    # loss
    # (position, grade) weights of the total loss; None = DEFAULT_LOSS_WEIGHTS, a task constant in the train
    # split weighted 0 (runs.tasks: the run's config.json holds the weights used)
    loss_weights: tuple[float, float] | None = None
    label_smoothing: float = 0.0  # position cross-entropy smoothing, fraction of the target mass
    # augmentation
    jitter: float = 0.2  # train-time colour jitter: brightness, contrast and saturation factors in [1 - j, 1 + j]
    # optimisation
    epochs: int = 30  # maximum epochs (early stopping may end sooner)
    optimizer: str = "adamw"  # adamw | sgd (Nesterov momentum)
    lr: float | None = None  # peak learning rate after warm-up; None = 2e-3 (adamw; docs/recipes.md) / 0.05 (sgd)
    weight_decay: float | None = None  # conv/linear weights only; None = 0.05 (adamw) / 5e-4 (sgd)
    momentum: float = 0.9  # SGD momentum
    warmup_epochs: int = 1  # epochs of per-step linear warm-up from lr / 10 to lr
    schedule: str = "cosine"  # after warm-up: cosine (decays within any epoch budget) | plateau (ReduceLROnPlateau on the monitor)
    plateau_factor: float = 0.5  # lr multiplier when the monitor stalls
    plateau_patience: int = 2  # epochs without improvement before the lr drops
    min_lr: float = 1e-6  # floor of both schedules
    grad_clip: float = 1.0  # max global gradient L2 norm; 0 = no clipping
    ema: bool = False  # keep an exponential moving average of the weights; evaluate and save it
    ema_decay: float = 0.999  # EMA decay per optimiser step (warmed up: min(decay, (1+t)/(10+t)))
    # precision and speed
    device: str = "auto"  # auto (CUDA if available) | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (fp16 on CUDA, off on CPU) | fp16 | bf16 | off
    compile: bool | None = None  # torch.compile the model; None = on for CUDA, off for CPU
    channels_last: bool | None = None  # NHWC memory format; None = on (faster on CUDA and, measured, on the CPU)
    threads: int | None = None  # torch's CPU threads; None = runs.build.auto_threads (cores left by the loader)
    # distributed (torchrun + DDP; ignored in a single process)
    sync_bn: bool = False  # SyncBatchNorm: BatchNorm statistics over the global batch (CUDA only)
    dist_timeout: float = 600.0  # seconds a rank waits in a collective before the group fails
    # cross-validation (`cornpipe cv` sets these): which samples train and which validate
    folds: int = 0  # K of a stratified (position x grade) K-fold over ALL samples; 0 = the convert-time split
    fold: int = 0  # the fold that validates, 0-based (with fold_group: the index of the held-out group, sorted)
    fold_group: str = "none"  # none | stage | source | a manifest metadata column: leave one group out (folds ignored)
    fold_seed: int = 0  # seed of the fold assignment (apart from `seed`: seeds vary the training, not the folds)
    # evaluation and stopping
    monitor: str = "combined"  # metric for best.pt, early stopping and the plateau schedule
    patience: int = 8  # epochs without a monitor gain > min_delta before stopping; 0 = never stop
    min_delta: float = 1e-3  # smallest monitor gain that counts as an improvement (monitor units)
    tolerance: float = 2.0  # grade units; grade_within_tol counts |pred - true| <= tolerance
    bootstrap: int = 1000  # bootstrap resamples for the validation confidence intervals; 0 = none
    max_batches: int = 0  # cap on training batches per epoch (quick runs); 0 = all. Never caps validation
    max_val_batches: int = 0  # cap on validation batches (val is in class order: a capped val is biased); 0 = all
    verify: bool = True  # before the first epoch: manifest hash, file sizes, sha256 of sets up to 2 GB
    seed: int = 0  # all randomness is a function of (seed, epoch)
    deterministic: bool = False  # torch's deterministic kernels, cuDNN autotuning off (slower; cornpipe.runs.tracking)
    # tracking
    log: str = "none"  # none | tensorboard: per-epoch scalars and the confusion matrix in RUN/tensorboard/

    def __post_init__(self) -> None:
        # optimiser-dependent defaults, filled in here so the saved config holds the numbers used
        if self.lr is None:
            object.__setattr__(self, "lr", OPTIMIZER_DEFAULTS.get(self.optimizer, (1e-3, 0.0))[0])
        if self.weight_decay is None:
            object.__setattr__(self, "weight_decay", OPTIMIZER_DEFAULTS.get(self.optimizer, (0.0, 0.05))[1])

        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        def choice(name: str, options: tuple[str, ...]) -> None:
            value = getattr(self, name)
            check(value in options, f"{name} must be one of {', '.join(options)} (got {value!r})")

        choice("loader", BACKENDS)
        choice("oversample", OVERSAMPLE_STRATEGIES)
        try:  # one spelling saved ("position,origin"), whichever was given
            object.__setattr__(self, "oversample_by", ",".join(oversample_keys(self.oversample_by)))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        choice("grade_head", GRADE_HEADS)
        choice("optimizer", OPTIMIZERS)
        choice("schedule", SCHEDULES)
        choice("amp", AMP_MODES)
        choice("monitor", MONITORS)
        check(bool(self.fold_group.strip()), "fold_group must be none, stage, source or a metadata column")
        choice("log", LOGGERS)
        check(self.folds == 0 or self.folds >= 2, f"folds must be 0 (no folds) or >= 2 (got {self.folds})")
        check(self.fold >= 0 and (self.folds == 0 or self.fold < self.folds),
              f"fold must be in 0..folds-1 (got fold {self.fold} of {self.folds})")
        # the loaders' own bound, so a size no loader takes is refused here, before the shard check and the model
        check(self.image_size >= MIN_IMAGE_SIZE, f"image_size must be >= {MIN_IMAGE_SIZE} px (got {self.image_size})")
        for name in ("batch_size", "epochs"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("lr", "weight_decay", "momentum", "min_lr", "grad_clip", "min_delta", "tolerance",
                     "drop_path", "label_smoothing", "jitter", "warmup_epochs", "patience", "plateau_patience", "freeze_epochs",
                     "bootstrap", "max_batches", "max_val_batches"):
            value = getattr(self, name)
            check(math.isfinite(value) and value >= 0, f"{name} must be a finite number >= 0 (got {value})")
        check(self.lr > 0, f"lr must be > 0 (got {self.lr})")
        for name in ("seed", "fold_seed"):  # numpy and torch seeds are 64-bit: say so before any work
            value = getattr(self, name)
            check(0 <= value <= SEED_MAX, f"{name} must be in 0..2**63-1 (got {value})")
        check(self.bootstrap <= MAX_BOOTSTRAP, f"bootstrap must be at most {MAX_BOOTSTRAP} resamples (got "
              f"{self.bootstrap}): each resample holds a copy of the val predictions, and the intervals settle "
              "long before")
        check(math.isfinite(self.dist_timeout) and self.dist_timeout > 0,
              f"dist_timeout must be > 0 seconds (got {self.dist_timeout})")
        check(math.isfinite(self.trunk_lr_scale) and self.trunk_lr_scale > 0,
              f"trunk_lr_scale must be > 0 (got {self.trunk_lr_scale}); use freeze_epochs to freeze the trunk")
        check(self.workers is None or self.workers >= 0, f"workers must be >= 0 (got {self.workers})")
        check(self.threads is None or self.threads >= 1, f"threads must be >= 1 (got {self.threads})")
        check(0 < self.plateau_factor < 1, f"plateau_factor must be in (0, 1) (got {self.plateau_factor})")
        check(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1) (got {self.ema_decay})")
        check(self.drop_path < 1 and self.label_smoothing < 1, "drop_path and label_smoothing must be < 1")
        check(self.jitter < 1, f"jitter must be in [0, 1): a factor 1 - jitter of 0 would blank the image (got {self.jitter})")
        check(self.loss_weights is None or len(self.loss_weights) == 2 and all(math.isfinite(w) and w >= 0 for w in self.loss_weights)
              and sum(self.loss_weights) > 0,
              f"loss_weights must be two non-negative numbers, not both 0 (got {self.loss_weights})")
        check(self.device == "auto" or self.device == "cpu" or self.device.split(":")[0] == "cuda",
              f"device must be auto, cpu, cuda or cuda:N (got {self.device!r})")

    def to_dict(self) -> dict[str, Any]:
        """JSON- and `torch.load(weights_only=True)`-safe (lists, not tuples)."""
        d = dataclasses.asdict(self)
        d["loss_weights"] = None if self.loss_weights is None else list(self.loss_weights)
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from plain values (TOML, JSON, a checkpoint); unknown keys and bad types are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k.replace("-", "_"): v for k, v in values.items()}
        if isinstance(values.get("oversample_by"), list):  # TOML's list form of the comma string
            values["oversample_by"] = ",".join(str(v) for v in values["oversample_by"])
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown key(s) in {source}: {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k], source) for k, v in values.items()})


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    """Check one value against its field type; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(hint)
    if value is None and type(None) in typing.get_args(hint):
        return None
    base = hint
    if origin is typing.Union or origin is types.UnionType:  # `int | None` -> int
        base = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(base) is tuple:  # also `tuple[...] | None`
        if isinstance(value, (list, tuple)) and all(_is_number(v) for v in value):
            return tuple(float(v) for v in value)
    elif base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if _is_number(value):
            return float(value)
    elif base is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{name} in {source} has the wrong type: {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_loss_weights(text: str) -> tuple[float, float]:
    """'0.7,0.3' -> (0.7, 0.3)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        weights = tuple(float(p) for p in parts)
    except ValueError:
        weights = ()
    if len(weights) != 2 or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"--loss-weights must be two non-negative numbers POSITION,GRADE, e.g. 0.7,0.3 "
                          f"(got {text!r})")
    return weights  # type: ignore[return-value]


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a run.toml into plain values (a `[train]` table or top-level keys)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError as exc:
            raise ConfigError("reading a TOML config on Python 3.10 needs tomli: pip install tomli") from exc
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except UnicodeDecodeError as exc:  # tomllib decodes the bytes as UTF-8 itself
        raise ConfigError(f"{path} is not UTF-8 text ({exc.reason})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path} ({exc.strerror or exc})") from exc
    if isinstance(data.get("train"), dict):
        rest = sorted(k for k in data if k != "train")
        if rest:
            raise ConfigError(f"{path}: keys outside [train]: {', '.join(rest)}")
        data = data["train"]
    return data


def resolve_device(device: str, cuda_available: bool) -> str:
    """The one "auto" rule: CUDA when available, else the CPU; a CUDA device without CUDA is a ConfigError."""
    if device == "auto":
        return "cuda" if cuda_available else "cpu"
    if device.startswith("cuda") and not cuda_available:
        raise ConfigError(f"device {device} requested but CUDA is not available")
    return device


def resolve_runtime(cfg: TrainConfig, cuda_available: bool) -> TrainConfig:
    """Fill in device, amp, compile and channels_last for this machine (a resolved config stays as it is)."""
    device = resolve_device(cfg.device, cuda_available)
    on_cuda = device.startswith("cuda")
    amp = cfg.amp
    if amp == "auto":
        amp = "fp16" if on_cuda else "off"
    return dataclasses.replace(
        cfg, device=device, amp=amp,
        compile=on_cuda if cfg.compile is None else cfg.compile,
        channels_last=True if cfg.channels_last is None else cfg.channels_last,  # docs/performance.md
    )


# Changing these on --resume is safe; anything else would make the saved state meaningless.
RESUME_OVERRIDABLE: frozenset[str] = frozenset(
    {"epochs", "patience", "min_delta", "workers", "threads", "device", "amp", "compile", "bootstrap", "max_batches",
     "max_val_batches", "verify", "out", "shards", "dist_timeout", "log"})


def merge_for_resume(saved: dict[str, Any], overrides: dict[str, Any], run: str) -> TrainConfig:
    """The saved config with the flags given on the command line; refuses incompatible changes."""
    base = TrainConfig.from_dict(saved, source=f"{run}/last.pt")
    changed = {k: v for k, v in overrides.items() if getattr(base, k) != v}
    bad = sorted(set(changed) - RESUME_OVERRIDABLE)
    if bad:
        raise ConfigError(f"--resume cannot change {', '.join(bad)} (the run was started with "
                          + ", ".join(f"{k}={getattr(base, k)!r}" for k in bad) + ")")
    return dataclasses.replace(base, **changed)


def config_from_sources(given: dict[str, Any], *, config_file: str | Path | None = None,
                        resume: str | Path | None = None) -> TrainConfig:
    """The run's config from flags given explicitly (`given`, field names), a TOML file or a run to resume.

    Precedence: TrainConfig's defaults < `config_file` < flags; or, with `resume`, the run's saved config
    with the flags it allows to change (RESUME_OVERRIDABLE).
    """
    given = dict(given)
    if isinstance(given.get("loss_weights"), str):
        given["loss_weights"] = parse_loss_weights(given["loss_weights"])
    if resume is not None:
        from cornpipe.runs.checkpoint import resume_state

        if config_file:
            raise ConfigError("use either --config or --resume, not both")
        if given.get("out") and Path(given["out"]) != Path(resume):
            raise ConfigError("--out and --resume name different runs; --resume RUN continues RUN")
        saved = resume_state(Path(resume), purpose=None)["config"]  # last.pt, or best.pt when a kill cut last.pt
        return merge_for_resume(saved, {**given, "out": str(resume)}, str(resume))
    values = load_toml(config_file) if config_file else {}
    values.update(given)
    if not values.get("shards"):
        raise ConfigError("missing SHARDS (the shard set to train on), or --resume RUN")
    if not values.get("out"):
        raise ConfigError("missing --out RUN (the run directory to create)")
    return TrainConfig.from_dict(values, source=str(config_file) if config_file else "options")


def to_toml(cfg: TrainConfig) -> str:
    """`cfg` as a run.toml that `--config` (load_toml) reads back to the same fields; None values are left
    out (they mean "the default": auto device settings stay auto, so the file travels between machines)."""
    lines = ["# cornpipe train --config FILE: the resolved training config"]
    for name, value in cfg.to_dict().items():
        if value is not None:
            lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    """One TOML value: a string, bool, int, float or a list of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else
                                                          "inf" if value > 0 else "-inf")
    if isinstance(value, str):  # JSON's escapes are TOML's; DEL is the one control character JSON leaves raw
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def write_config_json(cfg: TrainConfig, path: Path, extra: dict[str, Any] | None = None) -> None:
    path.write_text(json.dumps({**cfg.to_dict(), **(extra or {})}, indent=2) + "\n")
