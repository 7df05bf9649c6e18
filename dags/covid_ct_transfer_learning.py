"""
### COVID-19 in chest CT: deep transfer learning, one Spark job per backbone

Reproduces and extends Benbrahim et al. (2021): ImageNet CNN features + logistic regression
on the UCSD COVID-CT dataset (349 COVID / 397 non-COVID images).

1. **fetch_dataset** downloads (or copies) the dataset, verified and atomic; a no-op when unchanged.
2. **validate_dataset** gates it with Great Expectations (counts, decodability, duplicates, splits).
3. **select_backbones** routes to the backbones chosen in the trigger form; the others are skipped.
4. **train_vgg16 / train_vgg19 / train_xception**: one `spark-submit` each of
   `jobs/transfer_learning.py` (featurize once, then fit and evaluate every chosen split).
   The cluster is the `spark_default` connection: `local[*]`, a standalone master, YARN or
   Kubernetes, without changing this file.
5. **report** compares the backbones (tables with 95 % CIs, ROC, confusion, calibration, McNemar);
   it runs when at least one chosen backbone succeeded and names those that failed (a run with
   a failed backbone stays green if the report could compare the rest; the failed task is red).

Outputs: `$COVIDCT_HOME/runs/<run id>/<backbone>/<split>/` and `$COVIDCT_HOME/runs/<run id>/report/`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import Param, chain, dag, task

from covidct import paths, pipeline
from covidct.backbone import POOLINGS, PRECISIONS
from covidct.operators import TransferLearningSubmitOperator
from covidct.split import SPLITS

JOB = Path(__file__).resolve().parents[1] / "jobs" / "transfer_learning.py"


@dag(
    dag_id="covid_ct_transfer_learning",
    schedule="@weekly",  # scheduled retraining; the feature cache makes unchanged data cheap
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=2)},
    tags=["covid-ct", "spark", "transfer-learning"],
    user_defined_macros={"run_dir": lambda run_id: str(paths.run_dir(run_id))},
    params={
        "backbones": Param(
            list(pipeline.DAG_BACKBONES),
            type="array",
            items={"type": "string", "enum": list(pipeline.DAG_BACKBONES)},
            minItems=1,
            uniqueItems=True,
            description="ImageNet backbones to compare (one Spark job each).",
        ),
        "splits": Param(
            ["official", "random70"],
            type="array",
            items={"type": "string", "enum": list(SPLITS)},
            minItems=1,
            uniqueItems=True,
            description="official: the published patient-level lists; random70: seeded 70/30 (the study's protocol).",
        ),
        "seed": Param(42, type="integer", minimum=0, description="Seed of the random70 split and of random weights."),
        "weights": Param(
            "imagenet",
            type="string",
            minLength=1,
            description="imagenet (from $COVIDCT_WEIGHTS_DIR, else Keras' cache/download), "
            "none (random weights: mechanics only, flagged in the report) or a weights file path.",
        ),
        "pooling": Param(
            "avg",
            type="string",
            enum=list(POOLINGS),
            description="avg: global average of the last conv block; flatten: it flattened, as sparkdl did; "
            "avg-b345: global averages of conv blocks 3, 4 and 5 concatenated; avgmax-b345: those plus the "
            "blocks' global maxima. The multi-layer ones exist for VGG16 and VGG19 only here (untick Xception).",
        ),
        "precision": Param(
            "float32",
            type="string",
            enum=list(PRECISIONS),
            description="float32 (faithful), or bfloat16: ~2x faster featurization on CPUs with AVX512_BF16/AMX "
            "(features within ~1 %).",
        ),
        "data_source": Param(
            None,
            type=["null", "string"],
            description="Empty: $COVIDCT_DATA_SOURCE, else upstream GitHub. Or a mirror URL, a dataset folder, "
            "or a folder holding the two zips.",
        ),
        "expect_covid": Param(349, type="integer", minimum=1, description="Expected COVID images."),
        "expect_noncovid": Param(397, type="integer", minimum=1, description="Expected non-COVID images."),
        "feature_cache": Param(True, type="boolean", description="Reuse cached features of unchanged images."),
    },
)
def covid_ct_transfer_learning():
    @task
    def fetch_dataset(params=None) -> str:
        return pipeline.fetch_dataset(params["data_source"], params["expect_covid"], params["expect_noncovid"])

    @task
    def validate_dataset(data_dir: str, params=None) -> None:
        pipeline.validate_dataset(data_dir, params["expect_covid"], params["expect_noncovid"])

    @task.branch
    def select_backbones(params=None) -> list[str]:
        return pipeline.select_backbones(params["backbones"], params["pooling"])

    # all_done, not all_done_min_one_success: the latter skips when a backbone was not chosen.
    # The task itself fails when no chosen backbone succeeded.
    @task(trigger_rule="all_done")
    def report(params=None, run_id=None, ti=None) -> str:
        train_ids = [pipeline.train_task_id(b) for b in params["backbones"]]
        states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[run_id], task_ids=train_ids)[run_id]
        return pipeline.build_run_report(str(paths.run_dir(run_id)), params["backbones"], states)

    data_dir = fetch_dataset()
    trains = [
        TransferLearningSubmitOperator(
            task_id=pipeline.train_task_id(backbone),
            conn_id="spark_default",
            application=str(JOB),
            name=f"covidct-{backbone.lower()}",
            driver_memory="4g",
            application_args=[
                "--data",
                "{{ ti.xcom_pull(task_ids='fetch_dataset') }}",
                "--backbone",
                backbone,
                "--split",
                "{{ params.splits | join(',') }}",
                "--seed",
                "{{ params.seed }}",
                "--weights",
                "{{ params.weights }}",
                "--pooling",
                "{{ params.pooling }}",
                "--precision",
                "{{ params.precision }}",
                "--cache",
                "{{ 'on' if params.feature_cache else 'off' }}",
                "--out",
                "{{ run_dir(run_id) }}/" + backbone.lower(),
            ],
            # fmt: on  # fmt: skip
        )
        for backbone in pipeline.DAG_BACKBONES
    ]
    chain(data_dir, validate_dataset(data_dir), select_backbones(), trains, report())


covid_ct_transfer_learning()
