"""Small synthetic datasets laid out like upstream UCSD COVID-CT, for tests.

Like the real set they mix PNG and JPEG, RGBA, RGB and grayscale images, include
JPEG data in files named ``.png``, and come with ``Data-split`` lists. The two classes
look different (bright textured vs. dark smooth) so that even random-weight features
separate them, and no two images are near-duplicates (``covidct.data.duplicates``) for up to
12 images per class.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = {"CT_COVID": ("COVID", 1), "CT_NonCOVID": ("NonCOVID", 0)}
MODES = ("RGBA", "RGB", "L")


def make_image(label: int, index: int, rng: np.random.Generator) -> Image.Image:
    h, w = 96 + 8 * (index % 4), 112 + 4 * (index % 3)
    yy, xx = np.mgrid[0:h, 0:w]
    if label:  # "COVID": bright, high-frequency stripes plus noise
        base = 150 + 80 * np.sin(xx / 2.0 + index) * np.cos(yy / 3.0)
        base = base + rng.normal(0, 25, (h, w))
    else:  # "non-COVID": dark and smooth, a different random relief each (no two are near-duplicates)
        relief = Image.fromarray(rng.uniform(0, 1, (4, 4)).astype(np.float32), mode="F")
        base = 40 + 30 * np.asarray(relief.resize((w, h), Image.Resampling.BICUBIC)) + rng.normal(0, 3, (h, w))
    gray = np.clip(base, 0, 255).astype(np.uint8)
    mode = MODES[index % len(MODES)]
    if mode == "L":
        return Image.fromarray(gray, mode="L")
    rgb = np.stack([gray, gray, np.clip(gray.astype(int) + 5, 0, 255).astype(np.uint8)], axis=-1)
    img = Image.fromarray(rgb, mode="RGB")
    if mode == "RGBA":
        img.putalpha(255)
    return img


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG" and img.mode == "RGBA":
        img = img.convert("RGB")
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_dataset(
    root: str | Path,
    n_covid: int = 8,
    n_noncovid: int = 8,
    seed: int = 0,
    splits: tuple[float, float, float] = (0.5, 0.25, 0.25),
) -> Path:
    """Write ``root/CT_COVID``, ``root/CT_NonCOVID`` and ``root/Data-split`` lists; return root.

    File names follow upstream's shapes (``paper-p3-89%0.png``, ``12%1.jpg``); every
    fourth COVID image is JPEG data in a ``.png`` file.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for folder, (short, label) in CLASSES.items():
        n = n_covid if label else n_noncovid
        (root / folder).mkdir(parents=True, exist_ok=True)
        names = []
        for i in range(n):
            img = make_image(label, i, rng)
            if label:
                name = f"2020.02.{10 + i // 3}.2002{i:04d}-p{i % 7}-{40 + i}%{i % 3}.png"
                fmt = "JPEG" if i % 4 == 3 else "PNG"  # JPEG data named .png, as upstream
            else:
                fmt = "JPEG" if i % 2 else "PNG"
                name = f"{i}%{i % 2}.{'jpg' if fmt == 'JPEG' else 'png'}"
            (root / folder / name).write_bytes(encode(img, fmt))
            names.append(name)
        write_split_lists(root, short, names, splits)
    return root


def write_split_lists(root: Path, short: str, names: list[str], splits: tuple[float, float, float]) -> None:
    """``root/Data-split/<short>/{train,val,test}CT_<short>.txt``: the first ``splits[0]`` of ``names`` train,
    the next ``splits[1]`` val, the rest test."""
    n_train, n_val = round(len(names) * splits[0]), round(len(names) * splits[1])
    parts = {"train": names[:n_train], "val": names[n_train : n_train + n_val], "test": names[n_train + n_val :]}
    split_dir = root / "Data-split" / short
    split_dir.mkdir(parents=True, exist_ok=True)
    for part, members in parts.items():
        (split_dir / f"{part}CT_{short}.txt").write_text("".join(m + "\n" for m in members))


def first_listed(root: str | Path, split_list: str, folder: str) -> str:
    """The relpath of the first image named by ``Data-split/<split_list>``, e.g. ``CT_COVID/...png``."""
    return f"{folder}/{(Path(root) / 'Data-split' / split_list).read_text().split()[0]}"


def plant_near_duplicate(
    root: str | Path, source: str, folder: str, split_list: str, name: str, scale: float = 0.8
) -> str:
    """File a rescaled, re-encoded (JPEG) copy of ``source`` as ``folder/name``, listed in ``split_list``
    (e.g. ``NonCOVID/trainCT_NonCOVID.txt``): what sha256 cannot see and a perceptual hash can."""
    root = Path(root)
    img = Image.open(root / source).convert("RGB")
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR)
    img.save(root / folder / name, "JPEG", quality=85)
    with open(root / "Data-split" / split_list, "a") as f:
        f.write(name + "\n")
    return f"{folder}/{name}"


