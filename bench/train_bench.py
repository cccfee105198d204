"""`cornpipe bench train`: training-step throughput of one model under each speed variant.

Variants (VARIANTS): `eager-fp32`, `channels_last`, `amp` (FP16 autocast + GradScaler on CUDA,
BF16 autocast on CPU), `compile` (torch.compile), and `all` (the three together, what `cornpipe
train` does on CUDA). Each variant runs in a fresh process (`bench.isolate`): a compiled graph,
cuDNN's autotuning and the CUDA caching allocator never leak from one row into the next.

The step is the trainer's own (`runs.optim.optimizer_step`, without the trainer's
progress bars and metric collection): autocast forward, float32 loss (`models.losses.MultiTaskLoss`), backward through the
GradScaler, gradient clipping, the once-a-step finite-loss check (a device sync, as in training),
an AdamW step from `make_optimizer`. Data is either synthetic tensors already on the device
(the model's own speed) or a real loader (`--shards`, `--loader`), which adds the data-wait share:
the fraction of wall time spent waiting for the next batch (host side), and, when the same variant
also ran on synthetic tensors, `ratio_vs_synthetic` (which also counts on-device augmentation time).

Timing: the first `warmup_steps` steps are timed separately (`first_steps_s`: with `compile` this
is where compilation happens; `compile_s` is that time minus the same number of steady steps);
then `repeats` windows of `seconds` (or `steps`) each, timed with CUDA events on a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from statistics import median
from typing import TYPE_CHECKING, Any

from cornpipe.bench.isolate import run_isolated
from cornpipe.errors import BenchError, LoaderError
from cornpipe.grades import DEFAULT_GRADE_SCALE
from cornpipe.loaders.base import DEFAULT_IMAGE_SIZE

if TYPE_CHECKING:
    from cornpipe.runs.build import Run

VARIANTS: dict[str, tuple[bool, bool, bool]] = {  # name -> (channels_last, amp, compile)
    "eager-fp32": (False, False, False),
    "channels_last": (True, False, False),
    "amp": (False, True, False),
    "compile": (False, False, True),
    "all": (True, True, True),
}
BASELINE = "eager-fp32"
SYNTHETIC = "synthetic"
DEFAULT_POSITIONS = 3
DEFAULT_SCALE: tuple[float, ...] = tuple(float(g) for g in DEFAULT_GRADE_SCALE)


@dataclass(frozen=True)
class TrainBenchConfig:
    model: str | None = None  # None = resnet_plus50 on CUDA, resnet_plus18 on CPU
    image_size: int = DEFAULT_IMAGE_SIZE  # px
    batch_size: int | None = None  # None = 256 on CUDA, 16 on CPU
    device: str = "auto"
    warmup_steps: int = 5  # timed separately (compilation happens here)
    seconds: float | None = 5.0  # per timed window (ignored when steps is set)
    steps: int | None = None  # steps per timed window
    repeats: int = 3  # timed windows per variant
    shards: str | None = None  # a shard set: adds rows fed by a real loader
    loader: str = "resident"  # backend for those rows
    workers: int | None = None  # loader workers; None = the backend's default
    threads: int | None = None  # torch's CPU threads; None = the trainer's rule (runs.build.auto_threads)
    data: str = SYNTHETIC  # synthetic | loader (set per run by the parent)
    lr: float = 1e-3
    seed: int = 0
    timeout_s: float = 900.0  # per child process


def resolve(cfg: TrainBenchConfig) -> TrainBenchConfig:
    """Fill in device, model and batch size for this machine."""
    import torch

    from cornpipe.runs.config import resolve_device

    device = resolve_device(cfg.device, torch.cuda.is_available())  # the trainer's "auto" rule
    cuda = device.startswith("cuda")
    return replace(cfg, device=device,
                   model=cfg.model or ("resnet_plus50" if cuda else "resnet_plus18"),
                   batch_size=cfg.batch_size or (256 if cuda else 16))


def parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise LoaderError(f"unknown variant {', '.join(unknown) or '(none)'}; choose from {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------
# child side


def _synthetic_batches(cfg: TrainBenchConfig, positions: int, scale: list[float], dtype: Any,
                       channels_last: bool) -> Iterator[tuple[Any, Any, Any]]:
    import torch

    gen = torch.Generator().manual_seed(cfg.seed)
    b, s = cfg.batch_size, cfg.image_size
    images = torch.randn(b, 3, s, s, generator=gen).to(cfg.device, dtype)  # (B, 3, H, W), on device
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    position = torch.randint(0, positions, (b,), generator=gen).to(cfg.device)  # (B,) int64
    grade = torch.tensor(scale)[torch.randint(0, len(scale), (b,), generator=gen)].to(cfg.device)  # (B,)
    while True:
        yield images, position, grade


def _loader_batches(loader: Any) -> Iterator[tuple[Any, Any, Any]]:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            yield batch.images, batch.position, batch.grade  # in the memory format the run asked for
        epoch += 1


def variant_run(variant: str, cfg: TrainBenchConfig, positions: int, scale: list[float]) -> Run:
    """The variant as a training run (cornpipe.runs.build): model, loss, memory format and AMP dtype
    decided as `cornpipe train` decides them. `amp`: FP16 on CUDA, BF16 on the CPU."""
    from cornpipe.runs.build import build_run
    from cornpipe.runs.config import TrainConfig

    channels_last, amp, compile_ = VARIANTS[variant]
    cuda = cfg.device.startswith("cuda")
    train_cfg = TrainConfig(model=cfg.model, image_size=cfg.image_size, batch_size=cfg.batch_size, device=cfg.device,
                            amp=("fp16" if cuda else "bf16") if amp else "off", compile=compile_,
                            channels_last=channels_last, loader=cfg.loader, workers=cfg.workers, seed=cfg.seed,
                            lr=cfg.lr, oversample="none", threads=cfg.threads)
    return build_run(train_cfg, [str(i) for i in range(positions)], scale)


def _timed_windows(step: Callable[[], float], cfg: TrainBenchConfig,
                   device: Any) -> tuple[float, list[float], list[float]]:
    """(seconds of the first warmup_steps steps, images/s of each timed window, data-wait share of each).
    `step()` runs one training step and returns its seconds waiting for data."""
    import torch

    cuda = device.type == "cuda"
    start = time.perf_counter()
    for _ in range(cfg.warmup_steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    first_steps_s = time.perf_counter() - start
    windows, waits = [], []
    for _ in range(cfg.repeats):
        steps, wait = 0, 0.0
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        t0 = time.perf_counter()
        while True:
            wait += step()
            steps += 1
            if cfg.steps is not None:
                if steps >= cfg.steps:
                    break
            elif time.perf_counter() - t0 >= (cfg.seconds or 0.0):
                break
        if cuda:
            end.record()
            end.synchronize()
            elapsed = begin.elapsed_time(end) / 1000.0
        else:
            elapsed = time.perf_counter() - t0
        windows.append(steps * cfg.batch_size / elapsed)
        waits.append(wait / elapsed)
    return first_steps_s, windows, waits


def measure_variant(variant: str, cfg: TrainBenchConfig) -> dict[str, Any]:
    """Steady-state images/s of one variant (runs in the calling process)."""
    import torch

    from cornpipe.runs.optim import FiniteWatch, make_optimizer, optimizer_step

    cfg = resolve(cfg)
    torch.manual_seed(cfg.seed)
    shards = None
    positions, scale = DEFAULT_POSITIONS, list(DEFAULT_SCALE)
    if cfg.data != SYNTHETIC:
        from cornpipe.shards.shard_set import ShardSet

        shards = ShardSet(cfg.shards)
        positions, scale = len(shards.positions), [float(g) for g in shards.grade_scale]
    run = variant_run(variant, cfg, positions, scale)
    channels_last, compile_, amp_dtype = run.cfg.channels_last, run.cfg.compile, run.amp_dtype
    device = run.device
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # as the trainer: fixed input size

    loader = None
    if shards is not None:
        from cornpipe.loaders import make_loader

        # the trainer's loader request: its device, memory format, normalisation, float32 batches when amp is off
        loader = make_loader(shards, "train", **run.loader_fields(), oversample=run.cfg.oversample,
                             drop_last=shards.count("train") > cfg.batch_size)
        if len(loader) == 0:
            raise LoaderError(f"{cfg.shards}: no batch of {cfg.batch_size} in the train split")

    model = run.model
    step_model = torch.compile(model) if compile_ else model
    loss_fn = run.loss_fn
    optimizer = make_optimizer(model, run.cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if loader is None:
        in_dtype = run.loader_fields()["dtype"]  # what the run's loader would deliver
        batches = _synthetic_batches(cfg, positions, scale, in_dtype, channels_last)
    else:
        batches = _loader_batches(loader)
    model.train()

    def step() -> float:
        """One training step; returns the seconds spent waiting for data."""
        t0 = time.perf_counter()
        images, position, grade = next(batches)
        wait = time.perf_counter() - t0
        optimizer_step(step_model, model, images, position, grade, loss_fn, optimizer, scaler, amp_dtype,
                       run.cfg.grad_clip, watch=watch)  # no device sync per step, as in the trainer
        return wait

    watch = FiniteWatch(device, every=2**62)  # read once, after the timed steps
    try:
        first_steps_s, windows, waits = _timed_windows(step, cfg, device)
    finally:
        if loader is not None:
            loader.close()
    if watch.first_bad(final=True) is not None:
        raise BenchError(f"{variant}: non-finite loss in the benchmark step")
    step_s = cfg.batch_size / sorted(windows)[len(windows) // 2]
    result: dict[str, Any] = {
        "variant": variant, "data": cfg.data if loader is None else f"{cfg.loader} loader",
        "device": cfg.device, "model": cfg.model, "image_size": cfg.image_size,
        "batch_size": cfg.batch_size, "channels_last": channels_last, "compile": compile_,
        "threads": torch.get_num_threads(),  # as the trainer sets them (runs.build.set_threads)
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else None,
        "repeats": windows, "data_wait_shares": waits,
        "first_steps_s": first_steps_s, "warmup_steps": cfg.warmup_steps,
        # what the first steps cost beyond steady-state steps: compilation, autotuning, allocation
        "compile_s": max(0.0, first_steps_s - cfg.warmup_steps * step_s) if compile_ else None,
        "startup_extra_s": max(0.0, first_steps_s - cfg.warmup_steps * step_s),
        "step_ms": step_s * 1000,
    }
    if cuda:
        result["gpu_peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 1024**2
        result["gpu"] = torch.cuda.get_device_name(device)
        # "fp32" convolutions run as TF32 on Tensor Cores by default (Ampere and newer): say so
        result["tf32"] = {"cudnn": torch.backends.cudnn.allow_tf32,
                          "matmul": torch.backends.cuda.matmul.allow_tf32}
    return result


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    return measure_variant(spec["variant"], TrainBenchConfig(**spec["config"]))


# ---------------------------------------------------------------------------------------------
# parent side


def run_train_bench(cfg: TrainBenchConfig, variants: list[str], *, datas: list[str] | None = None,
                    log_dir: Any = None, echo: Any = print,
                    partial: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every variant on each data source: "synthetic" tensors and/or the "loader" (needs cfg.shards).

    `datas` None = synthetic, plus loader when cfg.shards is set."""
    cfg = resolve(cfg)
    if datas is None:
        datas = [SYNTHETIC] + (["loader"] if cfg.shards else [])
    if "loader" in datas and not cfg.shards:
        raise LoaderError("loader rows need a shard set: pass --shards DIR")
    results: list[dict[str, Any]] = []
    for data in datas:
        for variant in variants:
            run_cfg = replace(cfg, data=data)
            label = f"train-{variant}-{data}"
            try:
                out = run_isolated("cornpipe.bench.train_bench", {"variant": variant, "config": asdict(run_cfg)},
                                   timeout_s=cfg.timeout_s, label=label, log_dir=log_dir)
            except BenchError as exc:
                echo(f"  {variant} ({data}): FAILED: {exc}")
                results.append({"variant": variant, "data": data if data == SYNTHETIC else f"{cfg.loader} loader",
                                "device": cfg.device, "model": cfg.model, "error": str(exc)})
                continue
            rates = out["repeats"]
            out.update(images_per_s=median(rates), images_per_s_min=min(rates), images_per_s_max=max(rates),
                       data_wait_share=median(out["data_wait_shares"]))
            echo(f"  {variant:<14} {out['data']:<18} {out['images_per_s']:9.1f} images/s "
                 f"(first {cfg.warmup_steps} steps {out['first_steps_s']:.1f} s)")
            results.append(out)
            if partial is not None:  # what is measured survives a later crash or time limit
                partial(_with_ratios(cfg, variants, results))
    return _with_ratios(cfg, variants, results)


def _with_ratios(cfg: TrainBenchConfig, variants: list[str], results: list[dict[str, Any]]) -> dict[str, Any]:
    for row in results:
        base = next((r for r in results if r["variant"] == BASELINE and r["data"] == row["data"]
                     and "error" not in r), None)
        ok = base is not None and "error" not in row
        row["ratio_vs_eager"] = row["images_per_s"] / base["images_per_s"] if ok else None
        if row["data"] != SYNTHETIC:
            # the loader's whole cost, including GPU time of on-device augmentation that the
            # host-side data-wait share cannot see: images/s fed by it / images/s on synthetic tensors
            same = next((r for r in results if r["variant"] == row["variant"] and r["data"] == SYNTHETIC
                         and "error" not in r), None)
            ok = same is not None and "error" not in row
            row["ratio_vs_synthetic"] = row["images_per_s"] / same["images_per_s"] if ok else None
    return {"config": asdict(cfg), "variants": variants, "results": results}


if __name__ == "__main__":  # a child of bench.isolate.run_isolated
    from cornpipe.bench.isolate import child_main

    child_main(_measure)
