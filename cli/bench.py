"""`cornpipe bench loaders` and `cornpipe bench train`: the CLI edge over bench.loader_bench and
bench.train_bench. Progress goes to stderr, the table to stdout, everything to `--json FILE`."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cornpipe.choices import DEFAULT_IMAGE_SIZE, MIN_IMAGE_SIZE, OVERSAMPLE_STRATEGIES
from cornpipe.cli.handler import SEED, CornpipeGroup
from cornpipe.errors import CornpipeError

_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
_OUT_FILE = click.Path(dir_okay=False, path_type=Path)


def _echo(line: str) -> None:
    click.echo(line, err=True)


def _writer(json_path: Path | None, inputs: tuple[Path | str | None, ...] = ()) -> Callable[[dict[str, Any]], None] | None:
    """Writes a summary (partial while the benchmark runs, then complete) to --json, atomically; an
    input or a file that is not a JSON summary is refused before the benchmark starts."""
    if json_path is None:
        return None
    from cornpipe.shards.atomic import check_not_an_input, check_own_file

    check_not_an_input([json_path], inputs, inside_too=True)  # never over a shard set's manifest.json
    check_own_file(json_path, b"{", "a JSON summary")

    def write(summary: dict[str, Any]) -> None:
        from cornpipe.bench.machine import machine_facts

        summary.setdefault("machine", machine_facts())
        json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = json_path.with_name(json_path.name + ".part")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, json_path)

    return write


def _finish(summary: dict[str, Any], table: Any, json_path: Path | None) -> None:
    from rich.console import Console

    Console(markup=False, width=None if sys.stdout.isatty() else 160).print(table)  # a log or pipe: no squeezed columns
    write = _writer(json_path)
    if write is not None:
        write(summary)
        _echo(f"wrote {json_path}")
    failed = [r for r in summary["results"] if r.get("error")]
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(summary['results'])} runs failed; first: "
                                   f"{failed[0]['error']}")


@click.group(cls=CornpipeGroup)
def bench() -> None:
    """Throughput benchmarks: every loader backend, every training-step variant."""


@bench.command("loaders")
@click.argument("shards", nargs=-1, required=True, type=_DIR)
@click.option("--raw-shards", "raw_shards", multiple=True, type=_DIR,
              help="Another shard set (e.g. converted with --write-mode raw): ffcv runs on it too.")
@click.option("--source", type=_DIR, help="The original image folder: adds the torch baseline over it.")
@click.option("--manifest", "manifest_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The original images listed in a CSV (path,position,grade, as for convert --manifest) "
                   "instead of --source folders: adds the same torch baseline over them.")
@click.option("--backends", default=None, help="Comma-separated (ffcv,dali,torch,resident); default: all installed.")
@click.option("--split", default="train", show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--image-size", type=click.IntRange(MIN_IMAGE_SIZE), default=DEFAULT_IMAGE_SIZE, show_default=True, help="Output side, px.")
@click.option("--workers", type=click.IntRange(1), default=None, help="Loader workers [default: all cores].")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--oversample", type=click.Choice(OVERSAMPLE_STRATEGIES), default="none", show_default=True,
              help="Also reports the class fractions each backend delivered.")
@click.option("--seconds", type=click.FloatRange(0, min_open=True), default=10.0, show_default=True,
              help="Timed window per repeat.")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Time whole epochs instead of --seconds.")
@click.option("--warmup-batches", type=click.IntRange(0), default=None,
              help="Untimed batches first [default: the first epoch, at most 50].")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True,
              help="Rounds; each runs every backend once in a fresh process.")
@click.option("--ceiling/--no-ceiling", default=True, show_default=True,
              help="Measure the decode-only ceiling of the shard JPEGs.")
@click.option("--ceiling-decoder", type=click.Choice(["pil", "cv2"]), default="pil", show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--work", type=click.Choice(["same", "full", "both"]), default="same", show_default=True,
              help="same: every row does crop + horizontal flip + normalise, as the peers; full: cornpipe's "
                   "backends keep their default augmentation (vertical flip, colour jitter); both: a same and a "
                   "full row per backend in every round, and what full costs (full ÷ same).")
@click.option("--peers/--no-peers", default=True, show_default=True,
              help="Add each backend's own library used directly (ffcv-native, dali-native, torchvision).")
@click.option("--host-only", is_flag=True,
              help="Time what a host feeds a GPU: uint8 (B, S, S, 3) crops on the CPU, without colour jitter "
                   "and normalisation (the GPU's job), for every backend and peer.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(1), default=900.0, show_default=True,
              help="Seconds allowed for one run.")
@click.option("--json", "json_path", type=_OUT_FILE, default=None, help="Write the results here.")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep each run's output (one log per run) here.")
def loaders_command(shards: tuple[Path, ...], raw_shards: tuple[Path, ...], source: Path | None,
                    manifest_csv: Path | None,
                    backends: str | None, split: str, batch_size: int, image_size: int, workers: int | None,
                    device: str, oversample: str, seconds: float, epochs: int | None,
                    warmup_batches: int | None, repeats: int, ceiling: bool, ceiling_decoder: str, seed: int,
                    work: str, peers: bool, host_only: bool, timeout_s: float, json_path: Path | None,
                    log_dir: Path | None) -> None:
    """Images/s of every loader backend over SHARDS.

    Each backend, and each backend's peer (its own library used directly: ffcv-native, dali-native,
    torchvision), runs in a fresh process, in rounds (--repeats), with the same work (--work), image
    size, batch size and workers; reported as ratios to the torch baseline and to the backend's peer,
    and as a fraction of the decode-only ceiling of the same JPEGs. --host-only measures the uint8 crops a
    host would hand a GPU, on the CPU, so a machine without a GPU measures the rate a GPU would be fed.
    """
    from cornpipe.bench.loader_bench import LoaderBenchConfig, choose_backends, choose_peers, run_loader_bench
    from cornpipe.bench.machine import machine_facts
    from cornpipe.bench.tables import loader_table

    names, notes = choose_backends(backends)
    peer_names, peer_notes = choose_peers(backends) if peers else ([], [])
    for note in notes + peer_notes:
        _echo(note)
    cfg = LoaderBenchConfig(split=split, batch_size=batch_size, image_size=image_size, device=device,
                            workers=workers, oversample=oversample, seed=seed, seconds=seconds,
                            epochs=epochs, warmup_batches=warmup_batches, repeats=repeats, ceiling=ceiling,
                            ceiling_decoder=ceiling_decoder, timeout_s=timeout_s, work=work, peers=peers,
                            host_only=host_only)
    if source is not None and manifest_csv is not None:
        raise click.UsageError("give --source FOLDER or --manifest CSV, not both")
    summary = run_loader_bench([*shards, *raw_shards], cfg, backends=names, source=source or manifest_csv, peers=peer_names,
                               log_dir=log_dir, echo=_echo,
                               partial=_writer(json_path, (*shards, *raw_shards, source, manifest_csv)))
    summary["machine"] = machine_facts()
    _finish(summary, loader_table(summary), json_path)


@bench.command("train")
@click.option("--model", default=None, help="A built-in name or timm:NAME [default: resnet_plus50 on CUDA, resnet_plus18 on CPU]")
@click.option("--image-size", type=click.IntRange(MIN_IMAGE_SIZE), default=DEFAULT_IMAGE_SIZE, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=None, help="[default: 256 on CUDA, 16 on CPU]")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--variants", default="eager-fp32,channels_last,amp,compile,all", show_default=True,
              help="Comma-separated, from: eager-fp32, channels_last, amp, compile, all.")
@click.option("--data", "data", type=click.Choice(["synthetic", "loader", "both"]), default=None,
              help="Feed steps from synthetic tensors, the loader, or both [default: both with --shards].")
@click.option("--shards", type=_DIR, default=None, help="A shard set: rows fed by a real loader.")
@click.option("--loader", default="resident", show_default=True, help="Backend for the loader rows.")
@click.option("--workers", type=click.IntRange(1), default=None, help="Loader workers.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="torch's CPU threads [default: as `cornpipe train` chooses them].")
@click.option("--warmup-steps", type=click.IntRange(1), default=5, show_default=True,
              help="Timed apart from steady state (compilation happens here).")
@click.option("--seconds", type=click.FloatRange(0, min_open=True), default=5.0, show_default=True,
              help="Timed window.")
@click.option("--steps", type=click.IntRange(1), default=None, help="Steps per window instead of --seconds.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True, help="Windows per variant.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--timeout", "timeout_s", type=click.FloatRange(1), default=900.0, show_default=True,
              help="Seconds allowed for one variant.")
@click.option("--json", "json_path", type=_OUT_FILE, default=None, help="Write the results here.")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
def train_command(model: str | None, image_size: int, batch_size: int | None, device: str, variants: str,
                  data: str | None, shards: Path | None, loader: str, workers: int | None, threads: int | None,
                  warmup_steps: int,
                  seconds: float, steps: int | None, repeats: int, seed: int, timeout_s: float,
                  json_path: Path | None, log_dir: Path | None) -> None:
    """Training-step images/s of each speed variant.

    Variants: eager-fp32, channels_last, amp (fp16 on CUDA, bf16 on CPU), compile, all (the three
    together). Synthetic tensors on the device, and with --shards a real loader too (data-wait
    share). Reported as ratios to eager-fp32; compile time apart from the steady state.
    """
    from cornpipe.bench.machine import machine_facts
    from cornpipe.bench.tables import train_table
    from cornpipe.bench.train_bench import TrainBenchConfig, parse_variants, run_train_bench
    from cornpipe.loaders.base import BACKENDS
    from cornpipe.models import check_model_name

    names = parse_variants(variants)
    if model is not None:
        check_model_name(model)  # a built-in name or timm:NAME
    if loader not in BACKENDS:
        raise CornpipeError(f"unknown loader {loader!r}; choose from {', '.join(BACKENDS)}")
    datas = None if data is None else (["synthetic", "loader"] if data == "both" else [data])
    cfg = TrainBenchConfig(model=model, image_size=image_size, batch_size=batch_size, device=device,
                           warmup_steps=warmup_steps, seconds=seconds, steps=steps, repeats=repeats,
                           shards=str(shards) if shards else None, loader=loader, workers=workers,
                           threads=threads, seed=seed, timeout_s=timeout_s)
    summary = run_train_bench(cfg, names, datas=datas, log_dir=log_dir, echo=_echo,
                              partial=_writer(json_path, (shards,)))
    summary["machine"] = machine_facts()
    _finish(summary, train_table(summary), json_path)
