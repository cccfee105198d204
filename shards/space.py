"""How much disk a conversion needs: an estimate before decoding (from the input file sizes) and a
close one after (from the staged sizes). convert checks both against the free space of OUT's file
system (shards/atomic.py words a shortfall) so a full disk is found before the slow part, not after it.

Peak use is staging + outputs (staging is removed last). Staging holds every tar JPEG plus the pixels
of images the .beton stores raw (shards/staging.py), so with J the JPEG bytes and R those raw bytes:
wds only ~ 2J, jpg ~ 3J, raw ~ 2J + 2R (smart in between), plus tar headers and .beton pages.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from cornpipe.shards.discover import Candidate
from cornpipe.shards.staging import StagedBytes
from cornpipe.shards.writers import page_size

TAR_BYTES_PER_SAMPLE = 7 * 1024 + 512  # 7 members (shards.fields): a 512-byte header and up to 511 bytes of padding each, + meta
BETON_SPLITS = 2  # train and val, each with a header region and a part-filled last page


def needed_before_staging(cands: Sequence[Candidate], params: Any) -> int:
    """A low estimate of the peak bytes on disk, from the input sizes: it refuses only runs that
    cannot fit. An input is assumed to re-encode to at most its own size, and at most the raw size of
    an image at --max-resolution; raw pixels are at least that (the check after decoding is exact)."""
    cap = params.max_resolution ** 2 * 3
    jpeg = 0
    for c in cands:
        try:
            jpeg += min(os.stat(c.path).st_size, cap)
        except OSError:
            pass  # rejected later, with its reason
    total = 2 * jpeg + len(cands) * TAR_BYTES_PER_SAMPLE  # staged JPEGs + tar shards
    if "beton" in params.formats:
        raw_too = params.write_mode != "jpg"
        total += (2 * jpeg if raw_too else jpeg) + BETON_SPLITS * page_size(cap)
    return total


def needed_after_staging(staged: Sequence[StagedBytes], max_raw_bytes: int, params: Any) -> int:
    """Bytes the outputs (tar shards, .beton) will take, from the staged images' sizes."""
    total = sum(s.jpeg_size + TAR_BYTES_PER_SAMPLE for s in staged)
    if "beton" in params.formats and staged:
        total += sum(s.pixel_size if s.pixel_offset >= 0 else s.jpeg_size for s in staged)
        total += BETON_SPLITS * 2 * page_size(max_raw_bytes)  # header region page-aligned; last page
    return total
