"""What the Airflow DAG's Python tasks do (the DAG file only wires these together).

Every function here is a plain library call, testable without Airflow.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from covidct.core import paths
from covidct.core.errors import CovidctError
from covidct.features.backbone import get_backbone
from covidct.orchestration.policy import DATA_SOURCE_ENV, Policy, PolicyError
from covidct.orchestration.retries import fail_now, retry_only_transient, skip

log = logging.getLogger(__name__)

#: The study's three backbones: one Spark job (task ``train_<name>``) each.
DAG_BACKBONES = ("VGG16", "VGG19", "Xception")
FAILED_STATES = {"failed", "upstream_failed"}


def train_task_id(backbone: str) -> str:
    return f"train_{get_backbone(backbone).name.lower()}"


def check_params(params: Mapping) -> None:
    """Refuse, before any work and without retries, trigger params outside the operator's allowlist.

    The DAG's param schema already checked their syntax (the UI and the REST API refuse a
    malformed value with HTTP 400); this checks what they name: the data source and the
    weights file (``covidct.orchestration.policy``).
    """
    try:
        Policy.from_env().check_params(params)
    except PolicyError as exc:
        raise fail_now(f"refused trigger params: {exc}") from None


def fetch_dataset(source: str | None, expected_covid: int, expected_noncovid: int) -> str:
    """Fetch into ``$COVIDCT_HOME/data/COVID-CT`` (a no-op when unchanged); returns the folder.

    Data that fail validation are never published: the previous good copy stays. The source
    and every redirect are held to the operator's allowlist (``covidct.orchestration.policy``). Only
    transient errors (the network, a server) are left to the task's retries.
    """
    from covidct.data.fetch import fetch

    with retry_only_transient():
        policy = Policy.from_env()
        # A param is vetted (and used as rebuilt from its parsed parts); the operator's own setting is not.
        source = policy.check_source(source) if source else (os.environ.get(DATA_SOURCE_ENV) or None)
        result = fetch(
            paths.data_dir(),
            source=source,
            expected_covid=expected_covid,
            expected_noncovid=expected_noncovid,
            allow_url=policy.check_url,
        )
    log.info("%s", result.summary())
    return str(paths.data_dir())


def validate_dataset(
    data_dir: str,
    expected_covid: int,
    expected_noncovid: int,
    near_duplicates: str = "warn",
    run_dir: str | None = None,
) -> None:
    """Great Expectations gate: fails (not retried) naming every failed expectation; logs the warnings
    (near-duplicates across classes or splits, unless ``near_duplicates`` is ``fail``). A pass is
    copied into ``run_dir`` (``validation.json``), for the run's report.

    Data that already passed (the same dataset digest, expectations and validation code, in
    ``DIR/validation/result.json``) are not validated again: that answer cannot change.
    """
    from covidct.data.validate import passed_before, validate

    with retry_only_transient():
        previous = passed_before(data_dir, expected_covid, expected_noncovid, near_duplicates)
        if previous is not None:
            log.info("validation of %s: these exact data (dataset digest %s) passed with the same expectations at %s; "
                     "not repeated (%s/validation/result.json)", data_dir, previous["dataset_digest"][:12],
                     previous.get("validated_at"), data_dir)  # fmt: skip
            for warning in previous.get("warnings", []):
                log.warning("validation warning (%s): %s", previous.get("validated_at"), warning["message"])
        else:
            result = validate(data_dir, expected_covid, expected_noncovid, near_duplicates=near_duplicates)
            log.log(logging.WARNING if result.warnings else logging.INFO, "%s", result.summary())
            if not result.success:
                raise CovidctError(result.summary())
        if run_dir is not None:
            from covidct.core.atomic import write_text_atomic
            from covidct.reporting.data_audit import RUN_COPY

            Path(run_dir).mkdir(parents=True, exist_ok=True)
            passed = (Path(data_dir) / "validation" / "result.json").read_text(encoding="utf-8")
            write_text_atomic(Path(run_dir) / RUN_COPY, passed)


def check_changes(data_dir: str, params: Mapping, run_id: str) -> bool:
    """Retrain (True) or not (False: the DAG's short-circuit skips every later task), and say why.

    Compares this run's fingerprint (``covidct.lifecycle.fingerprint``: dataset manifest, params, weights,
    preprocessing, code) with the last successful run's. Unchanged and not ``force``: logs
    "unchanged since run X", writes ``RUN_DIR/report/`` saying so, and returns False.
    Either way ``RUN_DIR/fingerprint.json`` records the fingerprint and the decision.
    """
    from covidct.lifecycle import fingerprint

    with retry_only_transient():
        run_dir = paths.run_dir(run_id)
        found = fingerprint.compute(data_dir, params)
        decision = fingerprint.decide_retrain(found, force=bool(params.get("force")))
        fingerprint.write_run_fingerprint(run_dir, found, decision)
        log.info("%s", decision.reason)
        if not decision.retrain:
            report = fingerprint.write_unchanged_report(run_dir, decision)
            log.info("report: %s", report)
    return decision.retrain


def record_success(run_id: str, states: dict[str, str | None], this_task: str = "record_success") -> str:
    """Record this run as the last successful one, if it is (every other task succeeded or was skipped).

    A run with a failed task (a backbone, the ensemble, anything) is not recorded, so the next run
    retrains: this task is then skipped, saying which tasks failed, and the run stays as green or
    red as its other tasks make it.
    """
    from covidct.lifecycle import fingerprint

    failed = sorted(task for task, state in states.items() if task != this_task and state in FAILED_STATES)
    if failed:
        raise skip(
            f"not recorded as the last successful run: {', '.join(failed)} did not succeed; the next run retrains"
        )
    run_dir = paths.run_dir(run_id)
    report = run_dir / "report" / "report.html"
    with retry_only_transient():
        if not report.is_file():
            raise CovidctError(f"no report at {report}: the run did not succeed; not recorded")
        record = fingerprint.record_last_success(run_id, run_dir, report)
    return record["fingerprint"]


def select_backbones(backbones: list[str], pooling: str = "avg") -> list[str]:
    """The train task ids of the backbones chosen in the trigger form (the rest are skipped).

    Fails before any Spark job when a chosen backbone lacks the pooling (multi-layer poolings
    exist only for backbones with conv blocks 3-5 in the backbone table).
    """
    with retry_only_transient():
        chosen = [train_task_id(b) for b in backbones]
        unknown = sorted(set(chosen) - {train_task_id(b) for b in DAG_BACKBONES})
        if not chosen or unknown:
            raise CovidctError(f"choose one or more of {', '.join(DAG_BACKBONES)} (got {backbones})")
        for backbone in backbones:
            get_backbone(backbone).check_pooling(pooling)
    return chosen


def failures_from_states(states: dict[str, str | None], backbones: list[str]) -> dict[str, str]:
    """``{backbone: reason}`` for the chosen backbones whose train task did not succeed."""
    failures = {}
    for backbone in backbones:
        task_id = train_task_id(backbone)
        state = states.get(task_id)
        if state in FAILED_STATES:
            failures[get_backbone(backbone).name] = f"task {task_id} {state}; see its log"
    return failures


def skip_unless_trained(backbones: list[str], states: dict[str, str | None]) -> None:
    """Skip a task after the train tasks when none of them ran because a task before them failed.

    One failure, one cause: when ``fetch_dataset`` (or validation, or the backbone choice) fails,
    every chosen train task is upstream_failed; the ensemble and the report then skip, naming the
    failed task, instead of failing a second time with "nothing to compare". ``states``: the run's
    task states (every task's, so that the failed one can be named).
    """
    chosen = [states.get(train_task_id(b)) for b in backbones]
    if chosen and all(state == "upstream_failed" for state in chosen):
        failed = sorted(task for task, state in states.items() if state == "failed")
        cause = f"{', '.join(failed)} failed" if failed else "a task before the train tasks did not succeed"
        raise skip(f"nothing was trained: {cause}; that is the run's failure (see its log)")


def build_run_ensemble(run_dir: str, backbones: list[str], states: dict[str, str | None]) -> str:
    """Combine the run's successful backbones into ``RUN_DIR/ensemble`` (mean + stacked); returns its path.

    Skipped when fewer than two chosen backbones succeeded; a user error fails without retries.
    """
    from covidct.modelling.ensemble import build_ensemble

    skip_unless_trained(backbones, states)
    done = [b for b in backbones if states.get(train_task_id(b)) == "success"]
    if len(done) < 2:
        raise skip(f"an ensemble needs two or more backbones; succeeded: {done or 'none'}")
    try:
        result = build_ensemble(Path(run_dir))
    except CovidctError as exc:
        raise fail_now(str(exc)) from exc
    log.info("ensemble: %s (%s)", result.out, "+".join(result.members))
    from covidct.lifecycle import pyfunc

    pyfunc.record_ensemble(result.out, result.splits)  # nothing outside Airflow or with tracking off
    return str(result.out)


def build_run_report(
    run_dir: str, backbones: list[str], states: dict[str, str | None], weights: str = "imagenet"
) -> str:
    """Compare the run's backbones, naming those that failed; returns the HTML report's path.

    Fails (without retries: nothing would change) when no chosen backbone succeeded. A run with
    random weights (``weights=none``: mechanics only) gets no gallery: the maps of an untrained
    backbone show nothing, and making them would cost a Spark pass per split.
    """
    skip_unless_trained(backbones, states)
    if not any(states.get(train_task_id(b)) == "success" for b in backbones):
        trains = {train_task_id(b): states.get(train_task_id(b)) for b in backbones}
        raise fail_now(f"no backbone succeeded (train task states: {trains}); nothing to compare")
    from covidct.reporting import gallery
    from covidct.reporting.report import build_report  # after the check: a failed run fails in a second

    failures = failures_from_states(states, backbones)
    per_category = gallery.PER_CATEGORY
    if weights == "none":
        per_category = 0
        log.info("no gallery of maps: the run has random weights (weights=none)")
    report = build_report([Path(run_dir)], expected_backbones=list(backbones), failures=failures, gallery=per_category)
    from covidct.reporting.data_audit import RUN_COPY, append_data_section

    append_data_section(report.out, Path(run_dir) / RUN_COPY)  # the gate's near-duplicates, if it found any
    from covidct.lifecycle import job_logging

    job_logging.log_report(report.out)  # the MLflow runs into the report, the report into the parent run
    log.info("report: %s (markdown: %s)", report.html, report.markdown)
    return str(report.html)


def start_tracking(params: Mapping) -> str | None:
    """The DAG run's MLflow parent run, created before the train jobs (which find it by its tags)."""
    from covidct.lifecycle import runs, store

    run = runs.start_dag_run(dict(params))
    if run is not None:
        log.info("MLflow parent run %s at %s", run, store.tracking_uri())
    return run


def close_failed_run(context: dict) -> None:
    """``on_failure_callback`` of the DAG (beside the alert): the failed run's MLflow runs end FAILED, naming
    the failed task the callback is about (Airflow's last failed task instance: the DAG-level context has one
    task instance, and no access to the others) (``covidct.lifecycle.runs.fail_dag_run``). Never raises: a
    callback's error would hide the run's own."""
    from covidct.lifecycle import runs

    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    try:
        dag_id = getattr(dag_run, "dag_id", None) or context["dag"].dag_id
        run_id = getattr(dag_run, "run_id", None) or context["run_id"]
        runs.fail_dag_run(dag_id, run_id, [ti.task_id] if ti is not None else [])
    except Exception as exc:  # noqa: BLE001 - MLflow unreachable, a detail of the context
        log.warning("could not end the failed run's MLflow runs: %s", exc)


def promote_run(run_dir: str, outlet_events=None) -> dict:
    """The promotion gate (``covidct.lifecycle.promotion``): on promotion, the champion asset's event gets the
    new version as its extra; otherwise the task is skipped, so that no asset event is emitted.
    """
    from covidct.lifecycle import promotion, registry, runs, store

    if not store.enabled():
        raise skip("MLflow tracking is off (COVIDCT_TRACKING=off): no registry, nothing promoted")
    with retry_only_transient():
        decision = promotion.promote(Path(run_dir), runs.current_parent())
        runs.finish_dag_run()
    if not decision.promoted:
        raise skip(f"not promoted: {decision.reason}")
    extra = {
        "name": registry.REGISTERED_MODEL,
        "version": decision.version,
        "model": decision.challenger,
        "kind": decision.challenger_kind,
        "official_auc": decision.challenger_auc,
        "run_dir": str(run_dir),
    }
    if outlet_events is not None:
        from covidct.orchestration.assets import CHAMPION_ASSET

        outlet_events[CHAMPION_ASSET].extra = extra
    return decision.to_json()
