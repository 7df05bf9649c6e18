"""The explanation figure: the scan with the evidence for the predicted class overlaid, one panel per backbone.

The raw maps (signed, at the conv grid's size, before upsampling and before any ReLU) are what
``.npy`` files hold. The PNGs show the scan at its own size with the evidence for the predicted
class (the map, or minus the map for non-COVID, upsampled and ReLU'd) overlaid, a colour bar, and
a title naming the backbone, the probability and the method. An ensemble gets one panel per
backbone, side by side.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from covidct.data.body import FULL, apply_view
from covidct.data.dataset import LABEL_NAMES
from covidct.data.image import open_image, to_rgb
from covidct.inference.explainer import CAM


@dataclass(frozen=True)
class Panel:
    """One backbone's map of one image, as drawn."""

    backbone: str
    method: str
    probability: float
    map: np.ndarray  # raw (h, w), evidence for COVID
    view: str = FULL  # the picture the map is over: the whole picture or the body (covidct.data.body)


PAD, HEAD_H, CBAR_W, MIN_SLOT_W, DPI = 8, 52, 78, 320, 100


def layout(width: int, height: int, panels: int, max_side: int | None = None) -> dict:
    """Pixel geometry of a figure: the scan is drawn at ``(w, h)`` (the input's size unless
    ``max_side`` shrinks it) in each panel's ``box`` ``(left, top, w, h)``, from the figure's top-left."""
    scale = min(1.0, max_side / max(width, height)) if max_side else 1.0
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    slot = max(w + CBAR_W + 2 * PAD, MIN_SLOT_W)
    fig_w, fig_h = slot * panels, h + HEAD_H + PAD
    boxes = [(k * slot + PAD, HEAD_H, w, h) for k in range(panels)]
    return {"size": (fig_w, fig_h), "scan": (w, h), "boxes": boxes}


def evidence(raw: np.ndarray, covid: bool, size: tuple[int, int]) -> np.ndarray:
    """The map of the predicted class, upsampled (bilinear) to ``size`` (w, h), then ReLU'd."""
    from PIL import Image

    signed = np.asarray(raw, dtype=np.float32) * (1.0 if covid else -1.0)
    up = np.asarray(Image.fromarray(signed).resize(size, Image.Resampling.BILINEAR))
    return np.maximum(up, 0.0)


def render(
    image: bytes, name: str, headline: str, panels: list[Panel], covid: bool, max_side: int | None = None
) -> bytes:
    """The PNG: the scan with the evidence for the predicted class overlaid, one panel per backbone."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from PIL import Image

    # The scan as the backbone saw it (its view), so that the map lies over what it was computed on.
    scan = apply_view(to_rgb(open_image(image, name)), panels[0].view if panels else FULL).convert("L")
    geo = layout(scan.width, scan.height, len(panels), max_side)
    (fig_w, fig_h), (w, h) = geo["size"], geo["scan"]
    if (w, h) != scan.size:
        scan = scan.resize((w, h), Image.Resampling.BILINEAR)
    gray = np.asarray(scan)
    fig = Figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    fig.text(0.5, 1 - 5 / fig_h, headline, ha="center", va="top", fontsize=8, fontweight="bold")
    cmap = colormaps["jet"]
    target = LABEL_NAMES[int(covid)]
    for panel, (left, top, _, _) in zip(panels, geo["boxes"], strict=True):
        heat = evidence(panel.map, covid, (w, h))
        vmax = float(heat.max()) if heat.max() > 0 else 1e-9
        norm = Normalize(0.0, vmax)
        rgba = cmap(norm(heat))
        rgba[..., 3] = 0.55 * np.clip(heat / vmax, 0, 1)
        bottom = fig_h - top - h
        ax = fig.add_axes((left / fig_w, bottom / fig_h, w / fig_w, h / fig_h))
        ax.imshow(gray, cmap="gray", vmin=0, vmax=255, interpolation="none", aspect="auto")
        ax.imshow(rgba, interpolation="none", aspect="auto")
        ax.set_axis_off()
        fig.text(
            left / fig_w,
            (bottom + h + 4) / fig_h,
            f"{panel.backbone} · {panel.method} · P(COVID) = {panel.probability:.3f}",
            ha="left",
            va="bottom",
            fontsize=8,
        )
        cax = fig.add_axes(((left + w + 6) / fig_w, bottom / fig_h, 12 / fig_w, h / fig_h))
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
        bar.set_label(f"{target} evidence ({'logit' if panel.method == CAM else 'relative'})", fontsize=6)
        bar.ax.tick_params(labelsize=6)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()
