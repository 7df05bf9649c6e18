"""Run folders as the training job writes them (``metrics.json`` beside a Spark-style
``predictions.parquet`` folder and a ``model/``), from deterministic synthetic predictions; no Spark.
The report's, the ensemble task's and the promotion section's tests build on them."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

#: backbone -> (separation of the classes' scores, random weights)
BACKBONES = {"VGG16": (1.3, False), "VGG19": (1.1, False), "Xception": (0.2, True)}
SPLITS = ("official", "random70")


def split_images(split: str, seed: int = 42) -> list[tuple[str, int]]:
    """(relpath, label) of a split's test images; cases have 1-3 slices named ``%<n>`` like upstream.

    ``official-clean``: official's without its first image (as if it had a near-duplicate in the other class).
    """
    if split == "official-clean":
        return split_images("official", seed)[1:]
    rng = np.random.default_rng({"official": 1, "random70": 2}[split] * 1000 + seed)
    cases = 30 if split == "official" else 40
    images = []
    for case in range(cases):
        label = case % 2
        for k in range(int(rng.integers(1, 4))):
            name = (
                f"CT_COVID/2020.03.{case:02d}.2003{case:04d}-p2-{case}%{k}.png"
                if label
                else f"CT_NonCOVID/{case}%{k}.jpg"
            )
            images.append((name, label))
    return images


def predictions(backbone: str, split: str, seed: int = 42) -> pd.DataFrame:
    strength, _random = BACKBONES[backbone]
    rows = split_images(split, seed)
    rng = np.random.default_rng([list(BACKBONES).index(backbone), (*SPLITS, "official-clean").index(split), seed])
    labels = np.array([label for _, label in rows])
    logits = (2 * labels - 1) * strength + rng.normal(0, 1.2, len(rows))
    probability = 1 / (1 + np.exp(-logits))
    return pd.DataFrame(
        {
            "path": [f"file:/data/COVID-CT/{p}" for p, _ in rows],
            "relpath": [p for p, _ in rows],
            "label": labels.astype("int32"),
            "probability": probability,
            "prediction": (probability > 0.5).astype("int32"),
        }
    )


def spark_like_metrics(frame: pd.DataFrame) -> dict:
    """What evaluate.evaluate computes (Spark's evaluators), here with sklearn."""
    y, pred = frame["label"].to_numpy(), frame["prediction"].to_numpy()
    (tn, fp), (fn, tp) = confusion_matrix(y, pred, labels=[0, 1])
    precision, recall, f1, _ = precision_recall_fscore_support(y, pred, average="weighted", zero_division=0)
    return {
        "accuracy": float((tp + tn) / len(y)),
        "weightedPrecision": float(precision),
        "weightedRecall": float(recall),
        "f1": float(f1),
        "auc": float(roc_auc_score(y, frame["probability"])),
        "sensitivity": float(tp / (tp + fn)),
        "specificity": float(tn / (tn + fp)),
        "confusion": {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)},
    }


def write_result(target: Path, backbone: str, split: str, seed: int = 42) -> dict:
    """``target/metrics.json``, ``target/predictions.parquet/`` (Spark's layout) and ``target/model/``."""
    frame = predictions(backbone, split, seed)
    random = BACKBONES[backbone][1]
    folder = target / "predictions.parquet"
    folder.mkdir(parents=True)
    part = f"part-00000-{uuid.uuid4()}-c000.snappy.parquet"
    frame.to_parquet(folder / part, index=False)
    (folder / "_SUCCESS").write_text("")
    (folder / f".{part}.crc").write_bytes(b"crc junk")
    (target / "model" / "metadata").mkdir(parents=True)
    (target / "model" / "metadata" / "part-00000").write_text("{}")
    metrics = {
        "backbone": backbone,
        "split": split,
        "seed": seed,
        "weights": "none" if random else "imagenet",
        "weights_id": f"random-seed{seed}" if random else "sha256-0123456789abcdef",
        "random_weights": random,
        "pooling": "avg",
        "feature_dim": 512,
        "n_images": 746,
        "n_train": 500,
        "n_test": len(frame),
        **spark_like_metrics(frame),
        "lr": {"maxIter": 20, "regParam": 0.05, "elasticNetParam": 0.3},
        "timings": {"featurize_s": 321.5, "fit_s": 12.3, "evaluate_s": 3.5, "total_s": 360.0},
        "cache": {"enabled": True, "hits": 700, "misses": 46, "dir": "/cache/x"},
        "versions": {"spark": "4.2.0", "tensorflow": "2.21.0", "keras": "3.15.1"},
        "data_dir": "/data/COVID-CT",
        "created_at": "2026-11-25T22:00:57+00:00",
    }
    (target / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def make_run(run_dir: Path, backbones=tuple(BACKBONES), seed: int = 42) -> Path:
    """VGG16/VGG19 as multi-split jobs (``<bb>/<split>/``), Xception as single-split jobs (``OUT/``)."""
    for backbone in backbones:
        for split in SPLITS:
            if backbone == "Xception":
                write_result(run_dir / f"xception-{split}-only", backbone, split, seed)
            else:
                write_result(run_dir / backbone.lower() / split, backbone, split, seed)
    return run_dir
