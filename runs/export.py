"""`cornpipe export`: a trained model for deployment, outside cornpipe, with its preprocessing written down.

    export_model(Path("runs/a"), Path("deploy"), ["onnx", "torchscript", "safetensors"])

MODEL is a run folder (its best.pt) or a checkpoint. The exported model is what predict runs: the EMA
weights when the run kept them, in eval mode, float32 on the CPU, behind a wrapper whose outputs are

    position_probs  (B, P) float32  softmax of the position logits / T, in the card's class order (T: the
                                    run's calibration temperature, baked into the graph; the card states it)
    grade           (B,)   float32  the grade in scale units (predict snaps it to the nearest level)

from one input `image` (B, 3, S, S) float32, NCHW, RGB, normalised as model_card.json says.

    DIR/model.onnx          ONNX, a dynamic batch axis (onnxruntime, OpenCV DNN, TensorRT, ...)
    DIR/model.torchscript.pt torch.jit.trace of the wrapper: torch.jit.load, no cornpipe needed
    DIR/model.safetensors   the cornpipe model's state_dict (rebuild it with create_model, see the card)
    DIR/model_card.json     classes, grade scale, input, preprocessing, outputs, the run's best validation
                            metrics, sha256 of every file, the environment of the export and of the training
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cornpipe.errors import ExportError
from cornpipe.loaders.base import AugmentConfig
from cornpipe.runs.build import Run, run_from_checkpoint
from cornpipe.runs.calibration import temperature_of
from cornpipe.runs.checkpoint import BEST, load_checkpoint
from cornpipe.runs.environment import environment, installed_versions

FORMATS = ("onnx", "torchscript", "safetensors")
FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "safetensors": "model.safetensors"}
CARD = "model_card.json"
CARD_FORMAT = 1
INPUT_NAME = "image"
OUTPUT_NAMES = ("position_probs", "grade")
# 17: every onnxruntime since 1.14 and the mobile/web builds run it; cornpipe's ops need nothing newer
ONNX_OPSET = 17
EXPORT_EXTRA = "pip install 'cornpipe[export]'"


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    files: dict[str, Path]  # format -> file written
    card: Path


class InferenceModel(nn.Module):
    """A cornpipe model as deployment sees it: image batch -> (position_probs (B, P), grade (B,)), the
    probabilities calibrated by `temperature` (runs.calibration; 1.0: the raw softmax)."""

    def __init__(self, model: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.temperature = float(temperature)  # a constant of the traced graph

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(image)
        return (out["position"].float() / self.temperature).softmax(dim=1), out["grade"].float()


def resolve_model(model: Path) -> Path:
    """A run folder -> its best.pt; a file as given."""
    model = Path(model)
    if model.is_dir():
        best = model / BEST
        if not best.is_file():
            raise ExportError(f"{model} is a folder without {BEST}: give a run folder or a checkpoint file")
        return best
    return model


def parse_formats(text: str | Sequence[str]) -> list[str]:
    """'onnx,torchscript' -> ['onnx', 'torchscript'] (order kept, repeats dropped); an unknown name is an error."""
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise ExportError(f"unknown export format {', '.join(unknown) or '(none)'}; choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(names))


def export_model(model: Path, out: Path, formats: str | Sequence[str] = FORMATS, *,
                 force: bool = False) -> ExportSummary:
    """Write `formats` of MODEL's inference model and DIR/model_card.json into `out` (a folder)."""
    formats = parse_formats(formats)
    if "onnx" in formats:
        _require_onnx()  # before the checkpoint loads: the one-line answer comes first
    checkpoint = resolve_model(model)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a folder to write the exported model into")
    targets = [out / FILES[f] for f in formats] + [out / CARD]
    taken = [p.name for p in targets if p.exists()]
    if taken and not force:
        raise ExportError(f"{out} already holds {', '.join(taken)}; pass --force to overwrite")
    state = load_checkpoint(checkpoint)
    run = run_from_checkpoint(state, str(checkpoint), device="cpu", amp="off", compile=False, channels_last=False)
    wrapper = InferenceModel(run.model, temperature_of(state["data"])).eval()
    example = torch.zeros(2, 3, run.cfg.image_size, run.cfg.image_size)  # batch 2: no size-1 special cases traced
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for fmt in formats:
        files[fmt] = out / FILES[fmt]
        WRITERS[fmt](wrapper, example, files[fmt], run)
    card = out / CARD
    card.write_text(json.dumps(model_card(state, run, checkpoint, files), indent=2) + "\n")
    return ExportSummary(out=out, files=files, card=card)


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ExportError(f"ONNX export needs the onnx package: {EXPORT_EXTRA}") from None


