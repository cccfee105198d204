"""Where the `ffcv` backend's time goes, beside FFCV's own pipeline doing the same work (issue 12).

    python -m cornpipe.bench.profile_ffcv SHARDS [--image-size 224] [--batch-size 64] [--workers 2]

The work is `bench loaders --work same`: RandomResizedCrop (scale 0.35-1) to S px + horizontal flip +
normalise to float32 NCHW, over the train split's .beton. Two parts, both in this process:

1. stages (bench/profile_ffcv_stages.py) -- each step alone, on one thread, over the split's images, with the crop boxes each side
   draws (cornpipe: loaders.pixels.params' sampler; FFCV: its decoder's get_random_crop), in microseconds
   per image (the best of --repeats passes over every image, in batches of --batch-size):
   read (bytes out of the memory map), decode (libjpeg-turbo), crop-resize (cv::resize INTER_AREA),
   flip, normalise, NCHW copy, fresh output memory (first touch of newly allocated pages: per batch
   for the before path's outputs, per epoch for FFCV's own slot buffers, whose cost depends on the
   epoch's length), labels (cornpipe: labels_for + Batch per batch; FFCV: its int/float decoders).
   "ffcv before" is the uint8 + loaders.pixels.finish path (option fuse=False), "ffcv now" the decoder
   that normalises (the default on a CPU without colour jitter), "ffcv-native" bench.peers' pipeline.
2. pipelines -- each loader end to end with --workers threads, alternating for --rounds rounds of
   --seconds: images/s, process CPU time per image, and per image the FFCV epoch thread's wall time
   in its pipeline, the main thread's wait on FFCV's queue, and the main thread's own work. "ffcv
   fuse=False" is today's uint8 + loaders.pixels.finish path (jitter, CUDA and host-only batches take it).
Timings on a shared machine are noisy: compare columns of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cornpipe.bench.profile_ffcv_stages import SIDES, STAGES, profile_stages

PIPELINES = ("ffcv", "ffcv fuse=False", "ffcv-native")


# ---------------------------------------------------------------------------------------------
# part 2: the pipelines, end to end


@dataclass
class _Clock:
    """Seconds the FFCV epoch thread spends in its pipeline and the consumer waits on its queue."""

    pipeline: float = 0.0
    wait: float = 0.0
    batches: list[int] = field(default_factory=list)


def _instrument() -> _Clock:
    from ffcv.loader.epoch_iterator import EpochIterator

    clock = _Clock()
    run_pipeline, next_ = EpochIterator.run_pipeline, EpochIterator.__next__

    def timed_pipeline(self, *args, **kw):
        start = time.perf_counter()
        try:
            return run_pipeline(self, *args, **kw)
        finally:
            clock.pipeline += time.perf_counter() - start

    def timed_next(self):
        start = time.perf_counter()
        try:
            return next_(self)
        finally:
            clock.wait += time.perf_counter() - start

    EpochIterator.run_pipeline, EpochIterator.__next__ = timed_pipeline, timed_next
    return clock


def _build(name: str, root: Path, size: int, batch: int, workers: int) -> Any:
    from cornpipe.bench.loader_bench import SAME_WORK
    from cornpipe.bench.peers import build_peer
    from cornpipe.loaders import make_loader
    from cornpipe.loaders.base import IMAGENET

    if name == "ffcv-native":
        return build_peer("ffcv-native", str(root), split="train", batch_size=batch, image_size=size,
                          workers=workers, device="cpu", seed=0)
    options = {"fuse": name == "ffcv"}
    return make_loader(root, "train", backend="ffcv", batch_size=batch, image_size=size, workers=workers,
                       device="cpu", augment=SAME_WORK, options=options, oversample="none", normalization=IMAGENET)


def profile_pipelines(root: Path, size: int, batch: int, workers: int, seconds: float,
                      rounds: int) -> dict[str, list[dict[str, float]]]:
    clock = _instrument()
    loaders = {name: _build(name, root, size, batch, workers) for name in PIPELINES}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in PIPELINES}
    try:
        for lo in loaders.values():  # warm-up: JIT compiles, page cache
            for _ in _take(lo, 2 * len(lo)):
                pass
        for _ in range(rounds):
            for name, lo in loaders.items():
                clock.pipeline = clock.wait = 0.0
                cpu0, t0 = _cpu(), time.perf_counter()
                images = 0
                for b in _take(lo, None, deadline=t0 + seconds):
                    images += b.images.shape[0]
                wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
                results[name].append({
                    "images_per_s": images / wall, "cpu_us": cpu / images * 1e6,
                    "pipeline_us": clock.pipeline / images * 1e6, "wait_us": clock.wait / images * 1e6,
                    "main_work_us": (wall - clock.wait) / images * 1e6})
    finally:
        for lo in loaders.values():
            lo.close()
    return results


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _take(loader: Any, count: int | None, deadline: float | None = None):
    epoch, done = 0, 0
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            yield batch
            done += 1
            if (count is not None and done >= count) or (deadline is not None and time.perf_counter() >= deadline):
                return
        epoch += 1


# ---------------------------------------------------------------------------------------------


def _print_stages(stages: dict[str, dict[str, float]]) -> None:
    print(f"stages, µs per image, one thread ({stages['_notes']['images']} images)")
    print(f"{'stage':<26}" + "".join(f"{s:>15}" for s in SIDES))
    for stage in STAGES:
        print(f"{stage:<26}" + "".join(f"{stages[s].get(stage, float('nan')):>15.1f}" for s in SIDES))
    print(f"{'sum':<26}" + "".join(f"{sum(stages[s].values()):>15.1f}" for s in SIDES))
    print(f"notes: {stages['_notes']}")


def _print_pipelines(results: dict[str, list[dict[str, float]]]) -> None:
    keys = ("images_per_s", "cpu_us", "pipeline_us", "wait_us", "main_work_us")
    print("pipelines (median of rounds; µs per image: CPU of the process, FFCV thread in its pipeline, "
          "main thread waiting on the queue, main thread's own work)")
    print(f"{'loader':<16}" + "".join(f"{k:>14}" for k in keys))
    for name, rows in results.items():
        print(f"{name:<16}" + "".join(f"{float(np.median([r[k] for r in rows])):>14.1f}" for k in keys))
    base = float(np.median([r["images_per_s"] for r in results["ffcv-native"]]))
    for name in PIPELINES[:2]:
        rate = float(np.median([r["images_per_s"] for r in results[name]]))
        print(f"{name} × ffcv-native: {rate / base:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cornpipe.bench.profile_ffcv", description=__doc__.split("\n")[0])
    parser.add_argument("shards", type=Path, help="a shard set with .beton files")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=512, help="images of the stage timings (at most the split)")
    parser.add_argument("--repeats", type=int, default=5, help="passes per stage (the best counts)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per pipeline and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip", choices=("stages", "pipelines"), help="leave one part out")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {}
    if args.skip != "stages":
        report["stages"] = profile_stages(args.shards, args.image_size, args.batch_size, args.repeats, args.images)
        _print_stages(report["stages"])
    if args.skip != "pipelines":
        report["pipelines"] = profile_pipelines(args.shards, args.image_size, args.batch_size, args.workers,
                                                args.seconds, args.rounds)
        _print_pipelines(report["pipelines"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
