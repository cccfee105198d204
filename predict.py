"""`cornpipe predict` and `cornpipe.load_model`: position and grade for new images, with a trained model.

    from cornpipe import load_model
    model = load_model("runs/r1")                  # a run folder (its best.pt) or a checkpoint file
    rows = model.predict(["a.jpg", pil_image, array], tta=True)

Each image goes through what a validation image went through: convert's decode (EXIF orientation,
RGB repairs) and resize of the longest side to the shard set's max_resolution, its JPEG encoding at
the same quality, then the loaders' validation transform (resize + centre crop to the run's image
size, normalise). Optional TTA averages the prediction with the horizontally flipped image.

The probabilities are calibrated: the position logits are divided by the temperature fitted on the run's
validation (best.pt data["calibration"], cornpipe.runs.calibration) before the softmax; `raw=True`
(`cornpipe predict --raw-probs`) gives the uncalibrated softmax. The predicted class is the same either way.

A row (a dict; `cornpipe predict` writes one CSV line of it per image) has the prediction columns of
val_predictions.csv: path (None for an in-memory image), position_pred, prob_<class>... (softmax),
grade_pred (the model's output in scale units), grade_pred_level (snapped to the nearest scale level),
error (None unless the file could not be read; then the prediction columns are None). An unreadable
file never stops the others.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cornpipe.errors import CornpipeError
from cornpipe.models.metrics import snap_to_scale
from cornpipe.runs import evaluation
from cornpipe.runs.build import Run, model_checkpoint, run_from_checkpoint
from cornpipe.runs.calibration import temperature_of
from cornpipe.runs.checkpoint import load_checkpoint
from cornpipe.runs.inference_input import load_for_inference, pixels_for_inference  # noqa: F401  (predict's names)
from cornpipe.shards.atomic import check_can_create, check_not_an_input, check_own_file, write_atomically
from cornpipe.shards.files import NotRegularFile, printable
from cornpipe.shards.imageio import IMAGE_EXTENSIONS, ImageRejected

ImageInput = str | Path | Image.Image | np.ndarray  # a file, a PIL image, or HxWx3 uint8 RGB pixels


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


def _batches(files: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(files), size):
        yield files[i:i + size]


def prediction_columns(positions: Sequence[str]) -> list[str]:
    """A row's keys, predict's CSV header: path, val_predictions.csv's predicted columns (its one naming), error."""
    predicted = [c for c in evaluation.prediction_columns(positions)
                 if c not in evaluation.SAMPLE_COLUMNS and not c.endswith("_true")]
    return ["path", *predicted, "error"]


class Model:
    """A trained model ready to predict (load_model). `tta`, `batch_size`: predict()'s defaults."""

    def __init__(self, run: Run, convert_params: dict, *, source: str, tta: bool = False,
                 batch_size: int = 64, temperature: float = 1.0, raw: bool = False) -> None:
        self.run, self.convert_params, self.source = run, convert_params, source
        self.tta, self.batch_size = tta, batch_size
        self.temperature, self.raw = temperature, raw  # raw: predict()'s default for uncalibrated probabilities
        self.model = run.model.eval()
        self.positions, self.grade_scale = list(run.positions), list(run.grade_scale)
        self.columns = prediction_columns(self.positions)

    def __repr__(self) -> str:
        return (f"Model({self.source!r}, positions={self.positions}, grade_scale={self.grade_scale}, "
                f"temperature={self.temperature:.4g})")

    def predict(self, images: ImageInput | Sequence[ImageInput], *, tta: bool | None = None,
                batch_size: int | None = None, raw: bool | None = None) -> list[dict[str, Any]]:
        """One row per image, in order (see the module docstring); one image alone gives a list of one row.
        `raw`: the uncalibrated softmax instead of the temperature-scaled one."""
        if isinstance(images, (str, Path, Image.Image, np.ndarray)):
            images = [images]
        tta = self.tta if tta is None else tta
        temperature = 1.0 if (self.raw if raw is None else raw) else self.temperature
        rows: list[dict[str, Any]] = []
        for chunk in _batches(list(images), batch_size or self.batch_size):
            rows += self._predict_batch(chunk, tta, temperature)
        return rows

    def _predict_batch(self, chunk: Sequence[ImageInput], tta: bool, temperature: float) -> list[dict[str, Any]]:
        cfg, params = self.run.cfg, self.convert_params
        tensors, errors = [], {}
        for i, image in enumerate(chunk):
            try:
                if isinstance(image, (str, Path)):
                    tensors.append(load_for_inference(Path(image), params, cfg.image_size, self.run.normalization))
                else:
                    tensors.append(pixels_for_inference(image, params, cfg.image_size, self.run.normalization))
            except NotRegularFile as exc:  # a named pipe would block: never read
                errors[i] = exc.reason
            except (ImageRejected, OSError) as exc:
                errors[i] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if tensors:
            batch = torch.stack(tensors).to(self.run.device)  # (B, 3, S, S)
            if cfg.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            prob, grade = _infer(self.model, batch, tta, self.run.amp_dtype, temperature)
            levels = snap_to_scale(grade, self.grade_scale)
        rows, k = [], 0
        for i, image in enumerate(chunk):  # input order
            path = str(image) if isinstance(image, (str, Path)) else None
            if i in errors:
                rows.append({**dict.fromkeys(self.columns), "path": path, "error": errors[i]})
                continue
            row = {"path": path, "position_pred": self.positions[int(prob[k].argmax())]}
            row.update({f"prob_{name}": float(p) for name, p in zip(self.positions, prob[k], strict=True)})
            row.update(grade_pred=float(grade[k]), grade_pred_level=float(levels[k]), error=None)
            rows.append(row)
            k += 1
        return rows


