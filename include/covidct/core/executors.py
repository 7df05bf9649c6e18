"""A driver-side watchdog: fail fast when the cluster grants no Spark executors.

Spark itself never gives up on a cluster without executors: a job on a standalone master
whose workers are gone logs ``Initial job has not accepted any resources`` every 15 s,
forever. The watchdog counts the seconds during which no executor is registered, and when
they reach the bound it stops the SparkContext (every running job fails at once, the
master marks the application finished) and remembers one line that says why; the CLI
prints it as ``error: ...`` and exits with status 2.

- At start: the clock runs from the session's creation until the first executor registers.
- Mid-job: a worker that died after granting executors takes them with it; the clock runs
  again while none is left (under dynamic allocation, only while jobs are active: idle
  executors are released on purpose there).
- Local mode has no executors to wait for: no watchdog.

The bound: the Spark setting ``spark.covidct.executorWaitTimeout`` (seconds, or a Spark
duration such as ``5min``), else ``$COVIDCT_EXECUTOR_WAIT_S``, else 300 s; 0 disables it.
The message quotes what the job asks for and, on a standalone master, what its workers
offer, read from the master's web UI JSON (``$COVIDCT_SPARK_MASTER_WEBUI``, else port
8080 of the master's host).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass

from covidct.core.errors import CovidctError

log = logging.getLogger(__name__)

WAIT_ENV = "COVIDCT_EXECUTOR_WAIT_S"
WAIT_CONF = "spark.covidct.executorWaitTimeout"
WEBUI_ENV = "COVIDCT_SPARK_MASTER_WEBUI"
DEFAULT_WAIT_S = 300.0
#: After stopping Spark, how long the driver's main thread gets to fail and exit by itself.
EXIT_GRACE_S = 30.0

_UNITS = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


class NoExecutorsError(CovidctError):
    """The cluster granted no executor within the bound."""


def parse_seconds(value: str, what: str) -> float:
    """``300``, ``300s``, ``5min``, ``1h`` -> seconds; raises CovidctError naming ``what``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", str(value).lower())
    if not match or match.group(2) not in {"", *_UNITS}:
        raise CovidctError(f"{what} must be a number of seconds (or e.g. 5min), got {value!r}")
    return float(match.group(1)) * _UNITS.get(match.group(2) or "s", 1)


def wait_bound(conf_value: str | None = None) -> float:
    """The bound in seconds: the Spark setting, else the environment, else 300; 0 = off."""
    if conf_value:
        return parse_seconds(conf_value, WAIT_CONF)
    env = os.environ.get(WAIT_ENV)
    return parse_seconds(env, WAIT_ENV) if env else DEFAULT_WAIT_S


def is_local(master: str) -> bool:
    return master == "local" or master.startswith("local[") or master.startswith("local-cluster")


@dataclass
class Ask:
    """What the job asks the cluster for (from its Spark settings)."""

    executor_cores: str
    executor_memory: str
    max_cores: str | None

    def describe(self) -> str:
        text = f"executors of {self.executor_cores} and {self.executor_memory} each"
        return text + (f", {self.max_cores} cores in all (spark.cores.max)" if self.max_cores else "")


def master_webui_url(master: str) -> str | None:
    """The standalone master's web UI JSON (``$COVIDCT_SPARK_MASTER_WEBUI``, else host:8080)."""
    given = os.environ.get(WEBUI_ENV)
    if given:
        return given.rstrip("/") + "/json/"
    match = re.match(r"spark://([^:/,]+)", master)
    return f"http://{match.group(1)}:8080/json/" if match else None


def describe_offer(master: str, timeout_s: float = 5.0) -> str:
    """What the standalone master offers, in words (or why it could not be read)."""
    url = master_webui_url(master)
    if url is None:
        return "check the cluster manager's free capacity"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            state = json.load(response)
    except (OSError, ValueError) as exc:
        return f"could not read the master's state at {url} ({exc}; set {WEBUI_ENV} to its web UI)"
    alive = [w for w in state.get("workers", []) if w.get("state") == "ALIVE"]
    if not alive:
        return f"the master ({url}) has no ALIVE worker"
    free = ", ".join(f"{w.get('host')}: {w.get('coresfree')} cores / {w.get('memoryfree')} MiB free" for w in alive)
    return f"the master ({url}) has {len(alive)} ALIVE worker(s): {free}"


