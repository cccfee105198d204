"""`cornpipe explain` and the report's activation-map panel: what part of the photo a position call rests on.

explain(MODEL, files, DIR) writes, per image, DIR/<name>.cam.png: the photo as the model sees it (predict's
preprocessing: runs.inference_input), the Grad-CAM of the predicted position over it, and the Grad-CAM of the
true position when it is known (the image is in the model's shard set, or in a `--labels` CSV). An image that
cannot be read is listed as a failure and never stops the others, as in predict.

write_cam_panel(RUN) draws RUN/cam_panel.png when training ends: per true position, a few validation errors
(the most confident first) and correct ones, each with the map of its predicted position, so a model that looks
at a background or a camera's corner rather than the leaf shows. A few images (PANEL_PER_CLASS errors and as
many correct ones per class), on the CPU: cheap beside training.

Imports neither torch nor matplotlib until called (the CLI imports this module inside its command).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cornpipe.errors import CornpipeError, OutputError

CAM_PANEL_FILE = "cam_panel.png"
PANEL_PER_CLASS = 2  # errors, and as many correct ones, per true position in the report's panel
PANEL_INCHES = 3.0  # one panel of an explain PNG, square
TITLE_INCHES = 0.6  # the strip above it
DPI = 100
OVERLAY_ALPHA = 0.45  # the map's weight over the photo
BATCH = 16  # images per forward/backward pass


@dataclass(frozen=True)
class ExplainSummary:
    out: Path
    written: list[Path]  # one PNG per readable image, in input order
    failed: list[tuple[str, str]]  # (path, why) of each image that could not be read


def png_size(panels: int) -> tuple[int, int]:
    """(width, height) in pixels of an explain PNG with `panels` panels (photo, predicted, true when known)."""
    return round(panels * PANEL_INCHES * DPI), round((PANEL_INCHES + TITLE_INCHES) * DPI)


def _load(model: Path, device: str) -> tuple[Any, dict[str, Any]]:
    """(Run, checkpoint state) as load_model builds them: inference weights, the run's normalisation."""
    from cornpipe.runs.build import model_checkpoint, run_from_checkpoint
    from cornpipe.runs.checkpoint import load_checkpoint

    checkpoint = model_checkpoint(Path(model))
    state = load_checkpoint(checkpoint, purpose="predict")
    run = run_from_checkpoint(state, str(checkpoint), device=device, amp="off", compile=False,
                              channels_last=False)
    run.model.eval().requires_grad_(False)  # class_maps needs activation gradients only, never the weights'
    return run, state


def _key(path: Path | str) -> str:
    return os.path.realpath(path)


def manifest_labels(state: dict[str, Any]) -> dict[str, str]:
    """{real path of a surveyed image: its position} from the model's shard set manifest (empty when the
    shard set or its source folder is not where training found it)."""
    shards = (state.get("config") or {}).get("shards")
    try:
        manifest = json.loads((Path(shards) / "manifest.json").read_text(encoding="utf-8"))
        inputs = manifest["params"].get("inputs") or {}
        root = Path(inputs["src"]) if inputs.get("src") else Path(inputs["manifest"]).parent
        positions = manifest["positions"]
        return {_key(root / s["path"]): positions[int(s["position"])] for s in manifest["samples"]}
    except (TypeError, KeyError, ValueError, IndexError, OSError):
        return {}


