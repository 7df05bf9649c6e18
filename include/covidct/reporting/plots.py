"""The report's figures (matplotlib, Agg backend, PNG): ROC, confusion matrices, reliability.

Every figure draws several backbones of one split; a random-weight backbone is labelled
"(RANDOM WEIGHTS)" in red in legends and titles, and backbones without results are named
in a footnote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

RED = "#b00020"
RANDOM_TAG = "(RANDOM WEIGHTS)"
DPI = 110


@dataclass
class Series:
    """One backbone's results on one split, as the figures need them."""

    label: str
    random_weights: bool = False
    y: np.ndarray | None = None  # 1 = COVID; None where predictions.parquet is missing
    score: np.ndarray | None = None  # probability of COVID
    confusion: dict = field(default_factory=dict)  # tp, fp, tn, fn (metrics.json)
    auc: float | None = None

    @property
    def title(self) -> str:
        return f"{self.label} {RANDOM_TAG}" if self.random_weights else self.label

    @property
    def has_curves(self) -> bool:
        return self.y is not None and self.score is not None and len(np.unique(self.y)) == 2


def _footnote(fig, missing: list[str]) -> None:
    if missing:
        fig.text(0.01, 0.005, "Not shown: " + "; ".join(missing), fontsize=7, color=RED, ha="left", va="bottom")


def _red_legend_entries(legend, series: list[Series]) -> None:
    for text, s in zip(legend.get_texts(), series, strict=False):
        if s.random_weights:
            text.set_color(RED)
            text.set_fontweight("bold")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, format="png")
    plt.close(fig)
    return path


def roc_figure(series: list[Series], path: Path, title: str, missing: list[str] | None = None) -> Path:
    """Overlaid ROC curves, AUC in the legend, the chance diagonal dashed."""
    missing = list(missing or [])
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    drawn = []
    for s in series:
        if not s.has_curves:
            missing.append(f"{s.title} (no predictions with both classes)")
            continue
        fpr, tpr, _ = roc_curve(s.y, s.score)
        auc = "n/a" if s.auc is None else f"{s.auc:.3f}"
        ax.plot(fpr, tpr, lw=2, ls="--" if s.random_weights else "-", label=f"{s.title}  AUC {auc}")
        drawn.append(s)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":", label="chance")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="False positive rate (1 - specificity)",
           ylabel="True positive rate (sensitivity)", title=title)  # fmt: skip
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    _red_legend_entries(ax.legend(loc="lower right", fontsize=8), drawn)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _footnote(fig, missing)
    return _save(fig, path)


def confusion_figure(series: list[Series], path: Path, title: str, missing: list[str] | None = None) -> Path:
    """One 2x2 panel per backbone: counts and the share of each actual class."""
    missing = list(missing or [])
    n = max(len(series), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n + 0.4, 3.9), squeeze=False)
    for ax, s in zip(axes[0], series, strict=False):
        c = s.confusion or {}
        matrix = np.array([[c.get("tn", 0), c.get("fp", 0)], [c.get("fn", 0), c.get("tp", 0)]], dtype=float)
        rows = matrix.sum(axis=1, keepdims=True)
        share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
        ax.imshow(share, cmap="Reds" if s.random_weights else "Blues", vmin=0, vmax=1)
        for i in range(2):
            for j in range(2):
                ax.text(j, i, f"{int(matrix[i, j])}\n{share[i, j]:.0%}", ha="center", va="center",
                        color="white" if share[i, j] > 0.6 else "black", fontsize=11)  # fmt: skip
        ax.set_xticks([0, 1], ["non-COVID", "COVID"])
        ax.set_yticks([0, 1], ["non-COVID", "COVID"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        label = s.label + ("\n" + RANDOM_TAG if s.random_weights else "")
        ax.set_title(label, color=RED if s.random_weights else "black", fontsize=10,
                     fontweight="bold" if s.random_weights else "normal")  # fmt: skip
    if not series:
        axes[0][0].axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _footnote(fig, missing)
    return _save(fig, path)


def calibration_figure(
    series: list[Series], path: Path, title: str, missing: list[str] | None = None, n_bins: int = 10
) -> Path:
    """Reliability diagram (observed COVID share per predicted-probability bin) over a histogram."""
    missing = list(missing or [])
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(6.2, 6.4), height_ratios=(3, 1), sharex=True)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":", label="perfectly calibrated")
    drawn = []
    for s in series:
        if not s.has_curves:
            missing.append(f"{s.title} (no predictions with both classes)")
            continue
        bins = int(min(n_bins, max(2, len(s.y) // 10)))
        observed, predicted = calibration_curve(s.y, s.score, n_bins=bins, strategy="uniform")
        line = ax.plot(predicted, observed, marker="o", lw=1.5, ls="--" if s.random_weights else "-",
                       label=s.title)[0]  # fmt: skip
        hist.hist(s.score, bins=np.linspace(0, 1, n_bins + 1), histtype="step", lw=1.5, color=line.get_color())
        drawn.append(s)
    # the diagonal is the first legend entry
    legend = ax.legend(loc="upper left", fontsize=8)
    _red_legend_entries(legend, [Series("diagonal")] + drawn)
    ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), ylabel="observed share of COVID", title=title)
    ax.grid(alpha=0.3)
    hist.set(xlabel="predicted probability of COVID", ylabel="test images")
    hist.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _footnote(fig, missing)
    return _save(fig, path)


@dataclass
class SeedSeries:
    """One model's figures over repeated random splits (one value per seed)."""

    label: str
    accuracy: np.ndarray
    auc: np.ndarray
    random_weights: bool = False
    study_accuracy: float | None = None  # the study's figure to mark, where there is one

    @property
    def title(self) -> str:
        return f"{self.label} {RANDOM_TAG}" if self.random_weights else self.label


def seeds_figure(series: list[SeedSeries], path: Path, title: str) -> Path:
    """Accuracy and AUC per seed: a box and the points (jittered) per model; the study's accuracy as a red diamond."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.9 + 0.75 * max(len(series), 2) + 1.2))
    rng = np.random.default_rng(0)
    positions = np.arange(len(series))[::-1]
    for ax, metric, name in ((axes[0], "accuracy", "Accuracy"), (axes[1], "auc", "AUC")):
        values = [np.asarray(getattr(s, metric), dtype=float) for s in series]
        values = [v[np.isfinite(v)] for v in values]
        ax.boxplot(values, positions=positions, vert=False, widths=0.5, whis=(0, 100), showfliers=False,
                   medianprops={"color": "black"})  # fmt: skip
        marked = False
        for pos, v, s in zip(positions, values, series, strict=True):
            jitter = rng.uniform(-0.12, 0.12, len(v))
            ax.scatter(v, pos + jitter, s=18, alpha=0.75, color=RED if s.random_weights else "C0", zorder=3)
            if metric == "accuracy" and s.study_accuracy is not None:
                label = None if marked else "the study's accuracy"
                ax.scatter([s.study_accuracy], [pos], marker="D", s=60, color=RED, zorder=4, label=label)
                marked = True
        ax.set_yticks(positions, [s.title for s in series])
        for tick, s in zip(ax.get_yticklabels(), series, strict=True):
            if s.random_weights:
                tick.set_color(RED)
        ax.set_xlabel(f"{name} per seed")
        ax.grid(alpha=0.3, axis="x")
        if marked:
            ax.legend(loc="lower left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
