"""`cornpipe sweep SHARDS --out DIR --trials N`: the click edge over cornpipe.runs.sweep (torch-free at import)."""

from __future__ import annotations

from pathlib import Path

import click

from cornpipe.cli.handler import CornpipeCommand

SWEEP_METRICS = ("position_macro_f1", "position_accuracy", "grade_mae", "grade_within_tol", "grade_qwk", "loss")


@click.command("sweep", cls=CornpipeCommand,
               context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("shards", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Sweep directory: one cv folder per trial (trial-NNN), sweep.journal (the study), sweep.md, "
                   "best.toml.")
@click.option("--trials", type=click.IntRange(min=1), required=True,
              help="Trials the study holds when done (a rerun counts the finished ones and adds the rest).")
@click.option("--space", "space_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Search space TOML: per train setting a list of choices or {low, high, log, step} "
                   "[default: lr, schedule, oversample, label_smoothing, ema (+ freeze_epochs with weights)].")
@click.option("--metric", type=click.Choice(SWEEP_METRICS), default="position_macro_f1", show_default=True,
              help="The objective: its mean over folds (grade_mae and loss are minimised).")
@click.option("--folds", type=click.IntRange(min=2), default=3, show_default=True,
              help="K of the stratified K-fold every trial runs.")
@click.option("--group", default=None, metavar="KEY",
              help="Leave one group out per fold instead (stage, source or a manifest column; --folds ignored).")
@click.option("--seeds", default="0", show_default=True, metavar="S1,S2,...", help="Training seeds per fold.")
@click.option("--fold-seed", type=int, default=0, show_default=True, help="Seed of the fold assignment.")
@click.pass_context
def sweep_command(ctx: click.Context, shards: str, out: str, trials: int, space_file: str | None, metric: str,
                  folds: int, group: str | None, seeds: str, fold_seed: int) -> None:
    """Search training settings on SHARDS with Optuna: every trial is a `cornpipe cv` over the same folds.

    Any further option is a fixed `cornpipe train` setting (e.g. --model, --epochs, --nproc); --monitor
    defaults to --metric (grade_within_tol: to train's default). A trial
    reports each fold's metric; median pruning stops a trial below the median of earlier ones. Rerun
    the same command after a kill to continue the study (finished trials are kept, a killed one is
    retried). DIR/sweep.md lists the trials best first (mean ± sd, 95 % interval across folds);
    DIR/best.toml is the best config: `cornpipe train SHARDS --config DIR/best.toml --out RUN`.
    Needs the `sweep` extra (optuna).
    """
    from cornpipe.cli.runs import _parse_seeds, _torchrun_train, fold_settings
    from cornpipe.runs.config import MONITORS, config_from_sources, load_toml

    sub, given = fold_settings(ctx, "cornpipe sweep", shards, out, folds, group, fold_seed,
                               sets_itself=("force", "print_config"))
    config_file = sub.params.get("config_file")
    from_file = {k.replace("-", "_") for k in load_toml(config_file)} if config_file else set()
    if metric in MONITORS and "monitor" not in given and "monitor" not in from_file:
        given["monitor"] = metric  # each fold's best epoch, early stopping and plateau follow the objective
    base = config_from_sources(given, config_file=config_file)
    seed_list = _parse_seeds(seeds)
    from cornpipe.runs.sweep import SWEEP_MD, _optuna, run_sweep
    from cornpipe.runs.sweep_space import load_space

    _optuna()  # a missing extra is one line before anything else
    space = load_space(space_file, base)
    nproc = sub.params.get("nproc")
    if nproc is not None and nproc > 1:
        train_fn = _torchrun_train(nproc, config_file)
    else:
        from cornpipe.train import train as train_fn
    from cornpipe.shards.shard_set import ShardSet

    samples = ShardSet(base.shards).manifest["samples"]
    run_sweep(base, Path(out), samples, seed_list, trials, space, train_fn, click.echo, metric=metric)
    click.echo(f"summary: {Path(out) / SWEEP_MD}")
