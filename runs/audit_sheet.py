"""The label audit's contact sheet: the top suspects' thumbnails, each captioned given / suggested / score."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from cornpipe.errors import LoaderError  # noqa: E402
from cornpipe.shards.shard_set import ShardSet  # noqa: E402

COLUMNS = 6
THUMB = 160  # px: lesions stay visible, 24 of them fit one screen


def _thumbnail(shard_set: ShardSet, sample: dict) -> Image.Image | None:
    try:
        image = Image.open(io.BytesIO(shard_set.read_image_bytes(sample["split"], int(sample["row"]))))
        image = image.convert("RGB")
    except (LoaderError, OSError, KeyError, ValueError):
        return None  # a damaged shard costs its tile (captioned so), not the audit
    image.thumbnail((THUMB, THUMB))
    return image


def draw_sheet(shard_set: ShardSet, suspects: Sequence[dict[str, Any]], path: Path, *, partial: bool) -> Path:
    """`path`: a grid of the suspects (issue rows with their manifest `sample`), most suspect first."""
    n = len(suspects)
    cols = min(COLUMNS, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.6 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (ax, s) in enumerate(zip(axes.flat, suspects, strict=False)):
        image = _thumbnail(shard_set, s["sample"])
        if image is None:
            ax.text(0.5, 0.5, "image unreadable", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.imshow(image)
        name = Path(str(s["path"])).name
        ax.set_title(f"#{k + 1} {name[:22]}\ngiven {s['given']} / suggested {s['suggested']} / {s['score']:.3f}",
                     fontsize=7)
    seen = "a run's validation split only" if partial else "out-of-fold predictions"
    fig.suptitle(f"Top {n} label suspects ({seen}); score: label quality, 0 = surely wrong", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
