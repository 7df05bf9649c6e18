"""The patient's body in a CT picture: a mask from thresholding and the largest connected component.

The UCSD COVID-CT images are figure crops from papers: the scan, and around it what the paper's
layout left there (black or white margins, a border, arrows, letters, a scale bar). What lies
outside the body tells nothing about the lungs, yet it differs between the papers each class was
taken from. ``body_mask`` finds the body without a model:

1. grey levels; white page margins (edge rows and columns that are mostly near-white) are cut off;
2. Otsu's threshold (the grey level that best separates dark air from bright tissue);
3. an opening (3 × 3, ``OPENING`` times) cuts thin lines, letters and borders from the tissue;
4. the largest connected component, and the pieces of at least ``PIECE_SHARE`` of its size (a body cut
   by the figure's crop falls apart into chest wall and mediastinum);
5. their convex hull: the lungs are dark, but inside the body (also where the crop cuts them open).

It works on a copy at most ``WORK_SIDE`` pixels wide, and returns the mask at the picture's size.
Where nothing plausible is found (less than ``MIN_SHARE`` of the picture), the mask is the whole
picture and ``found`` is False: the views below then leave the picture as it is.

The views (``VIEWS``) are what the featurizer may show the backbone instead of the whole picture:
``body`` crops to the body's bounding box (plus ``MARGIN``), ``body-blank`` also paints everything
outside the body black.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # PIL loads on use: the DAG file imports this module for VIEWS
    from PIL import Image

#: The featurizer's input views: the whole picture, the body's bounding box, and that box with
#: everything outside the body black.
FULL, BODY, BODY_BLANK = "full", "body", "body-blank"
VIEWS = (FULL, BODY, BODY_BLANK)
#: Bumped whenever the mask or the views change (part of the feature cache's key).
BODY_VERSION = "mask2"
WORK_SIDE = 256
WHITE = 230  # near-white grey level
WHITE_SHARE = 0.9  # an edge row or column this white is page margin
PIECE_SHARE = 0.05  # tissue pieces at least this share of the largest belong to the body
OPENING = 2
MIN_SHARE = 0.05
MARGIN = 0.02  # of the box's side, kept around the body when cropping


@dataclass(frozen=True)
class Body:
    mask: np.ndarray  # bool (height, width): True inside the body
    box: tuple[int, int, int, int]  # (left, top, right, bottom), right/bottom exclusive
    found: bool  # False: nothing plausible was found, the mask is the whole picture

    @property
    def share(self) -> float:
        return float(self.mask.mean())


def otsu(gray: np.ndarray) -> float:
    """Otsu's threshold of an 8-bit grey image: the level maximising the between-class variance."""
    hist = np.bincount(np.clip(gray, 0, 255).astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256, dtype=np.float64)
    weight0 = np.cumsum(hist)
    weight1 = total - weight0
    mean0 = np.cumsum(hist * levels)
    mean_all = mean0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_all * weight0 - mean0 * total) ** 2 / (weight0 * weight1)
    between[~np.isfinite(between)] = -1
    return float(np.argmax(between)) + 0.5


def _grey(rgb: np.ndarray) -> np.ndarray:
    arr = np.asarray(rgb, dtype=np.float32)
    return arr if arr.ndim == 2 else arr[..., :3].mean(axis=2)


def _white_edges(grey: np.ndarray) -> tuple[int, int, int, int]:
    """The picture without its white page margins: (top, bottom, left, right) of what remains.

    Rows and columns at the edges that are mostly near-white (``WHITE_SHARE``) are margins or a
    frame, not tissue (a lung-window body is white too, but it never fills whole edge rows).
    """
    white = grey >= WHITE
    rows, cols = white.mean(axis=1) >= WHITE_SHARE, white.mean(axis=0) >= WHITE_SHARE
    top, bottom, left, right = 0, len(rows), 0, len(cols)
    while top < bottom and rows[top]:
        top += 1
    while bottom > top and rows[bottom - 1]:
        bottom -= 1
    while left < right and cols[left]:
        left += 1
    while right > left and cols[right - 1]:
        right -= 1
    return top, bottom, left, right


def _hull(mask: np.ndarray) -> np.ndarray:
    """The convex hull of a mask's pixels, as a mask (a body's section is convex enough)."""
    from PIL import Image, ImageDraw
    from scipy.spatial import ConvexHull, QhullError

    points = np.argwhere(mask)[:, ::-1].astype(np.float64)  # (x, y)
    try:
        hull = ConvexHull(points)
    except (QhullError, ValueError):  # a line or a point
        return mask
    canvas = Image.new("L", (mask.shape[1], mask.shape[0]), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points[hull.vertices]], fill=255, outline=255)
    return np.asarray(canvas) >= 128


def body_mask(rgb: np.ndarray) -> Body:
    """The body of an RGB (or grey) picture ``(height, width[, 3])``, values 0..255."""
    from PIL import Image
    from scipy import ndimage

    grey = _grey(rgb)
    height, width = grey.shape
    whole = Body(np.ones((height, width), bool), (0, 0, width, height), False)
    scale = min(1.0, WORK_SIDE / max(height, width))
    if scale < 1.0:
        small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = np.asarray(Image.fromarray(grey.astype(np.uint8)).resize(small_size, Image.Resampling.BOX))
        small = small.astype(np.float32)
    else:
        small = grey
    top, bottom, left, right = _white_edges(small)
    if bottom - top < 8 or right - left < 8:
        return whole
    inner = small[top:bottom, left:right]
    tissue = inner > otsu(inner)
    tissue = ndimage.binary_opening(tissue, structure=np.ones((3, 3), bool), iterations=OPENING)
    labels, count = ndimage.label(tissue)
    if not count:
        return whole
    sizes = np.bincount(labels.ravel())[1:]
    # The largest piece of tissue and those of comparable size (a body cut by the crop falls apart).
    keep = np.nonzero(sizes >= PIECE_SHARE * sizes.max())[0] + 1
    part = _hull(np.isin(labels, keep))
    mask_small = np.zeros(small.shape, bool)
    mask_small[top:bottom, left:right] = part
    if mask_small.mean() < MIN_SHARE:
        return whole
    if scale < 1.0:
        mask = np.asarray(Image.fromarray(mask_small.astype(np.uint8) * 255).resize((width, height))) >= 128
    else:
        mask = mask_small
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if rows.size == 0:
        return whole
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    pad = round(MARGIN * max(bottom - top, right - left))
    box = (max(0, left - pad), max(0, top - pad), min(width, right + pad), min(height, bottom + pad))
    return Body(mask, box, True)


def apply_view(img: Image.Image, view: str) -> Image.Image:
    """``img`` (RGB) as the backbone is to see it: whole (``full``), cropped to the body, or also blanked."""
    if view == FULL:
        return img
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose from {', '.join(VIEWS)}")
    arr = np.asarray(img)
    body = body_mask(arr)
    if not body.found:
        return img
    if view == BODY_BLANK:
        from PIL import Image

        arr = np.where(body.mask[..., None], arr, 0).astype(np.uint8)
        img = Image.fromarray(arr, mode="RGB")
    return img.crop(body.box)


def grid_share(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The share of each cell of a ``grid`` (rows, columns) over the picture that lies inside the body."""
    from PIL import Image

    rows, cols = grid
    small = Image.fromarray(mask.astype(np.float32)).resize((cols, rows), Image.Resampling.BOX)
    return np.clip(np.asarray(small, dtype=np.float32), 0.0, 1.0)
