"""Near-duplicate images: a perceptual hash per image, and the pairs that show the same picture.

The hash is ``imagehash``'s difference hash at 16×16 (256 bits: the grey image shrunk to 17×16, one
bit per left-right brightness step). It survives re-encoding (PNG <-> JPEG), rescaling and small
changes of intensity, so a picture filed twice, once under each class or once in each official
split, is found where sha256 sees two different files. Two images whose hashes differ in at most
``MAX_DISTANCE`` bits are near-duplicates.

On the UCSD COVID-CT set (746 images) the two closest cross-class pairs are 8 and 19 bits apart
(``CT_COVID/kjr-21-e24-p5-29.png`` / ``CT_NonCOVID/71%0.jpg`` and ``kjr-21-e24-p5-31.png`` /
``71%1.jpg``: the same pictures under both labels) and the next is 48 bits apart; within a class,
neighbouring slices of one patient are 8 to 24 bits apart. Hence 24.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pandas and PIL load on use: the DAG file imports this module for POLICIES
    import pandas as pd
    from PIL import Image

POLICIES = ("warn", "fail")  # what a near-duplicate across classes or splits does to the validation gate
HASH_SIZE = 16  # 16×16 = 256 bits
BITS = HASH_SIZE * HASH_SIZE
MAX_DISTANCE = 24  # bits of 256
ACROSS_CLASSES, ACROSS_SPLITS, WITHIN_A_SPLIT = "across classes", "across splits", "within a split"  # pair kinds
PAIR_COLUMNS = ("relpath_a", "relpath_b", "distance", "kind", "label_a", "label_b", "split_a", "split_b")
_BLOCK = 1024  # rows of the distance matrix computed at once (memory: _BLOCK × images × 4 bytes)


def perceptual_hash(image: Image.Image) -> str:
    """The image's 16×16 difference hash as 64 hex digits."""
    import imagehash  # imported here: only the manifest's build needs it

    return str(imagehash.dhash(image, hash_size=HASH_SIZE))


def _bits(hashes: pd.Series) -> np.ndarray:
    """One row of 0/1 per hash (float32: distances are then two matrix products)."""
    packed = np.frombuffer(b"".join(bytes.fromhex(h) for h in hashes), dtype=np.uint8)
    return np.unpackbits(packed.reshape(len(hashes), BITS // 8), axis=1).astype(np.float32)


def near_duplicates(manifest: pd.DataFrame, max_distance: int = MAX_DISTANCE) -> pd.DataFrame:
    """Every pair of images whose hashes differ in at most ``max_distance`` bits, closest first.

    ``manifest`` needs ``relpath, label, split, dhash`` (``covidct.data.manifest``); images without a
    hash (they do not decode) are left out. ``kind``: ``across classes`` (the labels differ),
    ``across splits`` (same label, different official lists), or ``within a split``.
    """
    import pandas as pd

    if not 0 <= max_distance < BITS:
        raise ValueError(f"max_distance must be within 0..{BITS - 1} bits, got {max_distance}")
    images = manifest[manifest["dhash"].notna()].reset_index(drop=True)
    found: list[tuple[int, int, int]] = []
    if len(images) > 1:
        bits = _bits(images["dhash"])
        for start in range(0, len(bits), _BLOCK):
            block = bits[start : start + _BLOCK]
            # differing bits = ones of a against zeros of b + zeros of a against ones of b
            distance = block @ (1 - bits).T + (1 - block) @ bits.T
            rows, cols = np.nonzero(distance <= max_distance + 0.5)
            rows = rows + start
            keep = rows < cols  # each pair once, no image with itself
            i, j = rows[keep], cols[keep]
            found += zip(i.tolist(), j.tolist(), distance[i - start, j].tolist(), strict=True)
    pairs = []
    for i, j, distance in found:
        a, b = images.iloc[i], images.iloc[j]
        if a["relpath"] > b["relpath"]:
            a, b = b, a
        split_a, split_b = _split(a["split"]), _split(b["split"])
        if int(a["label"]) != int(b["label"]):
            kind = ACROSS_CLASSES
        elif split_a != split_b:
            kind = ACROSS_SPLITS
        else:
            kind = WITHIN_A_SPLIT
        pairs.append((a["relpath"], b["relpath"], int(round(distance)), kind, int(a["label"]), int(b["label"]),
                      split_a, split_b))  # fmt: skip
    frame = pd.DataFrame(pairs, columns=list(PAIR_COLUMNS))
    return frame.sort_values(["distance", "relpath_a", "relpath_b"], ignore_index=True)


def side_by_side(data_dir: str | Path, a: str, b: str, height: int = 128, gap: int = 6) -> Image.Image:
    """The pictures ``a`` and ``b`` (relpaths under ``data_dir``) at ``height`` pixels, side by side (RGB).

    Raises OSError or ``ImageDecodeError`` where one cannot be read.
    """
    from PIL import Image

    from covidct.data.image import open_image, to_rgb

    pictures = [to_rgb(open_image((Path(data_dir) / rel).read_bytes(), rel)) for rel in (a, b)]
    pictures = [p.resize((max(1, round(p.width * height / p.height)), height)) for p in pictures]
    canvas = Image.new("RGB", (pictures[0].width + gap + pictures[1].width, height), "white")
    canvas.paste(pictures[0], (0, 0))
    canvas.paste(pictures[1], (pictures[0].width + gap, 0))
    return canvas


def _split(value) -> str | None:
    return None if value is None or value != value else str(value)  # None or NaN: in no split list