def load_model(model: Path | str, *, device: str = "auto", tta: bool = False, batch_size: int = 64,
               raw: bool = False) -> Model:
    """A run folder (its best.pt) or a checkpoint, ready to predict: its inference weights (the EMA's when
    kept), normalisation, the shard set's decode settings and its calibration temperature. `tta`,
    `batch_size`, `raw` (uncalibrated probabilities): predict()'s defaults."""
    checkpoint = model_checkpoint(Path(model))
    state = load_checkpoint(checkpoint, purpose="predict")
    run = run_from_checkpoint(state, str(checkpoint), device=device, amp="auto", compile=False, channels_last=None)
    return Model(run, state["data"]["convert"], source=str(model), tta=tta, batch_size=batch_size,
                 temperature=temperature_of(state["data"]), raw=raw)


def _csv_text(key: str, value: Any) -> Any:
    """A row's value as predict's CSV writes it, as val_predictions.csv does: floats as float32's shortest
    round-trip text, a scale level as %g."""
    if key in ("path", "error") and isinstance(value, str):
        return printable(value)  # a file name that is not UTF-8, escaped: the CSV stays text
    if not isinstance(value, float):
        return value
    return f"{value:g}" if key == "grade_pred_level" else str(np.float32(value))


def predict(checkpoint: Path, inputs: Sequence[Path], out: Path, *, tta: bool = False, device: str = "auto",
            batch_size: int = 64, raw: bool = False) -> PredictSummary:
    """Write predictions for `inputs` (files and/or folders) to the CSV `out`; `checkpoint`: a checkpoint or
    a run folder. `raw`: the uncalibrated softmax probabilities."""
    if out.is_dir():
        raise CornpipeError(f"--out {out} is a folder; give the CSV file to write")
    check_can_create(out)  # before the checkpoint and the model load
    # `--out run/best.pt` must not replace the checkpoint; a CSV is replaced only when predict wrote it
    check_not_an_input([out], [model_checkpoint(Path(checkpoint)), *inputs])
    check_own_file(out, b"path,position_pred,", "a predictions CSV")
    model = load_model(checkpoint, device=device, tta=tta, batch_size=batch_size, raw=raw)

    files = image_files(inputs)
    if not files:
        raise CornpipeError("no image files found in the given inputs")
    check_not_an_input([out], files)  # `--out victim.jpg` must not truncate an image it reads
    out.parent.mkdir(parents=True, exist_ok=True)
    predicted = failed = 0
    with write_atomically(out, newline="") as f:  # a full disk leaves a previous CSV as it was
        writer = csv.DictWriter(f, model.columns)
        writer.writeheader()
        for chunk in _batches(files, batch_size):
            for row in model.predict(chunk):
                writer.writerow({k: _csv_text(k, v) for k, v in row.items()})
                failed += row["error"] is not None
                predicted += row["error"] is None
    return PredictSummary(out=out, predicted=predicted, failed=failed)


@torch.inference_mode()
def _infer(model: torch.nn.Module, images: torch.Tensor, tta: bool, dtype: torch.dtype | None,
           temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Softmax of logits / `temperature` (B, P) and grade (B,), averaged over the image and its mirror when
    `tta`."""
    views = [images, images.flip(3)] if tta else [images]
    probs, grades = [], []
    for view in views:
        with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(view)
        probs.append((out["position"].float() / temperature).softmax(dim=1))
        grades.append(out["grade"].float())
    prob = torch.stack(probs).mean(0).cpu().numpy()
    grade = torch.stack(grades).mean(0).cpu().numpy()
    return prob, grade