def write_onnx(wrapper: nn.Module, example: torch.Tensor, path: Path, run: Run | None = None) -> None:
    import onnx

    batch = {0: "batch"}
    with warnings.catch_warnings(), _cumprod_as_cumsum():
        # torch's TorchScript-based exporter: it needs no onnxscript and takes every timm trunk; torch calls
        # it legacy and warns (the torch.export-based one would add onnxscript to the extra)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            with torch.no_grad():
                torch.onnx.export(wrapper, (example,), str(path), input_names=[INPUT_NAME],
                                  output_names=list(OUTPUT_NAMES), opset_version=ONNX_OPSET, dynamo=False,
                                  dynamic_axes={name: batch for name in (INPUT_NAME, *OUTPUT_NAMES)})
        except torch.onnx.errors.OnnxExporterError as exc:  # a trunk with an op ONNX lacks: say so, no traceback
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"cannot export this model to ONNX: {first}; --format torchscript,safetensors "
                              "still work") from exc
    onnx.checker.check_model(str(path))


@contextmanager
def _cumprod_as_cumsum() -> Iterator[None]:
    """ONNX has no CumProd: the CORN head's cumprod of sigmoids (all > 0) goes out as Exp(CumSum(Log(x)))."""
    from torch.onnx import register_custom_op_symbolic, symbolic_helper, unregister_custom_op_symbolic

    @symbolic_helper.parse_args("v", "i", "none")
    def cumprod(g: Any, x: Any, dim: int, dtype: Any) -> Any:
        axis = g.op("Constant", value_t=torch.tensor(dim, dtype=torch.long))
        return g.op("Exp", g.op("CumSum", g.op("Log", x), axis))

    register_custom_op_symbolic("aten::cumprod", cumprod, ONNX_OPSET)
    try:
        yield
    finally:
        unregister_custom_op_symbolic("aten::cumprod", ONNX_OPSET)


def write_torchscript(wrapper: nn.Module, example: torch.Tensor, path: Path, run: Run | None = None) -> None:
    with warnings.catch_warnings():
        # torch 2.14 deprecates torch.jit for torch.export, but its files still load in every torch and libtorch
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, example, check_trace=False)
        torch.jit.save(traced, str(path))


def write_safetensors(wrapper: nn.Module, example: torch.Tensor, path: Path, run: Run) -> None:
    from safetensors.torch import save_file

    weights = {k: v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()}
    save_file(weights, str(path), metadata={"format": "pt", "cornpipe_model": run.cfg.model})


