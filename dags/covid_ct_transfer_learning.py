"""
### COVID-19 in chest CT: deep transfer learning, one Spark job per backbone

Reproduces and extends Benbrahim et al. (2021): ImageNet CNN features + logistic regression
on the UCSD COVID-CT dataset (349 COVID / 397 non-COVID images).

1. **fetch_dataset** downloads (or copies) the dataset, verified and atomic; a no-op when unchanged.
2. **validate_dataset** gates it with Great Expectations (counts, decodability, duplicates, splits);
   data that already passed (same manifest, expectations and code) are not validated again.
3. **check_changes** compares the run's fingerprint (dataset manifest, params, weights ids,
   preprocessing, code) with the last successful run's: unchanged, it skips every later task and
   the run ends green, saying "unchanged since run X" (param `force` retrains anyway).
4. **select_backbones** routes to the backbones chosen in the trigger form; the others are skipped.
5. **train_vgg16 / train_vgg19 / train_xception**: one `spark-submit` each of
   `jobs/transfer_learning.py` (featurize once, then fit and evaluate every chosen split).
   The cluster is the `spark_default` connection: `local[*]`, a standalone master, YARN or
   Kubernetes, without changing this file.
   With `seeds` (e.g. `0-9`) each job also repeats the random70 split per seed from the same features.
   Param `view` shows the backbones only the body (`body`, `body-blank`), `flips` adds test-time flips;
   each job also measures where each model's evidence lies (its share inside the body).
6. **ensemble** combines the backbones that succeeded (two or more): the mean of their COVID
   probabilities (the product's model, `covidct predict --model <run>/ensemble`) and, with param
   `stacked`, a stacked LR fitted on out-of-fold training predictions only (each train job then
   also fits its LR once per fold on the other folds: 5 more fits per split).
7. **report** compares the backbones and the ensembles (tables with 95 % CIs, ROC, confusion,
   calibration, McNemar; mean ± sd over seeds), beside shortcut baselines that never see the anatomy
   and where each backbone's evidence lies; it runs when at least one chosen backbone succeeded
   and names those that failed (a run with a failed backbone stays green if the report could compare
   the rest; the failed task is red).
8. **promote** compares the run's best model on the official split (a backbone or the ensemble) with
   the registry's champion (`covid-ct@champion`) on the same test images: promoted when a paired
   patient-level bootstrap of the AUC difference has its 95 % lower bound at or above -0.02 (the
   first run promotes; random weights never). On promotion it emits the `covid_ct_champion` asset
   event; otherwise it is skipped (no event).
9. **record_success** records the run as the last successful one (its fingerprint), only when every
   other task succeeded or was not chosen: after a failure the next run retrains.

MLflow: one parent run per DAG run (created by select_backbones), a child run per train job and
for the ensemble, the report and the promotion decision on the parent (`covidct.lifecycle.runs`).

Outputs: `$COVIDCT_HOME/runs/<run id>/<backbone>/<split>/`, `.../ensemble/` and `.../report/`.

Bounded time: every task has an `execution_timeout` and the run a `dagrun_timeout`
(`covidct.orchestration.bounds`; `COVIDCT_TIMEOUT_*_S` override them), a train job fails by itself when the
cluster grants no executor for `COVIDCT_EXECUTOR_WAIT_S` (300 s), and failed or overdue runs
log one `covidct ALERT` line that `COVIDCT_ALERT_WEBHOOK` / `COVIDCT_ALERT_NOTIFIER` route on.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from airflow.sdk import CronTriggerTimetable, Param, chain, dag, task

from covidct.core import paths
from covidct.data import duplicates
from covidct.data.body import BODY_BLANK, VIEWS
from covidct.data.split import SEEDS_PATTERN, SPLITS, STACK_FOLDS
from covidct.features.backbone import POOLINGS, PRECISIONS
from covidct.orchestration import alerts, bounds, pipeline, policy
from covidct.orchestration.assets import CHAMPION_ASSET
from covidct.orchestration.operator_links import ModelVersionLink, ReportLink
from covidct.orchestration.operators import TransferLearningSubmitOperator

JOB = Path(__file__).resolve().parents[1] / "jobs" / "transfer_learning.py"


@dag(
    dag_id="covid_ct_transfer_learning",
    # Scheduled retraining every Sunday 00:00 UTC; the feature cache makes unchanged data cheap.
    # No start_date and run_immediately=0: unpausing never starts a run for a past week by itself
    # (with a start_date, Airflow would run the last missed week at once, with the default conf,
    # and a run the user triggers would wait behind it). The first scheduled run is the next Sunday.
    schedule=CronTriggerTimetable("@weekly", timezone="UTC", run_immediately=timedelta(0)),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    default_args={
        "retries": 2,
        "retry_delay": timedelta(minutes=2),
        # Each task's own bound is set by bounds.apply() below; this one is for any task it does not know.
        "execution_timeout": bounds.timeout("train"),
        "on_failure_callback": alerts.task_failed,
    },
    dagrun_timeout=bounds.timeout("run"),
    on_failure_callback=[alerts.run_failed, pipeline.close_failed_run],  # and no MLflow run left open
    deadline=alerts.overdue_alerts(bounds.overdue_after()),  # opt-in: COVIDCT_RUN_DEADLINE_S
    tags=["covid-ct", "spark", "transfer-learning"],
    user_defined_macros={"run_dir": lambda run_id: str(paths.run_dir(run_id))},
    params={
        "backbones": Param(
            list(pipeline.DAG_BACKBONES),
            type="array",
            items={"type": "string", "enum": list(pipeline.DAG_BACKBONES)},
            examples=list(pipeline.DAG_BACKBONES),  # the trigger form's multi-select (items.enum validates)
            minItems=1,
            uniqueItems=True,
            description="ImageNet backbones to compare (one Spark job each).",
        ),
        "splits": Param(
            ["official", "official-clean", "random70"],
            type="array",
            items={"type": "string", "enum": list(SPLITS)},
            examples=list(SPLITS),  # a multi-select, not free text
            minItems=1,
            uniqueItems=True,
            description="official: the published patient-level lists; official-clean: official without the test "
            "images that show the same picture as an image of the other class or of another split (one more LR fit "
            "per backbone, same features); random70: seeded 70/30 (the study's protocol).",
        ),
        "seed": Param(42, type="integer", minimum=0, description="Seed of the random70 split and of random weights."),
        "seeds": Param(
            None,
            type=["null", "string"],
            pattern=SEEDS_PATTERN,
            maxLength=200,
            description="Empty: random70 with `seed` only. Or seeds and ranges, e.g. 0-9 or 1,5,20-24: random70 is "
            "also refitted per seed from the same features, and the report shows mean ± sd over them.",
        ),
        "weights": Param(
            "imagenet",
            type="string",
            pattern=policy.WEIGHTS_PATTERN,
            maxLength=policy.MAX_LENGTH,
            examples=["imagenet", "none"],  # offered in the form; a weights file's path can still be typed
            description="imagenet (from $COVIDCT_WEIGHTS_DIR, else Keras' cache/download), "
            "none (random weights: mechanics only, flagged in the report) or the absolute path of a weights "
            "file inside a folder the operator allows ($COVIDCT_ALLOWED_WEIGHTS_DIRS, $COVIDCT_WEIGHTS_DIR).",
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
        "view": Param(
            BODY_BLANK,
            type="string",
            enum=list(VIEWS),
            description="What the backbones see: body-blank (the default: cropped to the body's bounding box, black "
            "outside the body: no margins, borders or labels of the paper the picture came from; every backbone "
            "then puts more of its evidence on the patient than an even spread would), body (cropped only) or "
            "full (the whole picture, as the study did; ~1-2 points more accuracy, evidence off the patient). "
            "Each has its own feature cache; saved models apply it when they predict.",
        ),
        "flips": Param(
            False,
            type="boolean",
            description="Test-time flips: each image's features are the mean of its own and its mirror image's "
            "(twice the featurization).",
        ),
        "data_source": Param(
            None,
            type=["null", "string"],
            pattern=policy.SOURCE_PATTERN,
            maxLength=policy.MAX_LENGTH,
            description="Empty: $COVIDCT_DATA_SOURCE, else upstream GitHub. Or a mirror's http(s) base URL, an "
            "absolute dataset folder, or a folder holding the two zips, among those the operator allows "
            "($COVIDCT_ALLOWED_SOURCES).",
        ),
        "expect_covid": Param(349, type="integer", minimum=1, description="Expected COVID images."),
        "expect_noncovid": Param(397, type="integer", minimum=1, description="Expected non-COVID images."),
        "near_duplicates": Param(
            "warn",
            type="string",
            enum=list(duplicates.POLICIES),
            description="A picture filed under both classes or in two official splits (perceptual hash): "
            "warn (the validation report names both files; the upstream data has two such pairs) or fail.",
        ),
        "stacked": Param(
            False,
            type="boolean",
            description="Also fit the stacked ensemble: an LR on the backbones' out-of-fold training "
            f"probabilities ({STACK_FOLDS} more LR fits per backbone and split). Off: the mean ensemble only, "
            "the product's model (the stacked one never beat it on this dataset).",
        ),
        "feature_cache": Param(True, type="boolean", description="Reuse cached features of unchanged images."),
        "force": Param(
            False,
            type="boolean",
            description="Retrain even when nothing changed since the last successful run (same data, params, "
            "weights, preprocessing and code); otherwise such a run skips training and says since which run.",
        ),
    },
)
def covid_ct_transfer_learning():
    @task
    def fetch_dataset(params=None) -> str:
        pipeline.check_params(params)  # the operator's allowlist, before anything is written
        return pipeline.fetch_dataset(params["data_source"], params["expect_covid"], params["expect_noncovid"])

    @task
    def validate_dataset(data_dir: str, params=None, run_id=None) -> None:
        pipeline.validate_dataset(
            data_dir, params["expect_covid"], params["expect_noncovid"], params.get("near_duplicates", "warn"),
            run_dir=str(paths.run_dir(run_id)),
        )  # fmt: skip

    # Unchanged since the last successful run (and not force): skips every later task, whatever its
    # trigger rule (ignore_downstream_trigger_rules), so the run ends green without training.
    @task.short_circuit
    def check_changes(data_dir: str, params=None, run_id=None) -> bool:
        return pipeline.check_changes(data_dir, params, run_id)

    # Also followed, whatever was chosen: record_success, downstream of this task too (below).
    @task.branch
    def select_backbones(params=None) -> list[str]:
        chosen = pipeline.select_backbones(params["backbones"], params["pooling"])
        pipeline.start_tracking(params)  # the DAG run's MLflow parent run, before the train jobs
        return [*chosen, "record_success"]

    # all_done, not all_done_min_one_success: the latter skips when a backbone was not chosen.
    # The report fails when no chosen backbone succeeded; both skip when none was trained because a
    # task before them failed (that task is then the run's one failure).
    @task(trigger_rule="all_done")
    def ensemble(params=None, run_id=None, ti=None) -> str:
        states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[run_id])[run_id]
        return pipeline.build_run_ensemble(str(paths.run_dir(run_id)), params["backbones"], states)

    @task(trigger_rule="all_done")
    def report(params=None, run_id=None, ti=None) -> str:
        states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[run_id])[run_id]
        return pipeline.build_run_report(str(paths.run_dir(run_id)), params["backbones"], states, params["weights"])

    # Emits the champion asset's event only when it promotes (otherwise it skips itself).
    @task(outlets=[CHAMPION_ASSET])
    def promote(run_id=None, outlet_events=None) -> dict:
        return pipeline.promote_run(str(paths.run_dir(run_id)), outlet_events)

    # The run's last task: only a run whose every task succeeded (or was not chosen) becomes the
    # "last successful run" that later runs compare their fingerprint with.
    # none_failed: it runs after a promote that skipped itself (not promoted), not after a failure.
    # Its upstream includes select_backbones: when it or a task before it fails (and so the tasks after
    # training skip, naming it), this one is upstream_failed, and so is the run (its leaf decides).
    @task(trigger_rule="none_failed")
    def record_success(run_id=None, ti=None) -> str:
        states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[run_id])[run_id]
        return pipeline.record_success(run_id, states, this_task=ti.task_id)

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
                "--seeds",
                "{{ params.seeds or '' }}",  # empty: random70 with --seed only
                "--weights",
                "{{ params.weights }}",
                "--pooling",
                "{{ params.pooling }}",
                "--precision",
                "{{ params.precision }}",
                "--view",
                "{{ params.view }}",
                "--flips",
                "{{ 'on' if params.flips else 'off' }}",
                "--stack-folds",
                "{{ " + str(STACK_FOLDS) + " if params.stacked else 0 }}",  # out-of-fold fits: the stacked ensemble
                "--cache",
                "{{ 'on' if params.feature_cache else 'off' }}",
                "--out",
                "{{ run_dir(run_id) }}/" + backbone.lower(),
            ],
            # fmt: on  # fmt: skip
        )
        for backbone in pipeline.DAG_BACKBONES
    ]
    selected, recorded = select_backbones(), record_success()
    reported, promoted = report(), promote()
    # Their links in the Airflow UI (the train tasks' come with their operator): the report, the new version.
    reported.operator.operator_extra_links = (ReportLink(),)
    promoted.operator.operator_extra_links = (ModelVersionLink(),)
    chain(data_dir, validate_dataset(data_dir), check_changes(data_dir), selected, trains, ensemble(), reported,
          promoted, recorded)  # fmt: skip
    selected >> recorded


bounds.apply(covid_ct_transfer_learning())