def read_labels(path: Path, positions: Sequence[str]) -> dict[str, str]:
    """{real path: position} from a CSV with columns path, position (a relative path is read from the
    CSV's folder, as convert reads a manifest CSV)."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not {"path", "position"} <= set(reader.fieldnames or []):
                raise CornpipeError(f"--labels {path}: needs the columns path and position "
                                    f"(found {', '.join(reader.fieldnames or []) or 'none'})")
            rows = list(reader)
    except (OSError, UnicodeDecodeError) as exc:
        raise CornpipeError(f"--labels {path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from exc
    labels = {}
    for line, row in enumerate(rows, start=2):
        position = (row.get("position") or "").strip()
        if position not in positions:
            raise CornpipeError(f"--labels {path} line {line}: position {position!r} is not one of the model's "
                                f"({', '.join(positions)})")
        labels[_key(path.parent / (row.get("path") or "").strip())] = position
    return labels


def _out_names(files: Sequence[Path], out: Path) -> list[Path]:
    """DIR/<stem>.cam.png per file; a stem seen before gets -2, -3, ... (never two images in one PNG)."""
    seen: dict[str, int] = {}
    names = []
    for file in files:
        n = seen[file.stem] = seen.get(file.stem, 0) + 1
        names.append(out / (f"{file.stem}.cam.png" if n == 1 else f"{file.stem}-{n}.cam.png"))
    return names


def _photo(image: Any, normalization: Any) -> Any:
    """(3, S, S) normalised tensor -> (S, S, 3) float RGB in [0, 1]: the photo as the model saw it."""
    import numpy as np

    mean = np.asarray(normalization.mean, dtype=np.float32)
    std = np.asarray(normalization.std, dtype=np.float32)
    pixels = image.detach().float().cpu().permute(1, 2, 0).numpy() * std + mean  # 0-255 scale
    return np.clip(pixels / 255.0, 0.0, 1.0)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _overlay(ax: Any, photo: Any, mask: Any | None, title: str, colour: str = "black") -> None:
    ax.imshow(photo)
    if mask is not None:
        ax.imshow(mask, cmap="jet", alpha=OVERLAY_ALPHA, vmin=0.0, vmax=1.0, interpolation="bilinear")
    ax.set_title(title, fontsize=9, color=colour)
    ax.axis("off")


def draw_explanation(photo: Any, maps: Sequence[tuple[str, Any]], title: str, out: Path) -> Path:
    """One PNG: the photo, then each (title, map) over it; png_size(1 + len(maps)) pixels."""
    plt = _pyplot()
    panels = 1 + len(maps)
    fig, axes = plt.subplots(1, panels, figsize=(panels * PANEL_INCHES, PANEL_INCHES + TITLE_INCHES), dpi=DPI)
    _overlay(axes[0], photo, None, "photo, as the model sees it")
    for ax, (map_title, mask) in zip(axes[1:], maps, strict=True):
        _overlay(ax, photo, mask, map_title)
    fig.suptitle(title if len(title) <= 70 else "…" + title[-69:], fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=PANEL_INCHES / (PANEL_INCHES + TITLE_INCHES) - 0.02,
                        wspace=0.04)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, dpi=DPI, format="png")  # a fixed size: no tight bounding box
    plt.close(fig)
    tmp.replace(out)
    return out


def explain(model: Path, files: Sequence[Path], out: Path, *, labels: Path | None = None,
            device: str = "cpu") -> ExplainSummary:
    """Write one PNG per image of `files` into the folder `out` (see the module docstring)."""
    import torch

    from cornpipe.runs.cam import class_maps, position_probs
    from cornpipe.runs.inference_input import load_for_inference
    from cornpipe.shards.atomic import check_can_create, check_not_an_input
    from cornpipe.shards.files import NotRegularFile, printable
    from cornpipe.shards.imageio import ImageRejected

    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give the folder to write the PNGs into")
    if not files:
        raise CornpipeError("no image files found in the given inputs")
    check_can_create(out)
    targets = _out_names(files, out)
    check_not_an_input(targets, files)  # `--out` beside the photos never replaces one
    run, state = _load(model, device)
    positions = list(run.positions)
    known = manifest_labels(state)
    if labels is not None:
        known.update(read_labels(labels, positions))
    out.mkdir(parents=True, exist_ok=True)

    written: list[Path] = []
    failed: list[tuple[str, str]] = []
    for start in range(0, len(files), BATCH):
        chunk, tensors = [], []
        for file, target in zip(files[start:start + BATCH], targets[start:start + BATCH], strict=True):
            try:
                tensors.append(load_for_inference(file, state["data"]["convert"], run.cfg.image_size,
                                                  run.normalization))
                chunk.append((file, target))
            except NotRegularFile as exc:  # a named pipe would block: never read
                failed.append((printable(file), exc.reason))
            except (ImageRejected, OSError) as exc:
                failed.append((printable(file), str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
        if not chunk:
            continue
        batch = torch.stack(tensors).to(run.device)  # (B, 3, S, S)
        prob = position_probs(run.model, batch)
        pred = prob.argmax(axis=1)
        pred_maps = class_maps(run.model, batch, pred.tolist())
        true = [known.get(_key(file)) for file, _ in chunk]
        with_true = [i for i, t in enumerate(true) if t is not None]
        true_maps = dict(zip(with_true, class_maps(run.model, batch[with_true], [positions.index(true[i])
                                                                                for i in with_true]),
                             strict=True)) if with_true else {}
        for i, (file, target) in enumerate(chunk):
            p = positions[int(pred[i])]
            maps = [(f"predicted: {p} ({prob[i, pred[i]]:.2f})", pred_maps[i])]
            if true[i] is not None:
                maps.append((f"true: {true[i]}" + (" (correct)" if true[i] == p else " (error)"), true_maps[i]))
            photo = _photo(batch[i], run.normalization)
            written.append(draw_explanation(photo, maps, printable(file), target))
    return ExplainSummary(out=out, written=written, failed=failed)


def _pick(rows: Sequence[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """Up to k rows, most confident first, spread over sources first (a shortcut is one source's look)."""
    ranked = sorted(rows, key=lambda r: -float(r["confidence"]))
    picked, sources = [], set()
    for row in ranked:
        if len(picked) < k and row.get("source") not in sources:
            picked.append(row)
            sources.add(row.get("source"))
    picked += [r for r in ranked if r not in picked][:k - len(picked)]
    return picked


def panel_rows(predictions: Sequence[dict[str, Any]], positions: Sequence[str],
               per_class: int = PANEL_PER_CLASS) -> list[list[dict[str, Any]]]:
    """Per true position (in the model's order): its picked errors, then its picked correct ones."""
    out = []
    for name in positions:
        rows = [{**r, "confidence": float(r.get(f"prob_{r['position_pred']}") or 0.0)}
                for r in predictions if r.get("position_true") == name]
        errors = _pick([r for r in rows if r["position_pred"] != name], per_class)
        correct = _pick([r for r in rows if r["position_pred"] == name], per_class)
        if errors or correct:
            out.append(errors + correct)
    return out


def write_cam_panel(run_dir: Path, *, device: str = "cpu") -> Path:
    """RUN/cam_panel.png from RUN/val_predictions.csv and RUN/best.pt (see the module docstring);
    a CornpipeError says why it cannot be drawn."""
    import torch

    from cornpipe.runs.cam import class_maps
    from cornpipe.runs.inference_input import stored_for_inference
    from cornpipe.shards.shard_set import ShardSet

    predictions_csv = run_dir / "val_predictions.csv"
    if not predictions_csv.is_file():
        raise CornpipeError(f"no {predictions_csv.name} in {run_dir}")
    with predictions_csv.open(newline="", encoding="utf-8") as f:
        predictions = list(csv.DictReader(f))
    run, state = _load(run_dir, device)
    positions = list(run.positions)
    rows = panel_rows(predictions, positions)
    if not rows:
        raise CornpipeError(f"{predictions_csv.name} holds no samples")
    try:
        shards = ShardSet(state["config"]["shards"])
        where = {str(s["id"]): (split, s["row"]) for split in shards.splits for s in shards.samples(split)}
        picked = [r for row in rows for r in row]
        images = torch.stack([stored_for_inference(shards.read_image_bytes(*where[r["sample_id"]]),
                                                   run.cfg.image_size, run.normalization) for r in picked])
    except (KeyError, OSError) as exc:
        raise CornpipeError(f"the validation images cannot be read from the shard set ({exc})") from exc
    maps = class_maps(run.model, images.to(run.device), [positions.index(r["position_pred"]) for r in picked])
    return _draw_panel(rows, [_photo(x, run.normalization) for x in images], maps, run_dir / CAM_PANEL_FILE)


def _draw_panel(rows: Sequence[Sequence[dict[str, Any]]], photos: Sequence[Any], maps: Any, out: Path) -> Path:
    plt = _pyplot()
    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.4 * cols, 2.7 * len(rows) + 0.5), dpi=DPI, squeeze=False)
    k = 0
    for r, row in enumerate(rows):
        for c in range(cols):
            axes[r][c].axis("off")
            if c >= len(row):
                continue
            s = row[c]
            wrong = s["position_pred"] != s["position_true"]
            title = (f"{s.get('source') or '?'} · true {s['position_true']}\n"
                     f"{'ERROR: ' if wrong else ''}predicted {s['position_pred']} ({s['confidence']:.2f})")
            _overlay(axes[r][c], photos[k], maps[k], title, "tab:red" if wrong else "tab:green")
            k += 1
    fig.suptitle("Grad-CAM of the predicted position, validation (best.pt): red = error, green = correct",
                 fontsize=10)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)
    tmp.replace(out)
    return out