WRITERS = {"onnx": write_onnx, "torchscript": write_torchscript, "safetensors": write_safetensors}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_card(state: dict[str, Any], run: Run, checkpoint: Path, files: dict[str, Path]) -> dict[str, Any]:
    """What a deployment needs to feed the model and read its outputs (the module docstring's card)."""
    cfg, data = run.cfg, state["data"]
    size = cfg.image_size
    crop = AugmentConfig().val_crop_fraction  # predict's and validation's
    norm = run.normalization
    positions, scale = list(run.positions), list(run.grade_scale)
    return {
        "format": CARD_FORMAT,
        "cornpipe_version": installed_versions().get("cornpipe"),
        "source": {"checkpoint": str(checkpoint), "epoch": state.get("epoch"),
                   "weights": "ema" if state.get("ema") else "model"},
        "model": {"name": cfg.model, "grade_head": cfg.grade_head, "num_positions": len(positions),
                  "parameters": sum(p.numel() for p in run.model.parameters())},
        "classes": {"position": positions},
        "grade_scale": scale,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32", "layout": "NCHW",
                  "channel_order": "RGB", "image_size": size,
                  "normalization": {"mean": list(norm.mean), "std": list(norm.std), "pixel_scale": 255,
                                    "formula": "x = (pixel - mean) / std, pixel in 0..255 (uint8 RGB as float)",
                                    "mean_unit": [m / 255 for m in norm.mean], "std_unit": [s / 255 for s in norm.std]}},
        "preprocessing": preprocessing(data, size, crop),
        "outputs": [
            {"name": OUTPUT_NAMES[0], "shape": ["batch", len(positions)], "dtype": "float32",
             "meaning": "softmax probability of each position class, in classes.position order, calibrated: "
                        "softmax(logits / calibration.temperature)"},
            {"name": OUTPUT_NAMES[1], "shape": ["batch"], "dtype": "float32",
             "meaning": f"the grade in scale units ({cfg.grade_head} head); snap to the nearest grade_scale "
                        "level for a class, as cornpipe predict does"},
        ],
        "calibration": calibration_card(data),
        "validation": {"epoch": state.get("epoch"), "metrics": state.get("val")},
        "files": {path.name: {"format": fmt, "sha256": sha256(path), "bytes": path.stat().st_size,
                              **(USAGE[fmt])} for fmt, path in files.items()},
        "rebuild_with_cornpipe": {
            "code": (f"from cornpipe.models import create_model; from safetensors.torch import load_file; "
                     f"m = create_model({cfg.model!r}, num_positions={len(positions)}, grade_scale={scale}, "
                     f"grade_head={cfg.grade_head!r}); m.load_state_dict(load_file('{FILES['safetensors']}')); "
                     f"m.eval()  # m(x) -> {{'position': logits (B, P), 'grade': (B,)}}")},
        "environment": {**environment("cpu"), **installed_versions(EXPORT_LIBRARIES)},
        "training_environment": state.get("environment"),  # None: a checkpoint from before it was recorded
    }


def calibration_card(data: dict[str, Any]) -> dict[str, Any]:
    """The card's calibration block: the temperature baked into position_probs and how it was fitted."""
    record = data.get("calibration") or {}
    return {"temperature": temperature_of(data), "in_graph": True,
            "method": "temperature scaling fitted on the run's validation predictions (minimum NLL)",
            "fitted": bool(record.get("fitted")), "reason": record.get("reason"), "n": record.get("n"),
            "ece_before": record.get("ece_before"), "ece_after": record.get("ece_after"),
            "raw_probs": "softmax(log(position_probs) * temperature) gives the uncalibrated probabilities"}


def preprocessing(data: dict[str, Any], size: int, crop: float) -> dict[str, Any]:
    """How predict (and validation) turn a photo into the model's input, step by step."""
    convert = data.get("convert") or {}
    return {
        "steps": [
            "decode the photo, apply its EXIF orientation, convert to RGB (8 bits per channel)",
            f"optional, for the numbers validation saw: fit the longest side within max_resolution "
            f"({convert.get('max_resolution')}) and re-encode as JPEG quality {convert.get('jpeg_quality')}, "
            "as the shard set holds its images",
            f"crop the centred square of side {crop} x min(height, width) and resize it to {size} x {size} "
            f"with bilinear (antialiased, PIL's Image.resize box=...) interpolation: the same as resizing the "
            f"shorter side to {size / crop:g} and centre-cropping {size} x {size}",
            "HWC uint8 -> CHW float32, then (pixel - mean) / std per channel (input.normalization)",
            "stack into a (batch, 3, H, W) batch; any batch size",
        ],
        "image_size": size, "crop_fraction": crop, "resize_shorter_side_to": size / crop,
        "interpolation": "bilinear", "max_resolution": convert.get("max_resolution"),
        "jpeg_quality": convert.get("jpeg_quality"),
    }


EXPORT_LIBRARIES = {"onnx": ("onnx",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
                    "safetensors": ("safetensors",)}
USAGE = {
    "onnx": {"opset": ONNX_OPSET, "load": "onnxruntime.InferenceSession('model.onnx').run(None, {'image': x})"},
    "torchscript": {"load": "torch.jit.load('model.torchscript.pt')(x) -> (position_probs, grade)"},
    "safetensors": {"load": "see rebuild_with_cornpipe"},
}
