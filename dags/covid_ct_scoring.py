"""
### COVID-19 in chest CT: scoring new scans with the champion model

Runs by itself whenever the transfer-learning DAG promotes a new champion (the registered
model's `champion` alias; an Airflow Asset event), and on demand with a `folder` of scans.

1. **check_folder** holds the `folder` param to the operator's allowlist (empty: the incoming
   folder, `$COVIDCT_INCOMING_DIR`, else `$COVIDCT_HOME/incoming`; others must be inside
   `$COVIDCT_ALLOWED_SCORING_DIRS`). A folder not allowed fails the run at once, before any Spark job.
2. **champion** resolves the champion in the MLflow registry and downloads it (a backbone's
   PipelineModel or the ensemble); no champion yet fails the run, saying what creates one.
3. **score**: one `spark-submit` of `jobs/score.py` on the `spark_default` connection. Every image
   of the folder is read and checked in the workers; files that cannot be scored are listed with
   the reason (the rest are scored); an image (by sha256) this model version already scored is not
   scored again (the ledger `$COVIDCT_HOME/scores/_ledger/`).

DICOM CT files are scored slice by slice (Hounsfield units through the `window` param, the lung
window by default; multi-frame files frame by frame), and each series gets one result (the mean of
its top 10 % slice probabilities). Outputs carry keyed hashes of the DICOM UIDs, never patient
data. Research use only, not for diagnosis: the models learned from figures in papers.

Outputs: `$COVIDCT_HOME/scores/<run id>/`: `predictions.parquet` and `.csv` (path, sha256, model
name and version, probability of COVID, label, new, scored_run, scored_at; DICOM slices: frame,
hashed UIDs, modality, slice thickness, kernel, window), `series.parquet` and `.csv`,
`unreadable.csv`, `summary.json`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from airflow.sdk import Param, chain, dag, task

from covidct.core import paths
from covidct.orchestration import alerts, bounds, policy, scoring_tasks
from covidct.orchestration.assets import CHAMPION_ASSET
from covidct.orchestration.operators import ScoringSubmitOperator

JOB = Path(__file__).resolve().parents[1] / "jobs" / "score.py"
CHAMPION = "{{ ti.xcom_pull(task_ids='champion')"


@dag(
    dag_id="covid_ct_scoring",
    schedule=[CHAMPION_ASSET],  # a new champion scores the incoming folder with it
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    default_args={
        "retries": 2,
        "retry_delay": timedelta(minutes=2),
        "on_failure_callback": alerts.task_failed,
    },
    dagrun_timeout=bounds.timeout("scoring_run"),
    on_failure_callback=alerts.run_failed,
    tags=["covid-ct", "spark", "scoring"],
    user_defined_macros={"scores_dir": lambda run_id: str(paths.run_scores_dir(run_id))},
    params={
        "folder": Param(
            None,
            type=["null", "string"],
            pattern=policy.FOLDER_PATTERN,
            maxLength=policy.MAX_LENGTH,
            description="Empty: the incoming folder ($COVIDCT_INCOMING_DIR, else $COVIDCT_HOME/incoming). Or the "
            "absolute path of a folder of scans inside one the operator allows ($COVIDCT_ALLOWED_SCORING_DIRS).",
        ),
        "window": Param(
            "-600,1500",
            type="string",
            pattern=r"^-?\d{1,4}(\.\d+)?,\d{1,5}(\.\d+)?$",
            description="DICOM CT slices: the display window LEVEL,WIDTH in Hounsfield units that maps them to 8 "
            "bits (-600,1500: the lung window); recorded with every DICOM result. Images (PNG, JPEG) ignore it.",
        ),
    },
)
def covid_ct_scoring():
    @task(execution_timeout=bounds.timeout("select"))
    def check_folder(params=None) -> str:
        return scoring_tasks.check_folder_param(params["folder"])

    @task(execution_timeout=bounds.timeout("champion"))
    def champion() -> dict[str, str]:
        return scoring_tasks.resolve_champion()

    score = ScoringSubmitOperator(
        task_id="score",
        conn_id="spark_default",
        application=str(JOB),
        name="covidct-score",
        driver_memory="4g",
        execution_timeout=bounds.timeout("score"),
        application_args=[
            "--images",
            "{{ ti.xcom_pull(task_ids='check_folder') }}",
            "--model",
            CHAMPION + "['model_dir'] }}",
            "--model-name",
            CHAMPION + "['name'] }}",
            "--model-version",
            CHAMPION + "['version'] }}",
            "--window={{ params.window }}",  # one argument: a level like -600 would read as an option
            "--out",
            "{{ scores_dir(run_id) }}",
        ],
    )
    chain(check_folder(), champion(), score)


covid_ct_scoring()
