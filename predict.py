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
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cornpipe.errors import CornpipeError
from cornpipe.loaders.augment import val_preprocess
from cornpipe.loaders.base import AugmentConfig, Normalization
from cornpipe.models.metrics import snap_to_scale
from cornpipe.runs.build import run_from_checkpoint
from cornpipe.runs.checkpoint import load_checkpoint
from cornpipe.shards.atomic import check_can_create, check_not_an_input, check_own_file, write_atomically
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


def load_for_inference(path: Path, convert_params: dict, image_size: int, norm: Normalization) -> torch.Tensor:
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
    check_not_an_input([out], [checkpoint, *inputs])  # `--out run/best.pt` must not replace the checkpoint
    check_own_file(out, b"path,position,", "a predictions CSV")
    state = load_checkpoint(checkpoint, purpose="predict")
    run = run_from_checkpoint(state, str(checkpoint), device=device, amp="auto", compile=False, channels_last=None)
    cfg, data, dev, dtype = run.cfg, state["data"], run.device, run.amp_dtype
    positions, grade_scale = list(run.positions), list(run.grade_scale)
    model = run.model.eval()

    files = image_files(inputs)
    if not files:
        raise CornpipeError("no image files found in the given inputs")
    check_not_an_input([out], files)  # `--out victim.jpg` must not truncate an image it reads
    out.parent.mkdir(parents=True, exist_ok=True)
    predicted = failed = 0
    with write_atomically(out, newline="") as f:  # a full disk leaves a previous CSV as it was
        writer = csv.writer(f)
        writer.writerow(["path", "position", *(f"p_{name}" for name in positions), "grade_raw", "grade", "error"])
        for chunk in _batches(files, batch_size):
            tensors, ok, errors = [], [], {}
            for path in chunk:
                try:
                    tensors.append(load_for_inference(path, data["convert"], cfg.image_size, run.normalization))
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