def failure_message(master: str, bound_s: float, ask: Ask, offer: str, lost: bool) -> str:
    what = "lost every executor and got none back" if lost else "granted no executor"
    return (
        f"the Spark cluster {master} {what} within {bound_s:.0f} s. The job asks for {ask.describe()}; {offer}. "
        f"Check that the workers are alive and registered with this master and that one offers that many "
        f"cores and that much memory (the bound is {WAIT_CONF} or ${WAIT_ENV})"
    )


class ExecutorWatchdog:
    """Polls the number of registered executors; stops Spark after ``bound_s`` without any."""

    def __init__(self, spark, bound_s: float, poll_s: float = 1.0, exit_grace_s: float = EXIT_GRACE_S):
        self.sc = spark.sparkContext
        self.master = self.sc.master
        self.bound_s = bound_s
        self.poll_s = poll_s
        self.exit_grace_s = exit_grace_s
        conf = self.sc.getConf()
        self.ask = Ask(
            executor_cores=f"{conf.get('spark.executor.cores')} cores"
            if conf.get("spark.executor.cores")
            else "any number of cores",
            executor_memory=conf.get("spark.executor.memory", "1g"),
            max_cores=conf.get("spark.cores.max"),
        )
        self.dynamic = conf.get("spark.dynamicAllocation.enabled", "false").lower() == "true"
        self.error: NoExecutorsError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="covidct-executor-watchdog", daemon=True)

    def start(self) -> ExecutorWatchdog:
        log.info("executor watchdog: failing after %.0f s without executors on %s", self.bound_s, self.master)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def executors(self) -> int:
        """Executors registered with the driver's scheduler (as soon as they register, before
        their block managers; falls back to the status tracker, which counts block managers)."""
        jsc = self.sc._jsc.sc()
        try:
            return int(jsc.getExecutorIds().size())
        except Exception:  # not a coarse-grained scheduler backend
            return max(len(jsc.statusTracker().getExecutorInfos()) - 1, 0)

    def _jobs_active(self) -> bool:
        return bool(self.sc.statusTracker().getActiveJobsIds())

    def _run(self) -> None:
        # The clock starts with the SparkContext (its start time is in epoch milliseconds).
        since = time.monotonic() - max(time.time() - self.sc.startTime / 1000, 0)
        seen = False
        last_log = since
        last_n = 0
        while not self._stop.wait(self.poll_s):
            try:
                n = self.executors()
                counting = not self.dynamic or self._jobs_active()
            except Exception:  # the context is stopping or stopped: nothing left to watch
                return
            now = time.monotonic()
            if n != last_n:
                log.info("%d executor(s) registered on %s", n, self.master)
                last_n = n
            if n > 0 or not counting:
                seen = seen or n > 0
                since = now
                continue
            if now - last_log >= 30:
                log.warning("no Spark executor for %.0f s on %s (failing at %.0f s)", now - since, self.master,
                            self.bound_s)  # fmt: skip
                last_log = now
            if now - since >= self.bound_s:
                self._trip(now - since, lost=seen)
                return

    def _trip(self, waited_s: float, lost: bool) -> None:
        message = failure_message(self.master, self.bound_s, self.ask, describe_offer(self.master), lost)
        self.error = NoExecutorsError(message)
        log.error("no executor for %.0f s: %s", waited_s, message)
        try:
            self.sc.cancelAllJobs()
            self.sc.stop()  # fails every running job; the master marks the application finished
        except Exception as exc:  # stopping is best effort; the exit below is not
            log.warning("stopping Spark after the executor wait: %s", exc)
        # The main thread normally fails at once and the CLI exits with 2; if it does not, exit here.
        time.sleep(self.exit_grace_s)
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(2)


_active: ExecutorWatchdog | None = None


def watch(spark) -> ExecutorWatchdog | None:
    """Start the watchdog for ``spark`` unless it runs locally or the bound is 0."""
    global _active
    master = spark.sparkContext.master
    if is_local(master):
        return None
    bound = wait_bound(spark.sparkContext.getConf().get(WAIT_CONF))
    if bound <= 0:
        return None
    if _active is not None and _active.sc is spark.sparkContext:
        return _active
    _active = ExecutorWatchdog(spark, bound).start()
    return _active


def failure() -> NoExecutorsError | None:
    """The watchdog's error when it stopped Spark, else None."""
    return _active.error if _active is not None else None