PATCH = 48  # side of the bright square of make_patch_dataset's COVID images, in pixels


def patch_image(top: int | None, left: int | None, rng: np.random.Generator, size: int = 224) -> Image.Image:
    """A grey, noisy 'scan' with, where ``top, left`` are given, a bright PATCH × PATCH square there."""
    yy, xx = np.mgrid[0:size, 0:size]
    base = 90 + 20 * np.sin(xx / 17.0) * np.cos(yy / 23.0) + rng.normal(0, 12, (size, size))
    if top is not None:
        base[top : top + PATCH, left : left + PATCH] = 235 + rng.normal(0, 6, (PATCH, PATCH))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def make_patch_dataset(root: str | Path, n: int = 16, seed: int = 0, size: int = 224) -> Path:
    """Evidence placed by hand: every COVID image has a bright square somewhere, no non-COVID image has one.

    ``root/CT_COVID``, ``root/CT_NonCOVID`` (PNG, grayscale, ``size`` pixels square), ``n`` of each;
    the squares' positions are random, so that the classifier learns the square, not a place.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for folder in ("CT_COVID", "CT_NonCOVID"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            top, left = rng.integers(0, size - PATCH, 2) if folder == "CT_COVID" else (None, None)
            patch_image(top, left, rng, size).save(root / folder / f"{folder.lower()}-{i}.png")
    return root


MARK = 10  # side of border_mark_dataset's white square, in pixels
MARK_AT = 4  # its distance from the picture's top and left edges, in pixels


def body_picture(index: int, seed: int, mark: bool) -> Image.Image:
    """A CT-like slice (grayscale): a bright oval body with two darker lungs on black, its shape, place
    and texture drawn from ``(seed, index)``; with ``mark``, a white MARK × MARK square MARK_AT pixels from
    the top left corner, outside the body."""
    rng = np.random.default_rng([seed, index])
    h, w = 160 + 8 * (index % 3), 176 + 8 * (index % 2)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h / 2 + rng.uniform(-4, 4), w / 2 + rng.uniform(-4, 4)
    body = ((yy - cy) / (0.30 * h)) ** 2 + ((xx - cx) / rng.uniform(0.32 * w, 0.36 * w)) ** 2 <= 1
    relief = Image.fromarray(rng.uniform(0, 1, (6, 6)).astype(np.float32), mode="F")
    texture = np.asarray(relief.resize((w, h), Image.Resampling.BICUBIC))
    picture = rng.uniform(0, 8, (h, w))  # air around the body
    picture[body] = (130 + 40 * texture + rng.normal(0, 10, (h, w)))[body]
    for side in (-1, 1):
        ly, lx, ay, ax = cy + rng.uniform(-3, 3), cx + side * 0.16 * w, 0.2 * h, rng.uniform(0.09, 0.12) * w
        lung = ((yy - ly) / ay) ** 2 + ((xx - lx) / ax) ** 2 <= 1
        picture[lung] = (60 + 30 * texture + rng.normal(0, 8, (h, w)))[lung]
    if mark:
        picture[MARK_AT : MARK_AT + MARK, MARK_AT : MARK_AT + MARK] = 255
    return Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8), mode="L")


def border_mark_dataset(
    root: str | Path,
    per_class: int = 24,
    seed: int = 0,
    twins: bool = True,
    splits: tuple[float, float, float] = (0.5, 0.25, 0.25),
) -> Path:
    """Two classes that differ ONLY by a mark on the border: every COVID picture has a small white square
    in its top left corner (MARK pixels, MARK_AT from the edges), outside the body; nothing else tells them apart.

    ``root/CT_COVID``, ``root/CT_NonCOVID`` (``per_class`` grayscale PNGs each, CT-like bodies of
    ``body_picture``) and ``root/Data-split`` lists like ``make_dataset``'s (the first half train, a quarter
    val, a quarter test per class). With ``twins`` (the default) picture ``i`` of each class shows the same
    body, pixel for pixel, and the two sit in the same official split: a view that drops the mark (``body``,
    ``body-blank``) sees the same pictures in both classes, so nothing can tell them apart there (chance, AUC
    0.5), while the whole picture gives the class away. The twins are near-duplicates across classes, as the
    validation gate would say (and ``official-clean`` would leave out their test images); ``twins=False``
    draws every picture its own body. One patient per picture (``<name>%0.png``).
    """
    root = Path(root)
    for folder, (short, label) in CLASSES.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        names = []
        for i in range(per_class):
            picture = body_picture(i if twins else 2 * i + label, seed, mark=bool(label))
            name = f"mark-{i:03d}%0.png" if label else f"plain-{i:03d}%0.png"
            picture.save(root / folder / name, format="PNG")
            names.append(name)
        write_split_lists(root, short, names, splits)
    return root
