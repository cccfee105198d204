"""`cornpipe predict`: position and grade for new images, with a trained checkpoint.

Each image goes through what a validation image went through: convert's decode (EXIF orientation,
RGB repairs) and resize of the longest side to the shard set's max_resolution, its JPEG encoding at
the same quality, then the loaders' validation transform (resize + centre crop to the run's image
size, normalise). Optional TTA averages the prediction with the horizontally flipped image.

CSV columns: path, position, p_<class>... (softmax), grade_raw (the model's output in scale
units), grade (snapped to the nearest scale level), error (empty unless the image could not be
read; then the prediction columns are empty). An unreadable image never stops the others.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cornpipe.errors import CornpipeError
from cornpipe.loaders.base import IMAGENET, AugmentConfig, Normalization
from cornpipe.loaders.pixels.augment import val_preprocess
from cornpipe.models import create_model
from cornpipe.models.metrics import snap_to_scale
from cornpipe.runs.checkpoint import inference_weights, load_checkpoint
from cornpipe.runs.config import TrainConfig, resolve_runtime
from cornpipe.shards.atomic import check_can_create
from cornpipe.shards.imageio import IMAGE_EXTENSIONS, ImageRejected, encode_jpeg, prepare_image


@dataclass(frozen=True)
class PredictSummary:
    out: Path
    predicted: int  # rows with a prediction
    failed: int  # rows with an error


def image_files(inputs: Sequence[Path]) -> list[Path]:
    """Files as given, plus every image file under each directory (recursive, sorted)."""
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                            and not any(part.startswith(".") for part in p.relative_to(item).parts))
        else:
            files.append(item)
    return files


def load_for_inference(path: Path, convert_params: dict, image_size: int,
                       norm: Normalization = IMAGENET) -> torch.Tensor:
    """One image file -> (3, S, S) float32, normalised as in training; ImageRejected/OSError when unreadable."""
    prepared = prepare_image(path.read_bytes(), max_resolution=int(convert_params["max_resolution"]))
    jpeg = encode_jpeg(prepared.pixels, int(convert_params["jpeg_quality"]))  # what the shards hold
    with Image.open(io.BytesIO(jpeg)) as image:
        return val_preprocess(image.convert("RGB"), image_size, AugmentConfig().val_crop_fraction, norm)


def _batches(files: list[Path], size: int) -> Iterator[list[Path]]:
    for i in range(0, len(files), size):
        yield files[i:i + size]


def predict(checkpoint: Path, inputs: Sequence[Path], out: Path, *, tta: bool = False, device: str = "auto",
            batch_size: int = 64) -> PredictSummary:
    """Write predictions for `inputs` (files and/or folders) to the CSV `out`."""
    if out.is_dir():
        raise CornpipeError(f"--out {out} is a folder; give the CSV file to write")
    check_can_create(out)  # before the checkpoint and the model load
    state = load_checkpoint(checkpoint)
    saved = TrainConfig.from_dict(state["config"], source=str(checkpoint))
    cfg = resolve_runtime(dataclasses.replace(saved, device=device, amp="auto", compile=False, channels_last=None),
                          torch.cuda.is_available())
    data = state["data"]
    positions, grade_scale = list(data["positions"]), list(data["grade_scale"])
    saved = data.get("normalization")  # a pretrained trunk's own statistics (runs before it: ImageNet's)
    norm = Normalization(tuple(saved["mean"]), tuple(saved["std"])) if saved else IMAGENET
    model = create_model(cfg.model, num_positions=len(positions), grade_scale=grade_scale,
                         grade_head=cfg.grade_head)
    model.load_state_dict(inference_weights(state))
    dev = torch.device(cfg.device)
    model = model.to(dev).eval()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dtype = torch.float16 if cfg.amp == "fp16" else None

    files = image_files(inputs)
    if not files:
        raise CornpipeError("no image files found in the given inputs")
    out.parent.mkdir(parents=True, exist_ok=True)
    predicted = failed = 0
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "position", *(f"p_{name}" for name in positions), "grade_raw", "grade", "error"])
        for chunk in _batches(files, batch_size):
            tensors, ok, errors = [], [], {}
            for path in chunk:
                try:
                    tensors.append(load_for_inference(path, data["convert"], cfg.image_size, norm))
                    ok.append(path)
                except (ImageRejected, OSError) as exc:
                    errors[path] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if tensors:
                images = torch.stack(tensors).to(dev)  # (B, 3, S, S)
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                prob, grade = _infer(model, images, tta, dtype)
                snapped = snap_to_scale(grade, grade_scale)
            rows = {p: i for i, p in enumerate(ok)}
            for path in chunk:  # input order
                if path in errors:
                    writer.writerow([str(path), *[""] * (len(positions) + 3), errors[path]])
                    failed += 1
                    continue
                i = rows[path]
                writer.writerow([str(path), positions[int(prob[i].argmax())], *(f"{p:.6f}" for p in prob[i]),
                                 f"{grade[i]:.4f}", f"{snapped[i]:g}", ""])
                predicted += 1
    return PredictSummary(out=out, predicted=predicted, failed=failed)


@torch.inference_mode()
def _infer(model: torch.nn.Module, images: torch.Tensor, tta: bool,
           dtype: torch.dtype | None) -> tuple[np.ndarray, np.ndarray]:
    """Softmax (B, P) and grade (B,), averaged over the image and its mirror when `tta`."""
    views = [images, images.flip(3)] if tta else [images]
    probs, grades = [], []
    for view in views:
        with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(view)
        probs.append(out["position"].float().softmax(dim=1))
        grades.append(out["grade"].float())
    prob = torch.stack(probs).mean(0).cpu().numpy()
    grade = torch.stack(grades).mean(0).cpu().numpy()
    return prob, grade
