"""The floor under a forced warm retrain on this machine: what no trimming of our code can remove.

    python bench/floor.py [--repeat 3]

Measures, each ``--repeat`` times (medians; wall seconds and the CPU seconds of the process tree):

- ``spark-submit`` of a script that starts a session and counts 10 rows, with the JVM's defaults and
  with ``covidct.core.session.LOCAL_DRIVER_JAVA_OPTIONS`` (what ``make run`` uses): the price of each of
  the DAG's one-``spark-submit``-per-backbone jobs before it does anything;
- in one session: a trivial Spark job, and Spark ML's ``LogisticRegression`` (the study's params:
  maxIter 20, regParam 0.05, elasticNetParam 0.3) fitted on 500 rows of 512 features (VGG16's
  ``avg`` size; the official split's train part has 425 rows): the first fit in the JVM, the later
  ones, and five fitted in threads (as the out-of-fold folds are).

Prints a Markdown table; JSON in ``bench/results/floor.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, save  # noqa: E402

TRIVIAL = """
from covidct.core.session import get_spark
get_spark("floor").range(10).count()
"""

FITS = """
import json, threading, time
import numpy as np
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.linalg import Vectors
from covidct.core.session import get_spark

spark = get_spark("floor-fits")
rng = np.random.default_rng(0)
x = rng.normal(size=(500, 512))
y = (x[:, :8].sum(axis=1) + rng.normal(size=500) > 0).astype(int)
rows = [(int(label), Vectors.dense(row)) for label, row in zip(y, x)]
data = spark.createDataFrame(rows, ["label", "features"]).coalesce(2).persist()
data.count()

def lr():
    return LogisticRegression(maxIter=20, regParam=0.05, elasticNetParam=0.3)

def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start

out = {"first_fit_s": timed(lambda: lr().fit(data))}
out["trivial_job_s"] = [timed(lambda: spark.range(10).count()) for _ in range(5)]
out["fit_s"] = [timed(lambda: lr().fit(data)) for _ in range(5)]

def five_in_threads():
    threads = [threading.Thread(target=lambda: lr().fit(data)) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

out["five_fits_in_threads_s"] = timed(five_in_threads)
print("FLOOR " + json.dumps(out))
"""


def _run(args: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Wall and CPU seconds (this child's whole tree, reaped) of one command; its stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def main() -> int:
    import os

    from covidct.core.session import LOCAL_DRIVER_JAVA_OPTIONS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="covidct-floor-"))
    trivial, fits = folder / "trivial.py", folder / "fits.py"
    trivial.write_text(TRIVIAL)
    fits.write_text(FITS)
    base = {k: v for k, v in os.environ.items() if k != "SPARK_SUBMIT_OPTS"}
    base.setdefault("PYSPARK_PYTHON", sys.executable)
    variants = {"JVM defaults": base, f"make run's ({LOCAL_DRIVER_JAVA_OPTIONS})": {
        **base, "SPARK_SUBMIT_OPTS": LOCAL_DRIVER_JAVA_OPTIONS}}  # fmt: skip
    submit = ["spark-submit", "--master", "local[*]", "--driver-memory", "4g"]
    results: dict = {"machine": machine(), "submit": {}, "fits": []}
    for _ in range(args.repeat):  # interleaved: both variants see the same load
        for name, env in variants.items():
            wall, cpu, _out = _run([*submit, str(trivial)], env)
            results["submit"].setdefault(name, []).append({"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)})
    for _ in range(args.repeat):
        _wall, _cpu, out = _run([*submit, str(fits)], variants[f"make run's ({LOCAL_DRIVER_JAVA_OPTIONS})"])
        results["fits"].append(json.loads(next(line for line in out.splitlines() if line.startswith("FLOOR "))[6:]))
    save("floor", results)

    def med(values):
        return round(statistics.median(values), 2)

    rows = [[f"spark-submit, session, count 10 rows: {name}", med([r["wall_s"] for r in runs]),
             med([r["cpu_s"] for r in runs])] for name, runs in results["submit"].items()]  # fmt: skip
    fits_runs = results["fits"]
    rows += [
        ["a trivial Spark job in a running session", med([med(r["trivial_job_s"]) for r in fits_runs]), ""],
        ["the JVM's first LR fit (500 × 512, maxIter 20)", med([r["first_fit_s"] for r in fits_runs]), ""],
        ["a later LR fit", med([med(r["fit_s"]) for r in fits_runs]), ""],
        ["five LR fits in threads (as the out-of-fold folds)", med([r["five_fits_in_threads_s"] for r in fits_runs]),
         ""],
    ]  # fmt: skip
    print(markdown_table(["what (median)", "wall s", "CPU s"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
