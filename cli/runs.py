"""Run commands: `cornpipe train`, `cornpipe report RUN`, `cornpipe predict MODEL IMAGES...`.

The click edge over cornpipe.train, cornpipe.runs.report and cornpipe.predict. `train`'s options take
their defaults and help from `TrainConfig` (cornpipe.runs.config), so a default is written once.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from cornpipe.choices import BACKENDS, GRADE_HEADS, LOGGERS, OVERSAMPLE_STRATEGIES, SEED_MAX
from cornpipe.cli.handler import CornpipeCommand
from cornpipe.errors import ConfigError
from cornpipe.runs.config import (
    AMP_MODES,
    MONITORS,
    OPTIMIZERS,
    RESUME_OVERRIDABLE,
    SCHEDULES,
    TrainConfig,
    config_from_sources,
    to_toml,
)

FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _opt(*decls: str, help: str, **kwargs: Any) -> Any:
    """A click option whose default lives in TrainConfig (None here, so TOML/resume values survive)."""
    flag = decls[0].split("/")[0]
    default = FIELD_DEFAULTS[flag.lstrip("-").replace("-", "_")]
    if isinstance(default, bool) and kwargs.get("is_flag"):
        help += f"  [default: {'on' if default else 'off'}]"
    elif isinstance(default, bool):
        help += f"  [default: {flag if default else '--no-' + flag[2:]}]"
    elif isinstance(default, tuple):
        help += f"  [default: {','.join(f'{v:g}' for v in default)}]"
    elif default is not None:
        help += f"  [default: {default}]"
    return click.option(*decls, default=None, help=help, **kwargs)


@click.command("train", cls=CornpipeCommand)
@click.argument("shards", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", type=click.Path(file_okay=False), help="Run directory to create.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="run.toml with any of the options below (flags given here override it).")
@click.option("--resume", type=click.Path(exists=True, file_okay=False),
              help="Continue RUN from RUN/last.pt (flags such as --epochs/--patience may change; a new --epochs "
                   "stretches the cosine schedule over the new total from where the run stopped).")
@click.option("--force", is_flag=True, help="Overwrite the run files in an existing --out.")
@click.option("--allow-new-shards", is_flag=True,
              help="With --resume: continue on a shard set other than the run's own (the report says so).")
@click.option("--print-config", is_flag=True, help="Print the resolved config as TOML (what --config reads) "
              "and exit without training.")
@click.option("--verbose", is_flag=True, help="Print the full metrics table every epoch (default: one line an "
              "epoch, the table at the end and in report.md).")
@_opt("--epochs", type=int, help="Maximum epochs.")
@_opt("--batch-size", type=int, help="Images per step PER PROCESS: with --nproc N (or torchrun) the global "
      "batch is batch-size x N (x nodes).")
@_opt("--image-size", type=int, help="Side of the square model input, pixels.")
@_opt("--model", type=str, help="Model: resnet_plus18/34/50, resnet_plus_tiny, or timm:NAME for any timm trunk "
      "under the two heads (`cornpipe models`).")
@_opt("--pretrained/--no-pretrained", help="timm:NAME only: timm's pretrained weights (needs its hub or cache).")
@_opt("--init-weights", type=click.Path(exists=True, dir_okay=False),
      help="Start from a weights file: a timm/torchvision state dict, a lukemelas EfficientNet file or a "
           "cornpipe checkpoint (heads too). Matched by name, then in order; counts and sha256 go to "
           "config.json.")
@_opt("--allow-partial-init", is_flag=True,
      help="Accept --init-weights matching fewer than 90 % of the trunk's parameters.")
@_opt("--freeze-epochs", type=int, help="Fine-tuning: epochs training the heads only (trunk frozen).")
@_opt("--trunk-lr-scale", type=float, help="Fine-tuning: the trunk's lr as a fraction of the heads'.")
@_opt("--freeze-bn/--no-freeze-bn", help="Keep the trunk's BatchNorm statistics fixed the whole run.")
@_opt("--grade-head", type=click.Choice(GRADE_HEADS), help="Grade head.")
@_opt("--drop-path", type=float, help="Stochastic depth rate.")
@_opt("--loader", type=click.Choice(BACKENDS), help="Loader backend.")
@_opt("--oversample", type=click.Choice(OVERSAMPLE_STRATEGIES), help="Oversampling of train rows.")
@_opt("--oversample-by", type=str, metavar="KEYS", help="The cells --oversample balances: position plus any of "
      "grade, stage, source or a manifest metadata column, e.g. position,origin (field photos of each position "
      "drawn as often as lab ones; a missing value is its own cell, unknown). none ignores it.")
@_opt("--workers", type=int, help="Loader worker processes [default: backend's].")
@_opt("--threads", type=int, help="torch's CPU threads [default: the cores this process may use minus the loader's "
      "workers, at least half of them].")
@_opt("--device", type=str, help="auto, cpu, cuda or cuda:N.")
@_opt("--amp", type=click.Choice(AMP_MODES), help="Mixed precision (auto: fp16 on CUDA, off on CPU).")
@_opt("--compile/--no-compile", help="torch.compile the model [default: on for CUDA].")
@_opt("--channels-last/--no-channels-last", help="NHWC memory format [default: on; faster on the CPU too].")
@_opt("--optimizer", type=click.Choice(OPTIMIZERS), help="AdamW or SGD with Nesterov momentum.")
@_opt("--lr", type=float, help="Peak learning rate [default: 2e-3 adamw, 0.05 sgd]. Used as given, also "
      "under DDP: when the global batch grows k-fold (more processes), scale it yourself -- k x lr for SGD "
      "(linear rule, keep the warm-up), about sqrt(k) x lr for AdamW.")
@_opt("--weight-decay", type=float, help="Weight decay, not on norms/biases [default: 0.05 adamw, 5e-4 sgd].")
@_opt("--warmup-epochs", type=int, help="Linear warm-up epochs.")
@_opt("--schedule", type=click.Choice(SCHEDULES), help="LR schedule after warm-up.")
@_opt("--grad-clip", type=float, help="Max gradient norm; 0 = off.")
@_opt("--ema/--no-ema", help="Keep and evaluate an EMA of the weights.")
@_opt("--label-smoothing", type=float, help="Position label smoothing.")
@_opt("--jitter", type=float, help="Train-time colour jitter: brightness, contrast and saturation each scaled by a "
      "factor in [1 - J, 1 + J]; 0 = off (disease colour is the signal: see docs/recipes.md).")
@_opt("--loss-weights", type=str, help="POSITION,GRADE loss weights [default: 0.7,0.3, and 0 for a task whose "
      "labels are constant in the train split; given here, they are used as given].")
@_opt("--monitor", type=click.Choice(MONITORS), help="Validation metric for best.pt/early stopping.")
@_opt("--patience", type=int, help="Early-stopping patience, epochs; 0 = never.")
@_opt("--min-delta", type=float, help="Smallest monitor gain that counts.")
@_opt("--tolerance", type=float, help="Grade tolerance for grade_within_tol, grade units.")
@_opt("--bootstrap", type=int, help="Bootstrap resamples for val confidence intervals.")
@_opt("--verify/--no-verify", help="Check the shard set before the first epoch (manifest hash, file sizes, "
      "sha256 up to 2 GB).")
@_opt("--max-batches", type=int, help="Cap on training batches per epoch (quick runs); 0 = all. Caps training "
      "only: validation sees every val image unless --max-val-batches.")
@_opt("--max-val-batches", type=int, help="Cap on validation batches per epoch; 0 = all. The val split is stored "
      "in class order, so a capped validation sees some classes only.")
@_opt("--seed", type=int, help="Random seed.")
@_opt("--deterministic/--no-deterministic", help="Reproducible kernels: torch's deterministic algorithms, cuDNN "
      "autotuning off (slower on CUDA; an op without a deterministic kernel stops the run).")
@_opt("--log", type=click.Choice(LOGGERS), help="Experiment tracker: tensorboard writes per-epoch scalars and the "
      "confusion matrix to RUN/tensorboard (the `tensorboard` extra).")
@_opt("--folds", type=int, help="Cross-validation: train on a stratified K-fold of ALL samples (0 = the "
      "convert-time split); `cornpipe cv` runs every fold.")
@_opt("--fold", type=int, help="Cross-validation: the fold that validates (0-based).")
@_opt("--fold-group", type=str, metavar="KEY", help="Cross-validation: leave one group out instead of K folds: "
      "stage, source or a metadata column of the manifest CSV, e.g. origin (--fold picks the group, sorted).")
@_opt("--fold-seed", type=int, help="Cross-validation: seed of the fold assignment.")
@click.option("--seeds", default=None, metavar="S1,S2,...",
              help="Train the same config once per seed into RUN/seed<S> and summarise the spread "
                   "(RUN/cv.md, cv.json) like `cornpipe cv`; with --nproc each seed's run is a torchrun group.")
@_opt("--sync-bn/--no-sync-bn", help="DDP: BatchNorm statistics over the global batch (SyncBatchNorm; CUDA only).")
@_opt("--dist-timeout", type=float, help="DDP: seconds a rank waits in a collective before the group fails.")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Train on N processes of this machine (DDP: one GPU each, or gloo on the CPU) by launching "
                   "torchrun. For several machines run torchrun yourself: torchrun --nnodes M --nproc-per-node N "
                   "--rdzv-backend c10d --rdzv-endpoint HOST:PORT -m cornpipe train SHARDS --out RUN ...")
@click.pass_context
def train_command(ctx: click.Context, shards: str | None, out: str | None, config_file: str | None,
                  resume: str | None, force: bool, print_config: bool, verbose: bool, allow_new_shards: bool,
                  nproc: int | None, seeds: str | None, **flags: Any) -> None:
    """Train on SHARDS (a `cornpipe convert` output) into --out RUN.

    \b
    Distributed data parallel (torchrun + DDP): `--nproc N`, or
      torchrun --nproc-per-node N -m cornpipe train SHARDS --out RUN ...
    Each process reads its own slice of every epoch; --batch-size is per process (global batch =
    batch-size x processes); --lr is not rescaled (see --lr); validation covers the whole val split
    once, gathered on every rank; only rank 0 writes RUN.
    """
    given = _given_fields(ctx)
    if shards:
        given["shards"] = shards
    if out:
        given["out"] = out
    cfg = config_from_sources(given, config_file=config_file, resume=resume)  # bad options fail here, once
    if print_config:
        click.echo(to_toml(cfg), nl=False)
        return
    if seeds is not None:
        if resume:
            raise ConfigError("--seeds trains one run per seed in turn: rerun the same command to resume it, "
                              "without --resume")
        _run_folds(cfg, _parse_seeds(seeds), nproc, config_file, force)
        return
    if nproc is not None and nproc > 1:
        from cornpipe.runs.distributed import launch

        launch(nproc, _forwarded_args(ctx, skip={"nproc"}))
        return
    from cornpipe.cli.progress import batch_reporter
    from cornpipe.train import train  # torch and the loaders load only for the commands that use them

    on_batches = None if sys.stderr.isatty() else batch_reporter(_echo_err)  # a log: lines, not a bar
    train(cfg, resume=bool(resume), force=force, verbose=verbose, allow_new_shards=allow_new_shards,
          on_batches=on_batches)


def _given_fields(ctx: click.Context) -> dict[str, Any]:
    """TrainConfig fields set on the command line (defaults stay with the config, TOML or resumed run)."""
    return {k: v for k, v in ctx.params.items() if k in FIELD_DEFAULTS and v is not None
            and ctx.get_parameter_source(k) != ParameterSource.DEFAULT}


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0 or max(seeds) > SEED_MAX:
        raise ConfigError(f"--seeds must be distinct integers in 0..2**63-1, e.g. 0,1,2 (got {text!r})")
    return seeds


@click.command("cv", cls=CornpipeCommand,
               context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("shards", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="CV directory: one run folder per fold x seed, cv.json, cv.md, cv_confusion.png, "
                   "oof_predictions.csv.")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="K of the stratified (position x grade) K-fold over all converted samples.")
@click.option("--group", default=None, metavar="KEY",
              help="Leave one group out per fold instead (--folds is ignored): stage (9/14/19), source "
                   "(folder) or any metadata column of the manifest CSV (e.g. origin, camera, field_id).")
@click.option("--seeds", default="0", show_default=True, metavar="S1,S2,...", help="Training seeds per fold.")
@click.option("--fold-seed", type=int, default=0, show_default=True, help="Seed of the fold assignment.")
@click.pass_context
def cv_command(ctx: click.Context, shards: str, out: str, folds: int, group: str | None, seeds: str,
               fold_seed: int) -> None:
    """Cross-validate one training config on SHARDS: every fold x seed is a full `cornpipe train` run.

    Any further option is a `cornpipe train` option (see `cornpipe train --help`); with --nproc N each
    run trains on N torchrun processes (DDP), one run after the other. Rerunning the same command after
    a kill skips finished folds and resumes the interrupted one; a rerun with another config is refused
    (--force starts a new cv in CVDIR, removing only the runs and summary cornpipe wrote there).
    CVDIR/cv.md reads: one row per run, then per metric mean ± sd and a 95 % interval across folds beside the metric of the pooled out-of-fold
    predictions (CVDIR/oof_predictions.csv: every sample once per seed), per-position recall across
    folds, and the pooled out-of-fold confusion matrix (each sample counted once).
    """
    sub, given = fold_settings(ctx, "cornpipe cv", shards, out, folds, group, fold_seed)
    cfg = config_from_sources(given, config_file=sub.params.get("config_file"))
    if sub.params.get("print_config"):
        click.echo(to_toml(cfg), nl=False)
        return
    _run_folds(cfg, _parse_seeds(seeds), sub.params.get("nproc"), sub.params.get("config_file"),
               bool(sub.params.get("force")))


def fold_settings(ctx: click.Context, command: str, shards: str, out: str, folds: int, group: str | None,
                  fold_seed: int, sets_itself: tuple[str, ...] = ()) -> tuple[click.Context, dict[str, Any]]:
    """(the train options after a fold command's own, the TrainConfig fields they give plus the folds):
    `cornpipe cv` and `cornpipe sweep` take train options but set the fold options themselves."""
    sub = train_command.make_context(command, [shards, "--out", out, *ctx.args])
    for name in ("resume", "seeds", "folds", "fold", "fold_group", "fold_seed", *sets_itself):
        if sub.get_parameter_source(name) not in (None, ParameterSource.DEFAULT):
            raise ConfigError(f"{command} sets --{name.replace('_', '-')} itself; leave it out")
    if group is not None and group.strip().lower() in ("", "none"):
        raise ConfigError("--group needs a key (stage, source or a manifest column); leave it out for K folds")
    given = _given_fields(sub)
    given.update(shards=shards, out=out, folds=0 if group else folds, fold_group=group or "none",
                 fold_seed=fold_seed)
    return sub, given


def _run_folds(cfg: TrainConfig, seeds: list[int], nproc: int | None, config_file: str | None,
               force: bool = False) -> None:
    """Every fold x seed of `cornpipe cv` / `train --seeds`: in this process, or each on torchrun (--nproc)."""
    from cornpipe.runs.cv import CV_HTML, CV_MD, run_folds
    from cornpipe.shards.shard_set import ShardSet

    if nproc is not None and nproc > 1:
        train_fn = _torchrun_train(nproc, config_file)
    else:
        from cornpipe.train import train as train_fn
    samples = ShardSet(cfg.shards).manifest["samples"]
    with _progress_lines(train_fn, cfg, samples, seeds) as tracked:
        run_folds(cfg, Path(cfg.out), samples, seeds, tracked, click.echo, force=force)
    click.echo(f"summary: {Path(cfg.out) / CV_MD} (one page with its plots: {CV_HTML})")


@contextmanager
def _progress_lines(train_fn: Callable[..., None], cfg: TrainConfig, samples: list[dict],
                    seeds: list[int]) -> Iterator[Callable[..., None]]:
    """train_fn, its runs' epochs counted into `cv: done/total epochs (p %), ...` lines every 10 s or 10 %
    when stderr is a log; on a terminal train's own bars show the progress."""
    if sys.stderr.isatty():
        yield train_fn
        return
    from cornpipe.cli.progress import EpochWatch, ProgressLines
    from cornpipe.runs.cv import RESULT_FILE, number_of_folds, run_name, uses_folds
    from cornpipe.runs.report import METRICS_FILE

    folds = list(range(number_of_folds(samples, cfg))) if uses_folds(cfg) else [None]
    runs = {Path(cfg.out) / run_name(fold, seed): cfg.epochs for fold in folds for seed in seeds}
    earlier = {run for run in runs if (run / RESULT_FILE).is_file()}
    lines = ProgressLines("cv" if uses_folds(cfg) else "train", "epochs", "epochs", _echo_err)

    with EpochWatch(lines, runs, earlier, METRICS_FILE) as watch:

        def train_one(run_cfg: TrainConfig, **kwargs: Any) -> None:
            watch.begin(Path(run_cfg.out))
            train_fn(run_cfg, **kwargs)
            watch.end(Path(run_cfg.out))

        yield train_one


def _echo_err(line: str) -> None:
    click.echo(line, err=True)


def _torchrun_train(nproc: int, config_file: str | None) -> Callable[..., None]:
    """run_folds' train_fn for --nproc N: each run is `python -m cornpipe train ...` on N torchrun processes
    (the launch `train --nproc` uses), its options written out from the run's config."""
    from cornpipe.runs.distributed import launch

    def train_on_ranks(cfg: TrainConfig, *, resume: bool, force: bool) -> None:
        if resume:  # as `train --resume RUN`: the run's saved config, with what a resume may change
            args = ["--resume", cfg.out, *_config_args(cfg, RESUME_OVERRIDABLE - {"out", "shards"})]
        else:  # the same --config file, then every field it or the defaults could not have set
            args = [cfg.shards, *(["--config", config_file] if config_file else []),
                    *_config_args(cfg, FIELD_DEFAULTS), *(["--force"] if force else [])]
        launch(nproc, args)

    return train_on_ranks


def _config_args(cfg: TrainConfig, names: Collection[str]) -> list[str]:
    """`cornpipe train` options that give the fields `names` cfg's values (None: left to the default)."""
    args: list[str] = []
    for param in train_command.params:
        if not isinstance(param, click.Option) or param.name not in names:
            continue
        value = getattr(cfg, param.name)
        if value is None:
            continue
        if param.is_flag:
            if param.secondary_opts:
                args.append(param.opts[0] if value else param.secondary_opts[0])
            elif value:
                args.append(param.opts[0])
        else:
            args += [param.opts[0], ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return args


def _forwarded_args(ctx: click.Context, skip: set[str]) -> list[str]:
    """The command line given to this command (explicit values only, defaults left to the config), for
    the processes torchrun starts."""
    args: list[str] = []
    for param in ctx.command.params:
        if param.name in skip or ctx.get_parameter_source(param.name) in (None, ParameterSource.DEFAULT):
            continue
        value = ctx.params[param.name]
        if isinstance(param, click.Argument):
            args.insert(0, str(value))
        elif isinstance(param, click.Option) and param.is_flag:
            if param.secondary_opts:
                args.append(param.opts[0] if value else param.secondary_opts[0])
            elif value:
                args.append(param.opts[0])
        elif value is not None:
            args += [param.opts[0], str(value)]
    return args


@click.command("models", cls=CornpipeCommand)
@click.option("--filter", "pattern", default=None, metavar="GLOB",
              help="Also list timm's models matching GLOB, e.g. 'resnet*' or '*efficientnet_lite*'.")
@click.option("--pretrained", "only_pretrained", is_flag=True, help="Only timm models with pretrained weights.")
def models_command(pattern: str | None, only_pretrained: bool) -> None:
    """List the built-in models (and timm's, with --filter) and their parameter counts."""
    from cornpipe.models import MODELS, TIMM_PREFIX
    from cornpipe.models.catalogue import count_parameters

    click.echo("built-in (--model NAME):")
    for name in MODELS:
        click.echo(f"  {name:<40} {count_parameters(name) / 1e6:8.2f} M parameters")
    if pattern is None:
        click.echo("timm trunks (--model timm:NAME): list them with --filter GLOB, e.g. --filter 'resnet*'")
        return
    from cornpipe.models.timm_net import timm_names

    names = timm_names(pattern, pretrained=only_pretrained)
    click.echo(f"timm (--model {TIMM_PREFIX}NAME), {len(names)} matching {pattern!r}:")
    for name in names:
        click.echo(f"  {TIMM_PREFIX + name:<40} {count_parameters(TIMM_PREFIX + name) / 1e6:8.2f} M parameters")


@click.command("report", cls=CornpipeCommand)
@click.argument("run", type=click.Path(exists=True, file_okay=False))
def report_command(run: str) -> None:
    """Rebuild RUN/report.md, report.html, curves.png and confusion_matrix.png from RUN/metrics.jsonl."""
    from cornpipe.runs.report import write_report

    write_report(Path(run))
    click.echo(f"wrote {Path(run) / 'report.md'}, report.html, curves.png, confusion_matrix.png")


@click.command("predict", cls=CornpipeCommand)
@click.argument("model", type=click.Path())
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="CSV to write.")
@click.option("--tta/--no-tta", default=False, show_default=True,
              help="Average with the horizontally flipped image.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--raw-probs", "raw_probs", is_flag=True,
              help="Uncalibrated softmax probabilities (default: divided by the run's fitted temperature).")
def predict_command(model: str, inputs: tuple[str, ...], out: str, tta: bool, device: str,
                    batch_size: int, raw_probs: bool) -> None:
    """Predict position and grade for IMAGES (files or folders) with MODEL (a run folder, which uses
    RUN/best.pt, or a checkpoint); writes a CSV: path, position_pred, prob_<class>..., grade_pred,
    grade_pred_level, error. In Python: cornpipe.load_model(MODEL).predict(images)."""
    from cornpipe.predict import predict

    summary = predict(Path(model), [Path(p) for p in inputs], Path(out), tta=tta, device=device,
                      batch_size=batch_size, raw=raw_probs)
    click.echo(f"predicted {summary.predicted} image(s), {summary.failed} unreadable -> {out}")
    if summary.predicted == 0:
        raise click.ClickException(f"no image could be read ({summary.failed} failed; see {out})")
