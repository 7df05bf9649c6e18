"""Failed and overdue runs, visible without the UI: one summary line, routed by configuration.

Three Airflow hooks call in here (the DAG wires them):

- ``task_failed``: every task's ``on_failure_callback`` (timeouts, a lost cluster, a bad
  input): ``covidct ALERT task-failed: train_vgg16 of covid_ct_transfer_learning run
  manual__... (try 1 of 3, 21 s): <the error> | log: <url>``
- ``run_failed``: the DAG's ``on_failure_callback`` (a failed task, or ``dagrun_timeout``)
- ``run_overdue``: the DAG's deadline alert (``covidct.orchestration.bounds``: 45 min after it was queued),
  awaited by the triggerer while the run goes on

Each logs its line at ERROR (logger ``covidct.orchestration.alerts``) and sends it where the environment
of the Airflow processes says, both if both are set:

- ``COVIDCT_ALERT_WEBHOOK``: a URL; the line is POSTed as JSON ``{"text": line, "event": ...,
  "dag_id": ..., "run_id": ..., "task_id": ...}`` (the shape Slack, Mattermost and Teams
  incoming webhooks accept).
- ``COVIDCT_ALERT_NOTIFIER``: the dotted path of an Airflow notifier class (any
  ``BaseNotifier``, e.g. ``airflow.providers.smtp.notifications.smtp.SmtpNotifier``) or
  of a function ``f(context)``; ``COVIDCT_ALERT_NOTIFIER_KWARGS`` holds its keyword
  arguments as JSON. The line is in the context as ``covidct_alert``, so a notifier's
  templated fields can say ``{{ covidct_alert }}``.

An alert that cannot be delivered is logged, never raised: it must not hide the failure.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import urllib.request
from datetime import datetime, timedelta

log = logging.getLogger(__name__)

WEBHOOK_ENV = "COVIDCT_ALERT_WEBHOOK"
NOTIFIER_ENV = "COVIDCT_ALERT_NOTIFIER"
NOTIFIER_KWARGS_ENV = "COVIDCT_ALERT_NOTIFIER_KWARGS"
PREFIX = "covidct ALERT"
MAX_REASON = 600


def _one_line(text: object, limit: int = MAX_REASON) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _get(obj, name: str, default=None):
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _seconds_between(start, end) -> float | None:
    if isinstance(start, str):
        start = datetime.fromisoformat(start)
    if isinstance(end, str):
        end = datetime.fromisoformat(end)
    if start is None or end is None:
        return None
    return (end - start).total_seconds()


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def task_summary(context: dict) -> str:
    """The one line for a failed task instance."""
    ti = context.get("ti") or context.get("task_instance")
    dag_id = _get(ti, "dag_id") or _get(context.get("dag"), "dag_id", "?")
    run_id = _get(ti, "run_id") or context.get("run_id", "?")
    task_id = _get(ti, "task_id", "?")
    task = context.get("task") or _get(ti, "task")
    try_number = _get(ti, "try_number")
    tries = f"try {try_number} of {1 + (_get(task, 'retries', 0) or 0)}" if try_number else "try ?"
    start = _get(ti, "start_date")
    took = _seconds_between(start, datetime.now(start.tzinfo)) if isinstance(start, datetime) else None
    error = context.get("exception")
    reason = _one_line(f"{type(error).__name__}: {error}" if error is not None else "no error recorded")
    url = _get(ti, "log_url")
    where = f" | log: {url}" if url else ""
    return f"{PREFIX} task-failed: {task_id} of {dag_id} run {run_id} ({tries}, {_duration(took)}): {reason}{where}"


def run_summary(context: dict) -> str:
    """The one line for a failed DAG run (a failed task, or the run's own timeout)."""
    dag_run = context.get("dag_run")
    dag_id = _get(dag_run, "dag_id") or _get(context.get("dag"), "dag_id", "?")
    run_id = _get(dag_run, "run_id", "?")
    reason = context.get("reason") or "failed"
    took = _seconds_between(_get(dag_run, "start_date"), _get(dag_run, "end_date"))
    failed = []
    get_tis = _get(dag_run, "get_task_instances")
    if callable(get_tis):
        try:
            failed = sorted(ti.task_id for ti in get_tis() if ti.state in ("failed", "upstream_failed"))
        except Exception as exc:  # the callback must not fail on a detail
            log.debug("could not list task instances: %s", exc)
    tasks = f"; failed tasks: {', '.join(failed)}" if failed else ""
    return f"{PREFIX} run-failed: {dag_id} run {run_id} {reason} after {_duration(took)}{tasks}"


def overdue_summary(context: dict) -> str:
    """The one line for a run past its deadline (the deadline alert's context is JSON-like)."""
    dag_run = context.get("dag_run") or {}
    deadline = (context.get("deadline") or {}).get("deadline_time")
    queued = dag_run.get("queued_at")
    since = _seconds_between(queued, deadline) if queued and deadline else None
    return (
        f"{PREFIX} run-overdue: {dag_run.get('dag_id', '?')} run {dag_run.get('dag_run_id') or dag_run.get('run_id')} "
        f"still {dag_run.get('state', 'running')} {_duration(since)} after it was queued (deadline {deadline})"
    )


def _post(url: str, payload: dict, timeout_s: float = 10.0) -> None:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        response.read()


def _notifier(context: dict):
    path = os.environ.get(NOTIFIER_ENV, "").strip()
    if not path:
        return None
    module, _, name = path.rpartition(".")
    target = getattr(importlib.import_module(module), name)
    kwargs = json.loads(os.environ.get(NOTIFIER_KWARGS_ENV) or "{}")
    return target(**kwargs) if isinstance(target, type) else target


def send(line: str, context: dict | None = None, event: str = "alert", **fields) -> None:
    """Log ``line`` and deliver it to the configured webhook and notifier; never raises."""
    log.error("%s", line)
    url = os.environ.get(WEBHOOK_ENV, "").strip()
    if url:
        try:
            _post(url, {"text": line, "event": event, **fields})
        except Exception as exc:
            log.warning("could not POST the alert to %s: %s", WEBHOOK_ENV, exc)
    try:
        notifier = _notifier(context or {})
        if notifier is not None:
            notifier({**(context or {}), "covidct_alert": line})
    except Exception as exc:
        log.warning("the alert notifier %s failed: %s", os.environ.get(NOTIFIER_ENV), exc)


def task_failed(context: dict) -> None:
    """``on_failure_callback`` of every task."""
    line = task_summary(context)
    ti = context.get("ti") or context.get("task_instance")
    send(line, context, "task-failed", dag_id=_get(ti, "dag_id"), run_id=_get(ti, "run_id"),
         task_id=_get(ti, "task_id"))  # fmt: skip


def run_failed(context: dict) -> None:
    """``on_failure_callback`` of the DAG (run failed, or timed out)."""
    dag_run = context.get("dag_run")
    send(run_summary(context), context, "run-failed", dag_id=_get(dag_run, "dag_id"), run_id=_get(dag_run, "run_id"))


async def run_overdue(context: dict, **_) -> None:
    """The DAG's deadline alert callback (runs in the triggerer)."""
    dag_run = context.get("dag_run") or {}
    line = overdue_summary(context)
    await asyncio.to_thread(send, line, context, "run-overdue", dag_id=dag_run.get("dag_id"),
                            run_id=dag_run.get("dag_run_id") or dag_run.get("run_id"))  # fmt: skip


def overdue_alerts(after: timedelta | None) -> list:
    """The DAG's ``deadline``: a run still going ``after`` its queueing calls ``run_overdue``."""
    if not after:
        return []
    from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference

    return [
        DeadlineAlert(
            reference=DeadlineReference.DAGRUN_QUEUED_AT,
            interval=after,
            callback=AsyncCallback(run_overdue),
            name="covidct-run-overdue",
        )
    ]
