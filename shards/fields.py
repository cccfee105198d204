"""Names shared by the writer (`convert`) and every reader (`make_loader`, `verify`, `inspect`).

This module is the on-disk contract of a shard set. Writing and reading are separate steps that
share these names (the ffcv habit); change a name here and both sides move together.

Shard set layout (the OUT of `cornpipe convert`):

    manifest.json            see MANIFEST_* below
    rejected.csv             columns REJECTED_COLUMNS: every input that was not converted, and why
    train.beton / val.beton  FFCV: fields IMAGE (RGBImageField), POSITION (IntField),
                             GRADE (FloatField), SAMPLE_ID (IntField), SOURCE_ID (IntField);
                             row r of the .beton is row r of the split (manifest sample "row")
    train-000000.tar ...     webdataset shards; samples of the split in row order, SHARD_SIZE a shard.
                             Members of one sample share the key f"{sample_id:08d}"; the extension is
                             everything after the key's first dot (webdataset's and DALI's rule), so
                             `grade` and `grade.txt` are two members:
                               <key>.jpg        the image, JPEG, same resolution as in the .beton
                               <key>.position   int64 little-endian (8 bytes): position class index
                               <key>.grade      float32 little-endian (4 bytes): grade value on the scale
                               <key>.sample_id  int64 little-endian (8 bytes): sample id (sets of format
                                                version 1 name it <key>.id; TAR_ID_EXT reads either)
                               <key>.cls        the position class index as decimal ASCII ("0", "1", "2")
                               <key>.grade.txt  the grade as decimal ASCII ("5", "2.5")
                               <key>.json       {"id","position","grade","source","stage","path"} (for people)
                             The raw members are what DALI's typed reader takes (fn.readers.webdataset
                             dtypes=INT64/FLOAT); the text ones are what the `webdataset` library's
                             default decoders turn into an int (.cls) and a str (.txt) -- a raw `.id`
                             made `.decode()` fail: that library reads `.id` as decimal text too.
                             `wds.WebDataset(tars).decode("pil").to_tuple("jpg", "cls")` yields
                             (PIL image, position); `__key__` is the sample id, zero-padded.
    train-000000.idx ...     DALI webdataset index of the tar beside it (format of DALI's wds2idx,
                             v1.2: per sample its members' ext, offset, size, name), which also gives
                             random access to one sample's bytes by offset.

manifest.json keys:
    format_version  FORMAT_VERSION
    positions       class names, index = position label ("lower", "middle", "upper")
    sources         source names, index = SOURCE_ID (e.g. "9l" ... "19t"; UNKNOWN_SOURCE when a manifest
                    CSV has no source column)
    metadata        the names of the manifest CSV's extra columns (e.g. ["camera", "origin"]), sorted; [] for
                    the folder layout (absent in sets written before it: read as [])
    grade_scale     allowed grades, ascending (e.g. [0, 3, 5, 7, 9] or [0, 1, ..., 25])
    params          the convert parameters (write_mode, max_resolution, jpeg_quality, val_fraction,
                    seed, shard_size, formats, ...); "formats" lists what was written, a subset of
                    FORMATS that always holds "wds" (absent in older manifests: both); "high_bit_depth"
                    the rule 16-bit and float inputs were made 8-bit by (absent in older manifests)
    splits          {"train": {"count": n, "beton": "train.beton" (null without "beton" in formats),
                               "shards": [{"tar": ..., "index": ..., "count": k}, ...]}, "val": ...}
    counts          found / converted / rejected totals and per split x source x position x grade
    samples         one object a converted sample: {"id", "split", "row", "path" (original, relative
                    to SRC), "source", "stage" (null: unknown), "position", "grade", "width", "height",
                    "sha256" (of the input file), "meta" ({column: value} of the extra columns, an empty
                    cell left out; absent in older sets)}; ids are 0..N-1 over both splits, "row" is
                    the index in its split
    files           {"<file name>": {"sha256": hex, "bytes": n}} for every file written except
                    manifest.json itself (whose sha256 is in manifest.sha256, `sha256sum -c` format)
"""

from __future__ import annotations

from cornpipe.grades import DEFAULT_GRADE_SCALE as DEFAULT_GRADE_SCALE  # the contract's default scale

FORMAT_VERSION = 2  # 2: .sample_id (was .id), .cls and .grade.txt in the tar shards
READ_FORMAT_VERSIONS: tuple[int, ...] = (1, 2)  # what ShardSet reads: every backend reads version 1 sets too

# FFCV field names (also the batch contract's names)
IMAGE = "image"
POSITION = "position"
GRADE = "grade"
SAMPLE_ID = "sample_id"
SOURCE_ID = "source_id"

POSITION_NAMES: tuple[str, ...] = ("lower", "middle", "upper")
POSITION_CODES: tuple[str, ...] = ("l", "m", "t")  # folder suffix: 9l = stage 9, lower leaf
STAGES: tuple[int, ...] = (9, 14, 19)
UNKNOWN_SOURCE = "unknown"  # the source of a sample whose manifest CSV has no source column
SOURCES: tuple[str, ...] = tuple(f"{s}{c}" for s in STAGES for c in POSITION_CODES)

SPLITS: tuple[str, ...] = ("train", "val")
MANIFEST = "manifest.json"
MANIFEST_HASH = "manifest.sha256"  # `sha256sum` line of manifest.json, written last: an edited manifest shows
REJECTED = "rejected.csv"
REJECTED_COLUMNS: tuple[str, ...] = ("path", "reason")
SHARD_SIZE = 1000  # samples per tar shard
WRITE_MODES: tuple[str, ...] = ("jpg", "raw", "smart")  # how a .beton stores pixels (shards.writers)
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default decompression-bomb limit (pixels; shards.imageio)

# what convert can write: "beton" (the ffcv backend reads it) and "wds" (tar shards + DALI index:
# the torch, resident and dali backends, inspect and verify read them)
FORMATS: tuple[str, ...] = ("beton", "wds")

# tar member extensions (the `ext` of DALI's reader and of the .idx lines; webdataset's sample keys)
TAR_IMAGE_EXT = "jpg"
TAR_POSITION_EXT = "position"  # raw int64
TAR_GRADE_EXT = "grade"  # raw float32
TAR_SAMPLE_ID_EXT = "sample_id"  # raw int64, written by format version 2
TAR_LEGACY_ID_EXT = "id"  # raw int64, format version 1
TAR_CLASS_EXT = "cls"  # decimal text: webdataset decodes it to int
TAR_GRADE_TEXT_EXT = "grade.txt"  # decimal text: webdataset decodes it to str
TAR_META_EXT = "json"
# Readers name the sample id member with DALI's alternatives syntax (';'), which fn.readers.webdataset's
# `ext` and ShardSet.read_member both take: new sets' .sample_id, else version 1's .id.
TAR_ID_EXT = f"{TAR_SAMPLE_ID_EXT};{TAR_LEGACY_ID_EXT}"


GROUP_FIELDS: tuple[str, ...] = ("stage", "source")  # sample fields to group by, besides the metadata columns


def sample_value(sample: dict, key: str) -> str | int | None:
    """A manifest sample's stage, source or metadata value (`key`); None when unknown."""
    if key in GROUP_FIELDS:
        value = sample.get(key)
        return None if value is None or value == UNKNOWN_SOURCE else value
    return sample.get("meta", {}).get(key)


def beton_name(split: str) -> str:
    return f"{split}.beton"


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:06d}.tar"


def index_name(split: str, shard: int) -> str:
    return f"{split}-{shard:06d}.idx"


def sample_key(sample_id: int) -> str:
    return f"{sample_id:08d}"
