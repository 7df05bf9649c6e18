"""The promotion gate: does this run's best model replace the registry's champion?

The rule (``decide``), on the official patient-level test split only:

1. The **challenger** is the run's best model on ``official`` by AUC: a backbone, or the
   ensemble (its product method, the mean) where the run has one.
2. A challenger trained with **random weights** is never promoted; neither is a run without
   ``official`` results (nothing to compare on) or one not logged to MLflow.
3. With **no champion** yet, the challenger is promoted (the first run).
4. Else both are compared **on the same images**: the official test images that both predicted
   (by relative path, labels equal; at least half of the challenger's test images). A paired
   bootstrap over patients (whole patients resampled, as the report's CIs; 2000 resamples, seed
   20210) gives the 95 % percentile interval of ``AUC(challenger) - AUC(champion)``. The
   challenger is **promoted when the interval's lower bound is at or above -TOLERANCE**
   (-0.02): it is not worse than the champion by more than 0.02 AUC, at 95 % confidence
   (a non-inferiority test). An identical retrain (difference 0) is promoted; a challenger
   whose AUC may be 0.02 or more below the champion's is not.

The champion's side comes from what was recorded when it was promoted: its official-split
predictions, logged as an artifact and named by the model version's tag
``covidct.gate_predictions``. Nothing is re-scored.

``promote(run_dir, parent_run_id)`` decides, registers and moves the ``champion`` alias when
promoted, writes ``RUN_DIR/promotion.json``, adds the decision to the report and tags the
DAG run's MLflow run with it (``covidct.promotion.*``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from covidct.core.errors import CovidctError
from covidct.data.dataset import group_key
from covidct.lifecycle import job_logging, runs, store
from covidct.modelling import stats

log = logging.getLogger(__name__)

SPLIT = "official"
TOLERANCE = 0.02
N_RESAMPLES = stats.N_RESAMPLES
SEED = stats.SEED
LEVEL = stats.LEVEL
#: The champion must have predicted at least this share of the challenger's test images.
MIN_COMMON = 0.5
DECISION_FILE = "promotion.json"
GATE_PREDICTIONS_TAG = "covidct.gate_predictions"
PREDICTIONS_ARTIFACT = "promotion/official_predictions.parquet"
RULE = (
    f"paired patient-level bootstrap ({N_RESAMPLES} resamples, seed {SEED}) of AUC(challenger) - AUC(champion) "
    f"on the official test images both predicted; promote when the {LEVEL:.0%} interval's lower bound is at or above "
    f"-{TOLERANCE}; random weights never; the first run promotes"
)


@dataclass
class Candidate:
    """A model of the run on the official split: a backbone or the ensemble (mean)."""

    label: str  # "VGG19", "Ensemble"
    kind: str  # backbone | ensemble
    folder: Path  # its metrics.json folder
    metrics: dict
    model_uri: str | None  # the MLflow model its job logged (models:/m-...)

    @property
    def random_weights(self) -> bool:
        return bool(self.metrics.get("random_weights"))

    @property
    def auc(self) -> float | None:
        return self.metrics.get("auc")

    def predictions(self) -> pd.DataFrame:
        frame = pd.read_parquet(self.folder / "predictions.parquet")
        return frame[["relpath", "label", "probability"]].sort_values("relpath", kind="stable").reset_index(drop=True)


@dataclass
class PromotionDecision:
    promoted: bool
    reason: str
    challenger: str | None = None
    challenger_kind: str | None = None
    challenger_auc: float | None = None
    challenger_random_weights: bool | None = None
    champion: str | None = None  # "covid-ct v3" (the one compared with)
    n_common: int | None = None
    auc_challenger: float | None = None  # on the common images
    auc_champion: float | None = None
    delta: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n_patients: int | None = None
    tolerance: float = TOLERANCE
    resamples: int = N_RESAMPLES
    rule: str = RULE
    version: str | None = None  # the new champion's version
    decided_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_json(self) -> dict:
        return asdict(self)

    def tags(self) -> dict[str, str]:
        """``covidct.promotion.*`` tags (None left out; floats with 4 decimals)."""
        out = {}
        for key, value in self.to_json().items():
            if value is None or key == "rule":
                continue
            out[f"covidct.promotion.{key}"] = f"{value:.4f}" if isinstance(value, float) else str(value)
        out["covidct.promotion.decision"] = "promoted" if self.promoted else "kept champion"
        return out


# --------------------------------------------------------------------------- the challenger


def candidates(run_dir: Path) -> list[Candidate]:
    """The run's official-split models: each backbone, and the ensemble's product method."""
    from covidct.modelling.runfolder import canonical_backbone, find_metrics

    found = []
    for path in find_metrics([Path(run_dir)], skip=(Path(run_dir) / "report").resolve()):
        metrics = json.loads(path.read_text(encoding="utf-8"))
        if metrics.get("split") != SPLIT or not (path.parent / "predictions.parquet").exists():
            continue
        if metrics.get("ensemble"):
            if not metrics.get("product_method"):
                continue  # the stack is reported, never served
            info = runs.read_info(path.parents[2])  # RUN_DIR/ensemble/official/mean -> RUN_DIR/ensemble
            uri = (info or {}).get("models", {}).get("ensemble")
            found.append(Candidate("Ensemble", "ensemble", path.parent, metrics, uri))
        else:
            job = path.parent if (path.parent / runs.INFO_FILE).exists() else path.parent.parent
            info = runs.read_info(job)
            uri = (info or {}).get("models", {}).get(SPLIT)
            found.append(
                Candidate(canonical_backbone(metrics.get("backbone", "")), "backbone", path.parent, metrics, uri)
            )
    return found


def best_candidate(run_dir: Path) -> Candidate | None:
    """The highest official AUC (ties: the ensemble, then the backbones' order)."""
    found = [c for c in candidates(run_dir) if c.auc is not None]
    if not found:
        return None
    return sorted(found, key=lambda c: (-c.auc, c.kind != "ensemble", c.label))[0]


# --------------------------------------------------------------------------- the comparison


def paired_auc_difference(y, score_a, score_b, groups, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                          level: float = LEVEL) -> tuple[float, float, float]:  # fmt: skip
    """``(delta, low, high)``: AUC(a) - AUC(b) and its percentile interval, resampling whole groups.

    Both models see the same resamples (paired), so what they share (the images' difficulty)
    cancels out of the difference.
    """
    y = np.asarray(y).astype(int)
    a, b = np.asarray(score_a, dtype=float), np.asarray(score_b, dtype=float)
    if len(np.unique(y)) < 2:
        raise CovidctError("the common test images hold one class only: the AUCs cannot be compared")
    _, codes = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    ones = np.ones((1, len(y)))
    delta = float(
        stats.weighted_metrics(y, a > 0.5, a, ones)["auc"][0] - stats.weighted_metrics(y, b > 0.5, b, ones)["auc"][0]
    )
    rng = np.random.default_rng(seed)
    diffs = []
    done = 0
    while done < n_resamples:
        size = min(500, n_resamples - done)
        w = stats.resample_weights(len(y), codes, size, rng)
        diffs.append(stats.weighted_metrics(y, a > 0.5, a, w)["auc"] - stats.weighted_metrics(y, b > 0.5, b, w)["auc"])
        done += size
    values = np.concatenate(diffs)
    values = values[np.isfinite(values)]
    alpha = (1 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return delta, float(low), float(high)


def compare(challenger: pd.DataFrame, champion: pd.DataFrame, tolerance: float = TOLERANCE) -> dict:
    """The gate's numbers and verdict for two ``relpath, label, probability`` frames."""
    joined = challenger.merge(champion, on="relpath", suffixes=("_new", "_champion"))
    joined = joined[joined["label_new"] == joined["label_champion"]]
    n_common = len(joined)
    out: dict = {"n_common": n_common}
    if n_common < MIN_COMMON * len(challenger):
        out.update(promoted=False, reason=f"the champion predicted only {n_common} of the challenger's "
                   f"{len(challenger)} official test images: not comparable, champion kept")  # fmt: skip
        return out
    y = joined["label_new"].to_numpy()
    groups = [group_key(p) for p in joined["relpath"]]
    delta, low, high = paired_auc_difference(y, joined["probability_new"], joined["probability_champion"], groups)
    ones = np.ones((1, n_common))
    for side, column in (("auc_challenger", "probability_new"), ("auc_champion", "probability_champion")):
        score = joined[column].to_numpy(dtype=float)
        out[side] = float(stats.weighted_metrics(y, score > 0.5, score, ones)["auc"][0])
    promoted = low >= -tolerance - 1e-12
    verdict = "not worse" if promoted else "possibly worse"
    out.update(
        delta=delta, ci_low=low, ci_high=high, n_patients=len(set(groups)), promoted=promoted,
        reason=f"{verdict}: AUC {out['auc_challenger']:.4f} vs {out['auc_champion']:.4f} on {n_common} common images, "
        f"difference {delta:+.4f}, {LEVEL:.0%} interval [{low:+.4f}, {high:+.4f}] "
        f"({'at or above' if promoted else 'below'} -{tolerance})",
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------- the decision


def _champion_predictions(version, workdir: Path) -> pd.DataFrame | None:
    uri = (version.tags or {}).get(GATE_PREDICTIONS_TAG)
    if not uri:
        return None
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(workdir))
    frame = pd.read_parquet(local)
    return frame[["relpath", "label", "probability"]]


def decide_promotion(run_dir: Path, mlflow_client=None) -> tuple[PromotionDecision, Candidate | None]:
    from covidct.lifecycle import registry

    challenger = best_candidate(run_dir)
    if challenger is None:
        return PromotionDecision(False, "no official-split result in this run: the gate compares on the official "
                                 "patient-level test split (add official to the splits)"), None  # fmt: skip
    decision = PromotionDecision(False, "", challenger=challenger.label, challenger_kind=challenger.kind,
                                 challenger_auc=challenger.auc,
                                 challenger_random_weights=challenger.random_weights)  # fmt: skip
    if challenger.random_weights:
        decision.reason = f"{challenger.label} was trained with random weights (weights=none): never promoted"
        return decision, challenger
    if challenger.model_uri is None:
        decision.reason = f"{challenger.label} was not logged to MLflow (tracking off?): nothing to register"
        return decision, challenger
    mlflow_client = mlflow_client or store.client()
    version = registry.champion_version(mlflow_client)
    if version is None:
        decision.promoted, decision.reason = True, f"first champion: {registry.REGISTERED_MODEL} has no champion yet"
        return decision, challenger
    decision.champion = f"{registry.REGISTERED_MODEL} v{version.version}"
    with tempfile.TemporaryDirectory(prefix="covidct-gate-") as tmp:
        theirs = _champion_predictions(version, Path(tmp))
    if theirs is None:
        decision.reason = f"{decision.champion} has no recorded official predictions ({GATE_PREDICTIONS_TAG}): kept"
        return decision, challenger
    numbers = compare(challenger.predictions(), theirs)
    for key, value in numbers.items():
        setattr(decision, key, value)
    return decision, challenger


def promote(run_dir: str | Path, parent_run_id: str | None) -> PromotionDecision:
    """Decide; when promoted register the challenger and move the alias; record the decision everywhere."""
    from covidct.core.atomic import write_text_atomic
    from covidct.lifecycle import registry

    run_dir = Path(run_dir)
    mlflow_client = store.client()
    decision, challenger = decide_promotion(run_dir, mlflow_client)
    if decision.promoted:
        if parent_run_id is None:
            parent_run_id = mlflow_client.create_run(
                store.experiment_id(mlflow_client), run_name="promotion"
            ).info.run_id
        with tempfile.TemporaryDirectory(prefix="covidct-gate-") as tmp:
            path = Path(tmp) / Path(PREDICTIONS_ARTIFACT).name
            challenger.predictions().to_parquet(path, index=False)
            mlflow_client.log_artifact(parent_run_id, str(path), str(Path(PREDICTIONS_ARTIFACT).parent))
        tags = {
            GATE_PREDICTIONS_TAG: f"runs:/{parent_run_id}/{PREDICTIONS_ARTIFACT}",
            "covidct.model": challenger.label,
            "covidct.kind": challenger.kind,
            "covidct.official_auc": f"{challenger.auc:.4f}",
            "covidct.weights_id": str(challenger.metrics.get("weights_id")),
            "covidct.run_dir": str(run_dir.absolute()),
            "covidct.dag_run_parent": parent_run_id,
            **{k: v for k, v in decision.tags().items() if k != "covidct.promotion.version"},
        }
        decision.version = registry.register(challenger.model_uri, tags, mlflow_client)
        registry.set_champion(decision.version, mlflow_client)
        decision.reason += f"; now {registry.REGISTERED_MODEL} v{decision.version} (@{registry.CHAMPION_ALIAS})"
    log.info("promotion: %s (%s)", "PROMOTED" if decision.promoted else "not promoted", decision.reason)
    write_text_atomic(run_dir / DECISION_FILE, json.dumps(decision.to_json(), indent=2) + "\n")
    report_dir = run_dir / "report"
    if (report_dir / "report.html").is_file():
        from covidct.reporting.sections import append_section

        append_section(report_dir, "promotion", "promotion", decision.to_json())
    if parent_run_id is not None:
        runs.set_tags(parent_run_id, decision.tags(), mlflow_client)
        mlflow_client.log_artifact(parent_run_id, str(run_dir / DECISION_FILE), "promotion")
        if (report_dir / "report.html").is_file():
            job_logging.log_report_files(report_dir, parent_run_id, mlflow_client)
    return decision
