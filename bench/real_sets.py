"""The real-photo benchmark sets of docs/recipes.md, rebuilt from their public sources (not shipped).

    python -m cornpipe.bench.real_sets --beans IBEAN_DIR --potato PLANTVILLAGE_POTATO_DIR --out DIR

IBEAN_DIR: the iBean bean-leaf field photos (Makerere AI Lab, MIT licence), class folders
angular_leaf_spot, bean_rust, healthy anywhere below it (its train/validation/test folders are pooled).
PLANTVILLAGE_POTATO_DIR: PlantVillage's lab photos of potato, class folders Potato___Early_blight,
Potato___Late_blight, Potato___healthy. docs/recipes.md says where both come from.

Writes two manifest CSVs (`cornpipe convert --manifest`; grade a constant 5 because neither set has a
severity) and copies the photos they name into DIR/images/<class folder>/ (a manifest's paths stay inside
its folder):

- DIR/field.csv: FIELD_COUNTS bean field photos. The three classes stand in for the three positions, the
  healthy one as the minority (~19 %, like the surveys' rarest position).
- DIR/lab_field.csv: LAB_FIELD_COUNTS, lab potato photos and a minority of field bean photos, position by
  disease stage (early lesions / late lesions / healthy), with an `origin` column (lab or field): the
  shape of a survey whose field photos are drowned by lab photos.

The draw is seeded: the same sources give the same CSVs.
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import sys
from pathlib import Path

POSITIONS = ("lower", "middle", "upper")
BEAN = {"angular_leaf_spot": "lower", "bean_rust": "middle", "healthy": "upper"}
POTATO = {"Potato___Early_blight": "lower", "Potato___Late_blight": "middle", "Potato___healthy": "upper"}
FIELD_COUNTS = {"lower": 243, "middle": 243, "upper": 114}  # 600 photos, upper 19 %
LAB_FIELD_COUNTS = {"lab": {"lower": 290, "middle": 290, "upper": 120}, "field": {"lower": 55, "middle": 55, "upper": 40}}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def class_images(root: Path, classes: dict[str, str]) -> dict[str, list[Path]]:
    """position -> every image file under a folder named after one of `classes` (sorted, so seeded draws repeat)."""
    found: dict[str, list[Path]] = {p: [] for p in POSITIONS}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and path.parent.name in classes:
            found[classes[path.parent.name]].append(path)
    empty = [name for name, position in classes.items() if not found[position]]
    if empty:
        raise SystemExit(f"Error: no images in class folder(s) {', '.join(empty)} under {root}")
    return found


def draw(images: dict[str, list[Path]], counts: dict[str, int], rng: random.Random, what: str) -> list[tuple[Path, str]]:
    rows = []
    for position, n in counts.items():
        if len(images[position]) < n:
            raise SystemExit(f"Error: {what}: {n} {position} photos wanted, {len(images[position])} found")
        rows += [(path, position) for path in sorted(rng.sample(images[position], n))]
    return rows


def write_manifest(path: Path, rows: list[tuple[Path, str, str | None]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "position", "grade"] + (["origin"] if rows[0][2] else []))
        for image, position, origin in rows:
            copy = path.parent / "images" / image.parent.name / image.name
            if not copy.is_file():
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(image, copy)
            writer.writerow([copy.relative_to(path.parent).as_posix(), position, 5] + ([origin] if origin else []))
    print(f"{path}: {len(rows)} photos")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cornpipe.bench.real_sets", description=__doc__.split("\n")[0])
    parser.add_argument("--beans", type=Path, required=True, help="iBean folder (class folders below it)")
    parser.add_argument("--potato", type=Path, required=True, help="PlantVillage potato folder (class folders)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    beans, potato = class_images(args.beans, BEAN), class_images(args.potato, POTATO)
    args.out.mkdir(parents=True, exist_ok=True)
    field = draw(beans, FIELD_COUNTS, random.Random(args.seed), "field.csv")
    write_manifest(args.out / "field.csv", [(p, pos, None) for p, pos in field])
    rng = random.Random(args.seed + 1)
    mixed = [(p, pos, "lab") for p, pos in draw(potato, LAB_FIELD_COUNTS["lab"], rng, "lab_field.csv lab")]
    mixed += [(p, pos, "field") for p, pos in draw(beans, LAB_FIELD_COUNTS["field"], rng, "lab_field.csv field")]
    write_manifest(args.out / "lab_field.csv", mixed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
