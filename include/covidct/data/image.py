"""Decoding image bytes by content (never by file extension) into backbone input arrays.

The UCSD COVID-CT set has JPEG data in files named ``.png`` and mixes RGBA, RGB and
grayscale images; all of them become RGB at the backbone's input size here, before
the backbone's own ``preprocess_input``. An image that cannot be fully decoded raises
``ImageDecodeError`` naming the file: it is never silently replaced by zeros.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from covidct.core.errors import ImageDecodeError
from covidct.data.body import BODY_VERSION, FULL, VIEWS, apply_view

#: Bumped whenever decoding/resizing changes, so cached features are not reused.
PREPROCESSING_VERSION = "pil-rgb-bilinear-v1"
RESAMPLE = Image.Resampling.BILINEAR
FLIPS = "hflip-mean"


def preprocessing_id(view: str = FULL, flips: bool = False) -> str:
    """What the backbone is shown, as one string (the feature cache's key, metrics.json, the fingerprint).

    The whole picture without flips keeps the plain ``PREPROCESSING_VERSION`` (caches stay valid);
    a body view adds the view and the mask's version (``_body-blank-mask1``); flips add ``_hflip-mean``
    (the features of the picture and of its mirror image, averaged).
    """
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose from {', '.join(VIEWS)}")
    parts = [PREPROCESSING_VERSION]
    if view != FULL:
        parts.append(f"{view}-{BODY_VERSION}")
    if flips:
        parts.append(FLIPS)
    return "_".join(parts)  # not "+": Hadoop paths take URIs, where it would be escaped


def open_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Open and fully decode an image (header and every pixel), by content."""
    if data is None or len(data) == 0:
        raise ImageDecodeError(f"cannot decode image {name}: the file is empty")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode every pixel: truncated files fail here, not later
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"cannot decode image {name}: {exc}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"cannot decode image {name}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"cannot decode image {name}: {exc}") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for every mode: grayscale is replicated, alpha is dropped, palettes expanded."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit/float grayscale: scale to 8 bits by the image's own range.
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    return img.convert("RGB")


def decode(data: bytes, size: int, name: str = "<bytes>", view: str = FULL) -> np.ndarray:
    """Bytes -> float32 array (size, size, 3), RGB, 0..255, before ``preprocess_input``.

    ``view``: the whole picture, or only the body (``covidct.data.body``), before resizing.
    """
    img = apply_view(to_rgb(open_image(data, name)), view)
    if img.size != (size, size):
        img = img.resize((size, size), RESAMPLE)
    return np.asarray(img, dtype=np.float32)


_CHECKED = "<checked>"


def problem(data: bytes | None) -> str | None:
    """Why these bytes cannot be scored (``not a recognised image format``, ``image file is truncated``...),
    or None when they decode fully and convert to RGB: the featurizer will take them."""
    try:
        to_rgb(open_image(data, _CHECKED))
    except ImageDecodeError as exc:
        return str(exc).removeprefix(f"cannot decode image {_CHECKED}: ")
    except Exception as exc:  # noqa: BLE001 - an image PIL opens but cannot convert (an exotic mode)
        return f"cannot convert to RGB: {exc}"
    return None


def from_image_struct(row, size: int, view: str = FULL) -> np.ndarray:
    """A row of Spark's image data source (BGR(A) or gray bytes) -> float32 RGB array."""
    name = row.get("origin") or "<image struct>"
    height, width, channels = int(row["height"]), int(row["width"]), int(row["nChannels"])
    data = row["data"]
    if height <= 0 or width <= 0 or data is None or len(data) != height * width * channels:
        raise ImageDecodeError(f"cannot decode image {name}: Spark's image source could not read it")
    arr = np.frombuffer(data, dtype=np.uint8).reshape(height, width, channels)
    if channels == 1:
        img = Image.fromarray(arr[:, :, 0], mode="L").convert("RGB")
    elif channels in (3, 4):
        img = Image.fromarray(np.ascontiguousarray(arr[:, :, 2::-1]), mode="RGB")  # BGR(A) -> RGB
    else:
        raise ImageDecodeError(f"cannot decode image {name}: {channels} channels")
    img = apply_view(img, view)
    if img.size != (size, size):
        img = img.resize((size, size), RESAMPLE)
    return np.asarray(img, dtype=np.float32)
