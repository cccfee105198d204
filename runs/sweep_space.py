"""The search space of `cornpipe sweep`: which TrainConfig keys a trial samples, and from what.

A space is a TOML file (or DEFAULT_SPACE): per TrainConfig key either a list of choices, or a table
`{low, high, log = true/false, step}` for an int or float key, e.g.

    lr = {low = 3e-4, high = 3e-3, log = true}
    schedule = ["plateau", "cosine"]
    freeze_epochs = {low = 0, high = 2}

Every key, bound and choice is checked against TrainConfig before the first trial, so a bad space is
one `Error:` line, never a sweep of failed trials.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cornpipe.errors import ConfigError
from cornpipe.runs.config import TrainConfig, load_toml

# set by the sweep itself (which folds, which seed, where), or by the machine: never sampled
NOT_SAMPLED = frozenset({"shards", "out", "folds", "fold", "fold_group", "fold_seed", "seed", "device", "amp",
                         "compile", "channels_last", "workers", "dist_timeout", "verify", "init_weights"})
RANGE_KEYS = frozenset({"low", "high", "log", "step"})


@dataclass(frozen=True)
class Param:
    """One sampled key: `choices`, or a `low`..`high` range of `kind` int/float (log scale, step)."""

    name: str
    choices: tuple[Any, ...] | None = None
    kind: type | None = None
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None

    def as_dict(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log, "step": self.step}


def default_space(base: TrainConfig) -> dict[str, Any]:
    """What a sweep samples when no --space is given: the knobs that moved macro-F1 on real photos
    (issue 25); freeze_epochs only for a trunk that starts from weights."""
    space: dict[str, Any] = {"lr": {"low": 3e-4, "high": 3e-3, "log": True}, "schedule": ["plateau", "cosine"],
                             "oversample": ["none", "sqrt", "balanced"],
                             "label_smoothing": {"low": 0.0, "high": 0.2}, "ema": [False, True]}
    if base.pretrained or base.init_weights:
        space["freeze_epochs"] = {"low": 0, "high": min(3, max(0, base.epochs - 1))}
    return space


def load_space(path: str | Path | None, base: TrainConfig) -> list[Param]:
    """The space in `path` (default_space when None), checked against TrainConfig with `base`'s other
    settings: an unknown key, a bad range or a value TrainConfig refuses is a ConfigError."""
    raw = default_space(base) if path is None else load_toml(path)
    source = "the default search space" if path is None else str(path)
    if not raw:
        raise ConfigError(f"{source} samples nothing: give at least one TrainConfig key")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    params = []
    for key, spec in raw.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ConfigError(f"unknown key {key!r} in {source}: not a TrainConfig setting (`cornpipe train --help`)")
        if name in NOT_SAMPLED:
            raise ConfigError(f"{key} in {source}: the sweep sets it itself (or it is a machine setting); "
                              "give it as a fixed option instead")
        param = _param(name, spec, hints[name], source)
        for value in _probe_values(param):  # TrainConfig's own checks, before any trial
            try:
                TrainConfig.from_dict({**_fixed(base), name: value}, source=source)
            except ConfigError as exc:
                raise ConfigError(f"{key} = {value!r} in {source} is refused: {exc}") from None
        params.append(param)
    return params


def _param(name: str, spec: Any, hint: Any, source: str) -> Param:
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{name} in {source}: an empty list of choices")
        if not all(isinstance(v, (bool, int, float, str)) for v in spec):
            raise ConfigError(f"{name} in {source}: choices must be numbers, strings or booleans (got {spec!r})")
        return Param(name, choices=tuple(spec))
    if not isinstance(spec, dict):
        raise ConfigError(f"{name} in {source} must be a list of choices or a table {{low, high, log, step}} "
                          f"(got {spec!r})")
    extra = sorted(set(spec) - RANGE_KEYS)
    if extra or "low" not in spec or "high" not in spec:
        raise ConfigError(f"{name} in {source}: a range is {{low, high, log = true/false, step}}"
                          + (f" (unknown: {', '.join(extra)})" if extra else " (low and high needed)"))
    kinds = [t for t in (int, float) if hint is t or t in typing.get_args(hint)]
    if not kinds:
        raise ConfigError(f"{name} in {source} is not a number: give a list of choices")
    kind = kinds[0]
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    numbers = [v for v in (low, high, step) if v is not None]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers) \
            or not isinstance(log, bool):
        raise ConfigError(f"{name} in {source}: low, high and step must be numbers, log true or false")
    if kind is int and not all(isinstance(v, int) for v in numbers):
        raise ConfigError(f"{name} in {source} is an integer setting: low, high and step must be integers")
    if not low < high:
        raise ConfigError(f"{name} in {source}: low must be below high (got {low}..{high})")
    if log and (low <= 0 or step is not None):
        raise ConfigError(f"{name} in {source}: a log range needs low > 0 and no step")
    if step is not None and (step <= 0 or step > high - low):
        raise ConfigError(f"{name} in {source}: step must be in (0, high - low] (got {step})")
    return Param(name, kind=kind, low=low, high=high, log=log, step=step)


def _probe_values(param: Param) -> tuple[Any, ...]:
    return param.choices if param.choices is not None else (param.low, param.high)


def _fixed(base: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in base.to_dict().items() if v is not None}


def suggest(trial: Any, param: Param) -> Any:
    """The value an optuna trial samples for `param`."""
    if param.choices is not None:
        return trial.suggest_categorical(param.name, list(param.choices))
    if param.kind is int:
        return trial.suggest_int(param.name, int(param.low), int(param.high), step=int(param.step or 1),
                                 log=param.log)
    return trial.suggest_float(param.name, float(param.low), float(param.high), step=param.step, log=param.log)
