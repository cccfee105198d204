"""`cornpipe bench loaders`: images/s of every loader backend, side by side, as ratios.

Plan: one *target* per table row (a backend over a shard set in one write mode, a *peer* (the
backend's own library used directly, `bench.peers`), or the torch baseline over the original image
folder). Each repeat is a round that runs every target once, each
in a fresh process (`bench.isolate`), so slow drift of a shared machine hits all rows alike; the
decode-only ceiling (`bench.ceiling`) is measured in the same rounds. Per row: the median over
rounds and the min-max spread, the ratio to the `torch` baseline over the same shards, the ratio to
the backend's peer (`× peer`), the fraction of the ceiling, and the peak memory of the process tree.

`--work same` (default) gives every row the peers' work: RandomResizedCrop + horizontal flip +
normalise (SAME_WORK on cornpipe's backends); `--work full` keeps cornpipe's default augmentation.

`--host-only` times what a host feeds a GPU: every row (backends with LoaderSpec dtype uint8, peers
with `host_only`) stops at (B, S, S, 3) uint8 crops on the CPU -- the geometry done, the colour jitter
and the normalisation left to the GPU -- so a CPU machine measures the rate a GPU would be fed. The
batches stay on the host: the device is the CPU whatever a GPU machine has.

In a child, one measurement is: build the loader, run the warm-up (the first epoch, at most
WARMUP_MAX_BATCHES batches, or --warmup-batches), then time whole batches for --seconds or
--epochs; on CUDA the clock stops after a synchronize, so queued asynchronous copies count.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cornpipe.bench.isolate import run_isolated
from cornpipe.bench.loader_summary import FOLDER, summarize
from cornpipe.bench.machine import usable_cores
from cornpipe.bench.peers import PEER_MODULE, PEER_OF, PEERS, build_peer, peer_unusable
from cornpipe.errors import BenchError, LoaderError, MissingDependency, install_hint
from cornpipe.loaders.base import BACKENDS, DEFAULT_IMAGE_SIZE, HOST_DTYPE, IMAGENET, AugmentConfig

WARMUP_MAX_BATCHES = 50
_MODULE = {"ffcv": "ffcv", "dali": "nvidia.dali", **PEER_MODULE}
_EXTRA = {"ffcv-native": "ffcv", "dali-native": "dali"}  # the pyproject extra a peer needs (else: pip install)
WORKS: tuple[str, ...] = ("same", "full", "both")  # both: each cornpipe backend once with each work
# --work same: what every peer does, and nothing more (no vertical flip, rot90 or colour jitter)
SAME_WORK = AugmentConfig(vflip=False, rot90=False, brightness=0.0, contrast=0.0, saturation=0.0)


@dataclass(frozen=True)
class LoaderBenchConfig:
    split: str = "train"
    batch_size: int = 64  # images per batch
    image_size: int = DEFAULT_IMAGE_SIZE  # output side, px
    device: str = "auto"  # auto = cuda when available
    workers: int | None = None  # loader workers/threads; None = every usable core
    oversample: str = "none"
    seed: int = 0
    seconds: float | None = 10.0  # timed window per repeat (ignored when epochs is set)
    epochs: int | None = None  # timed whole epochs per repeat
    warmup_batches: int | None = None  # None = the first epoch, at most WARMUP_MAX_BATCHES
    repeats: int = 3
    ceiling: bool = True
    ceiling_decoder: str = "pil"
    timeout_s: float = 900.0  # per child process
    work: str = "same"  # same: every row does SAME_WORK; full: cornpipe's backends keep their default augmentation;
    # both: a same and a full row per cornpipe backend, in every round (what the augmentation costs, in one run)
    peers: bool = True  # add each backend's peer row (bench.peers); the CLI's --peers/--no-peers
    host_only: bool = False  # uint8 (B, S, S, 3) crops on the CPU, no jitter or normalisation (the GPU's job)


@dataclass(frozen=True)
class Target:
    backend: str  # ffcv | dali | torch | resident
    mode: str  # jpg | raw | smart (the shard set's write mode) or "folder"
    root: str  # shard set, or the original image folder for mode "folder"
    work: str = ""  # "same" / "full" for the two rows of a backend under --work both; "" = the config's

    @property
    def label(self) -> str:
        return f"{self.backend}-{self.mode}" + (f"-{self.work}" if self.work else "")


@dataclass
class Row:
    target: Target
    device: str
    rates: list[float] = field(default_factory=list)  # images/s, one per repeat
    peak_rss_mb: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # the last repeat's details
    error: str | None = None


def backend_missing(backend: str) -> str | None:
    """Why `backend` cannot run here (its library is not installed), or None."""
    module = _MODULE.get(backend)
    if module is None:
        return None
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # parent package missing (nvidia)
        found = False
    if found:
        return None
    if backend == "torchvision":  # torchvision is a core dependency; the tars are read with webdataset
        return f"{module} is not installed: pip install {module}"
    lib = module.split(".")[-1] if backend in PEER_MODULE else backend
    return f"{lib} is not installed: {install_hint(_EXTRA.get(backend, backend))}"


def resolve_device(device: str, host_only: bool = False) -> str:
    """"auto" -> cuda when available, else cpu; a CUDA device without CUDA is a LoaderError.
    Host-only batches stay on the host: "auto" is the CPU then, and a CUDA device is refused."""
    import torch

    if host_only:
        if device not in ("auto", "cpu"):
            raise LoaderError(f"--host-only times uint8 batches on the host: use --device cpu or auto, not {device}")
        return "cpu"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    from cornpipe.loaders.common import resolve_device as check

    return str(check(device))


def _requested(requested: str | None) -> tuple[list[str], bool]:
    if requested is None:
        return list(BACKENDS), False
    names = [b.strip() for b in requested.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise LoaderError(f"unknown backend {', '.join(unknown) or '(none)'}; choose from {', '.join(BACKENDS)}")
    return names, True


def choose_peers(requested: str | None) -> tuple[list[str], list[str]]:
    """(peers of the requested backends to run, skip notes); a peer whose library is missing is skipped."""
    run, notes = [], []
    for backend in _requested(requested)[0]:
        peer = PEER_OF.get(backend)
        if peer is None:
            continue
        missing = backend_missing(peer)
        if missing:
            notes.append(f"skipped peer {peer}: {missing}")
        else:
            run.append(peer)
    return run, notes


def choose_backends(requested: str | None) -> tuple[list[str], list[str]]:
    """(backends to run, skip notes). Unknown names and missing explicitly requested libraries raise."""
    names, explicit = _requested(requested)
    run, notes = [], []
    for name in names:
        missing = backend_missing(name)
        if missing and explicit:
            raise MissingDependency(missing)
        if missing:
            notes.append(f"skipped {missing}")
        else:
            run.append(name)
    return run, notes


def write_mode(root: Path) -> str:
    from cornpipe.shards.shard_set import ShardSet

    return str(ShardSet(root).manifest.get("params", {}).get("write_mode", "jpg"))


def plan_targets(shard_dirs: list[Path], backends: list[str], source: Path | None,
                 peers: tuple[str, ...] | list[str] = ()) -> list[Target]:
    """ffcv (and ffcv-native) once per write mode present (it reads the .beton); the tar readers once,
    on the first jpg-mode set (the tar shards hold JPEGs in every write mode); each peer right after
    its backend; `torch` over SOURCE last, and its peer `torchvision` over SOURCE when that peer runs."""
    modes: dict[str, Path] = {}
    for root in shard_dirs:
        modes.setdefault(write_mode(root), root)
    tar_root = modes.get("jpg", shard_dirs[0])
    targets = []
    for backend in backends:
        names = [backend] + [PEER_OF[backend]] if PEER_OF.get(backend) in peers else [backend]
        for name in names:
            if backend == "ffcv":
                targets += [Target(name, mode, str(root)) for mode, root in modes.items()]
            else:
                targets.append(Target(name, "jpg", str(tar_root)))
    if source is not None:
        targets.append(Target("torch", FOLDER, str(source)))
        if PEER_OF["torch"] in peers and "torch" in backends:
            targets.append(Target(PEER_OF["torch"], FOLDER, str(source)))
    return targets


def round_order(rows: list[Row], repeat: int) -> list[Row]:
    """The rows in the order round `repeat` runs them: as listed, except that every second round runs
    a backend's full row before its same row, so that a machine slowing down or speeding up over the
    run does not always favour the same one of the pair."""
    if repeat % 2 == 0:
        return list(rows)
    out = list(rows)
    for i in range(len(out) - 1):
        a, b = out[i], out[i + 1]
        if a.target.work == "same" and b.target == replace(a.target, work="full"):
            out[i], out[i + 1] = b, a
    return out


# ---------------------------------------------------------------------------------------------
# child side: one measurement


def _build_loader(target: Target, cfg: LoaderBenchConfig, device: str) -> Any:
    from cornpipe.loaders import FOLDER_BACKEND, make_loader

    if target.backend in PEERS:
        return build_peer(target.backend, target.root, split=cfg.split, batch_size=cfg.batch_size,
                          image_size=cfg.image_size, workers=cfg.workers or usable_cores(), device=device,
                          seed=cfg.seed, host_only=cfg.host_only, folder=target.mode == FOLDER)
    if cfg.work not in WORKS:
        raise LoaderError(f"unknown --work {cfg.work!r}; choose from {', '.join(WORKS)}")
    work = target.work or cfg.work
    augment = {"augment": SAME_WORK} if work in ("same", "both") and cfg.split == "train" else {}
    if cfg.host_only:  # (B, S, S, 3) uint8 crops on the host
        augment["dtype"] = HOST_DTYPE
    # the folder baseline reads the original images; split "train" is the same images as the
    # shard set's train split (convert's split, same seed and fraction) when every image converted
    backend, root = target.backend, target.root
    if target.mode == FOLDER:
        backend = FOLDER_BACKEND
        if Path(root).is_file():  # a survey described by a manifest CSV (path,position,grade), not folders
            root, augment = None, {**augment, "options": {"manifest_csv": target.root}}
    return make_loader(root, cfg.split, backend=backend, batch_size=cfg.batch_size,
                       image_size=cfg.image_size, device=device, oversample=cfg.oversample,
                       seed=cfg.seed, workers=cfg.workers, normalization=IMAGENET, **augment)


def _batches(loader: Any) -> Iterator[Any]:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def measure_loader(target: Target, cfg: LoaderBenchConfig) -> dict[str, Any]:
    """Images/s of one loader after warm-up (runs in the calling process)."""
    import torch

    device = resolve_device(cfg.device, cfg.host_only)
    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    start = time.perf_counter()
    loader = _build_loader(target, cfg, device)
    build_s = time.perf_counter() - start
    try:
        per_epoch = len(loader)
        if per_epoch == 0:
            raise LoaderError(f"{target.root}: no full batch of {cfg.batch_size} in split {cfg.split!r}")
        warmup = cfg.warmup_batches if cfg.warmup_batches is not None else min(per_epoch, WARMUP_MAX_BATCHES)
        batches = _batches(loader)
        first = next(batches)
        sync()
        first_batch_s = time.perf_counter() - start
        shape = list(first.images.shape)
        dtype = str(first.images.dtype).replace("torch.", "")
        for _ in range(max(0, warmup - 1)):
            next(batches)
        sync()
        want = cfg.epochs * per_epoch if cfg.epochs else None
        positions: list[torch.Tensor] = []
        images = count = 0
        t0 = time.perf_counter()
        deadline = t0 + (cfg.seconds or 0.0)
        while True:
            batch = next(batches)
            images += batch.images.shape[0]
            count += 1
            if cfg.oversample != "none":
                positions.append(batch.position)
            if (want is not None and count >= want) or (want is None and time.perf_counter() >= deadline):
                break
        sync()
        elapsed = time.perf_counter() - t0
    finally:
        loader.close()
    result: dict[str, Any] = {
        "backend": target.backend, "mode": target.mode, "device": device, "images": images,
        "batches": count, "seconds": elapsed, "images_per_s": images / elapsed,
        "warmup_batches": warmup, "build_s": build_s, "first_batch_s": first_batch_s,
        "batches_per_epoch": per_epoch, "batch_shape": shape, "dtype": dtype,
    }
    if getattr(loader, "setup", ""):  # a peer's choice where it had one (bench.peers)
        result["setup"] = loader.setup
    spec = getattr(loader, "spec", None)  # what the backend really applied (peers: see bench.peers)
    if spec is not None:
        result["augment"] = asdict(spec.augment) if spec.augment is not None else None
    if positions:
        counts = torch.bincount(torch.cat([p.cpu() for p in positions])).tolist()
        total = sum(counts)
        result["class_counts"] = counts
        result["class_fractions"] = [c / total for c in counts]
    return result


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    return measure_loader(Target(**spec["target"]), LoaderBenchConfig(**spec["config"]))


# ---------------------------------------------------------------------------------------------
# parent side: rounds of fresh processes


def run_loader_bench(shard_dirs: list[Path], cfg: LoaderBenchConfig, *, backends: list[str],
                     source: Path | None = None, peers: list[str] | None = None, log_dir: Path | None = None, echo: Any = print,
                     partial: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every target `cfg.repeats` times (rounds) plus the ceiling; the JSON-ready summary.

    `peers`: peer rows to add (`choose_peers`), each run beside its backend."""
    device = resolve_device(cfg.device, cfg.host_only)
    cfg = replace(cfg, device=device, workers=cfg.workers or usable_cores())
    if peers and (cfg.oversample != "none" or cfg.split != "train"):  # peers do the train work, unweighted
        echo(f"skipped the peers: they time the train transform without oversampling (split {cfg.split}, "
             f"oversample {cfg.oversample})")
        peers = []
    targets = plan_targets(shard_dirs, backends, source, peers)
    if cfg.work == "both":  # each backend's same row and its full row, one after the other in every round
        targets = [replace(t, work=w) for t in targets for w in (("same",) if t.backend in PEERS else ("same", "full"))]
    for target in [t for t in targets if t.backend in PEERS and t.mode != FOLDER]:
        why = peer_unusable(target.backend, target.root, cfg.split)
        if why:
            echo(f"skipped peer {target.backend}: {why}")
            targets.remove(target)
    rows = [Row(t, device) for t in targets]
    ceiling_rates: list[float] = []
    ceiling_info: dict[str, Any] = {}
    # the tar shards hold JPEGs in every write mode; prefer a jpg-mode set (its .beton has the same bytes)
    jpg_root = next((str(r) for r in shard_dirs if write_mode(r) == "jpg"), str(shard_dirs[0]))
    ceiling_seconds = cfg.seconds if cfg.seconds else 5.0
    for repeat in range(cfg.repeats):
        for row in round_order(rows, repeat):
            if row.error:
                continue
            spec = {"target": asdict(row.target), "config": asdict(cfg)}
            try:
                out = run_isolated("cornpipe.bench.loader_bench", spec, timeout_s=cfg.timeout_s,
                                   label=f"{row.target.label}-r{repeat}", log_dir=log_dir)
            except BenchError as exc:
                row.error = str(exc)
                echo(f"  {row.target.label}: FAILED: {exc}")
                continue
            row.rates.append(out["images_per_s"])
            row.peak_rss_mb = max(row.peak_rss_mb, out.pop("peak_rss_mb"))
            row.extra = out
            echo(f"  round {repeat + 1}/{cfg.repeats} {row.target.label:<16} {out['images_per_s']:9.1f} images/s")
        if cfg.ceiling and "error" not in ceiling_info:
            spec = {"root": jpg_root, "split": cfg.split, "workers": cfg.workers,
                    "seconds": ceiling_seconds, "decoder": cfg.ceiling_decoder}
            try:
                out = run_isolated("cornpipe.bench.ceiling", spec, timeout_s=cfg.timeout_s,
                                   label=f"ceiling-r{repeat}", log_dir=log_dir)
                ceiling_rates.append(out["images_per_s"])
                ceiling_info = {**out, "peak_rss_mb": max(out["peak_rss_mb"], ceiling_info.get("peak_rss_mb", 0))}
                echo(f"  round {repeat + 1}/{cfg.repeats} {'ceiling':<16} {out['images_per_s']:9.1f} images/s")
            except BenchError as exc:
                ceiling_info = {"error": str(exc)}
                echo(f"  ceiling: FAILED: {exc}")
        if partial is not None:  # what is measured survives a later crash or time limit
            partial(summarize(rows, cfg, ceiling_rates, ceiling_info, shard_dirs))
    return summarize(rows, cfg, ceiling_rates, ceiling_info, shard_dirs)


if __name__ == "__main__":  # a child of bench.isolate.run_isolated
    from cornpipe.bench.isolate import child_main

    child_main(_measure)
