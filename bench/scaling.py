"""How cost grows with the images (issue 27): the train job at 1×, 2×, 5×, 10× the dataset, in local mode and on a
loopback standalone cluster with two workers.

    COVIDCT_WEIGHTS_DIR=... python bench/scaling.py [--factors 1,2,5,10] [--modes local,standalone]
        [--standalone-factors 1,10] [--backbone VGG16] [--precision float32] [--split random70]

Factor k: the 746 real images and k-1 copies of each, every copy brightened by its number of grey levels and
written as a new PNG, so that no copy's bytes or features equal another's (the cache does not hit). Each run
is the DAG's train job as Airflow starts it (``spark-submit jobs/transfer_learning.py``, view body-blank,
evidence on, an empty feature cache of its own, tracking off), ``--master local[2]`` or
``spark://127.0.0.1:PORT`` with two workers of one core each (``tests/support/cluster.py``'s daemons).
A sampler adds up the resident memory of the job's processes every 0.5 s by role: the **driver** (the
spark-submit JVM and the job's Python; in local mode that JVM also runs the tasks) and the **executors**
(executor JVMs and the Python workers that run TensorFlow); the peaks are reported. JSON in
``bench/results/scaling.json``; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import DEFAULT_DATA, ROOT, machine, markdown_table, save  # noqa: E402

JOB = ROOT / "jobs" / "transfer_learning.py"


def augmented_dataset(source: Path, dest: Path, factor: int) -> int:
    """``source``'s images and ``factor - 1`` brightened copies of each (new bytes, new features)."""
    from PIL import Image

    n = 0
    for folder in ("CT_COVID", "CT_NonCOVID"):
        (dest / folder).mkdir(parents=True)
        for f in sorted((source / folder).iterdir()):
            data = f.read_bytes()
            (dest / folder / f.name).write_bytes(data)
            n += 1
            if factor == 1:
                continue
            with Image.open(io.BytesIO(data)) as img:
                rgb = img.convert("RGB")
            for copy in range(1, factor):
                buf = io.BytesIO()
                rgb.point(lambda v, c=copy: min(v + c, 255)).save(buf, format="PNG")
                (dest / folder / f"copy{copy}-{f.stem}.png").write_bytes(buf.getvalue())
                n += 1
    shutil.copytree(source / "Data-split", dest / "Data-split")
    return n


class Sampler(threading.Thread):
    """Peak resident memory of the job's processes, summed by role, every 0.5 s."""

    def __init__(self, root_pid: int, extra_roots: list[int]):
        super().__init__(daemon=True)
        self.roots = [root_pid, *extra_roots]
        self.peaks = {"driver": 0, "executors": 0}
        self._halt = threading.Event()

    def role(self, proc) -> str:
        cmd = " ".join(proc.cmdline())
        if "CoarseGrainedExecutorBackend" in cmd or "pyspark.daemon" in cmd or "pyspark.worker" in cmd:
            return "executors"
        return "driver"

    def run(self) -> None:
        import psutil

        while not self._halt.wait(0.5):
            sums = {"driver": 0, "executors": 0}
            for i, root in enumerate(self.roots):
                try:
                    parent = psutil.Process(root)
                    # The job's own process tree; of a worker daemon only what it started (its executors).
                    procs = ([parent] if i == 0 else []) + parent.children(recursive=True)
                except psutil.Error:
                    continue
                for proc in procs:
                    try:
                        sums[self.role(proc)] += proc.memory_info().rss
                    except psutil.Error:
                        continue
            for k, v in sums.items():
                self.peaks[k] = max(self.peaks[k], v)

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        return {k: round(v / 2**30, 2) for k, v in self.peaks.items()}


def run_job(data: Path, out: Path, master: str, args, worker_pids: list[int], env: dict) -> dict:
    from covidct.core.session import LOCAL_DRIVER_JAVA_OPTIONS
    from support.cluster import spark_home

    submit = spark_home() / "bin" / "spark-submit"
    env = {**env, "SPARK_SUBMIT_OPTS": LOCAL_DRIVER_JAVA_OPTIONS}  # the driver's JVM options, as make run's
    cmd = [str(submit), "--master", master, "--driver-memory", "4g", "--name", f"covidct-scaling-{args.backbone}"]
    if master.startswith("spark://"):
        cmd += ["--executor-memory", "2g", "--total-executor-cores", "2", "--conf", "spark.executor.cores=1"]
    cmd += [str(JOB), "--data", str(data), "--backbone", args.backbone, "--split", args.split, "--view", "body-blank",
            "--precision", args.precision, "--stack-folds", "0", "--tracking", "off",
            "--cache-dir", str(out.parent / f"{out.name}-cache"), "--out", str(out)]  # fmt: skip
    start = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid, worker_pids)
        sampler.start()
        rc = proc.wait()
    wall = time.perf_counter() - start
    peaks = sampler.stop()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}); see {out.parent / (out.name + '.log')}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_s": round(wall, 1), "featurize_s": metrics["timings"]["featurize_s"],
            "total_s": metrics["timings"]["total_s"], "n_images": metrics["n_images"],
            "accuracy": metrics["accuracy"], "peak_gib": peaks}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--factors", default="1,2,5,10")
    parser.add_argument("--modes", default="local,standalone")
    parser.add_argument("--backbone", default="VGG16")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--split", default="random70")
    parser.add_argument("--name", default="scaling")
    parser.add_argument(
        "--standalone-factors",
        type=lambda v: v.split(","),
        default=None,
        help="the factors the standalone cluster runs (default: all of --factors)",
    )
    args = parser.parse_args()
    factors = [int(f) for f in args.factors.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    result = {"machine": machine(), "backbone": args.backbone, "precision": args.precision, "split": args.split,
              "runs": {m: {} for m in modes}}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="covidct-bench-scaling-"))
    cluster = None
    try:
        env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
               "TF_CPP_MIN_LOG_LEVEL": "2"}  # fmt: skip
        env.pop("COVIDCT_SPARK_MASTER", None)
        for factor in factors:
            data = work / f"x{factor}" / "COVID-CT"
            n = augmented_dataset(args.data, data, factor)
            print(f"{factor}x: {n} images", file=sys.stderr, flush=True)
            for mode in modes:
                if mode == "standalone" and args.standalone_factors and str(factor) not in args.standalone_factors:
                    continue
                if mode == "standalone" and cluster is None:
                    cluster = start_cluster(work / "cluster")
                master = cluster.master_url if mode == "standalone" else "local[2]"
                pids = [p.pid for name, p in cluster.procs.items() if name.startswith("worker")] if cluster else []
                run_env = cluster.env if mode == "standalone" else env
                found = run_job(data, work / f"out-{mode}-x{factor}", master, args, pids, run_env)
                found["img_s"] = round(n / found["wall_s"], 3)
                result["runs"][mode][f"{factor}x"] = found
                print(f"  {mode}: {found}", file=sys.stderr, flush=True)
                save(args.name, result)
                shutil.rmtree(work / f"out-{mode}-x{factor}-cache", ignore_errors=True)
            shutil.rmtree(work / f"x{factor}", ignore_errors=True)
    finally:
        if cluster is not None:
            from support.cluster import stop

            for name in [n for n in cluster.procs if n.startswith("worker")]:
                stop(cluster.procs.pop(name))
            cluster.close()
        shutil.rmtree(work, ignore_errors=True)
    for runs in result["runs"].values():
        base = runs.get("1x")
        for row in runs.values():
            row["time_ratio"] = round(row["wall_s"] / base["wall_s"], 3) if base else None
    save(args.name, result)
    print(render(result))
    return 0


def start_cluster(tmp: Path):
    """A loopback standalone master and two workers of one core each."""
    from support.cluster import Standalone, free_port

    tmp.mkdir(parents=True)
    cluster = Standalone(tmp)
    cluster.start_master()
    for i in (1, 2):
        cluster.spark_class(f"worker{i}", "org.apache.spark.deploy.worker.Worker", cluster.master_url, "--host",
                            "127.0.0.1", "--cores", "1", "--memory", "5g", "--work-dir", str(tmp / f"work{i}"),
                            "--webui-port", str(free_port()))  # fmt: skip
    cluster.wait_for("two ALIVE workers", lambda s: len(cluster.alive_workers(s)) == 2)
    return cluster


def render(result: dict) -> str:
    m = result["machine"]
    rows = []
    for mode, runs in result["runs"].items():
        for factor, r in runs.items():
            rows.append([mode, factor, r["n_images"], f"{r['wall_s']:.0f}", f"{r['time_ratio']:.2f}",
                         f"{r['img_s']:.2f}", r["peak_gib"]["driver"], r["peak_gib"]["executors"]])  # fmt: skip
    head = (f"`bench/scaling.py`, {m['date'][:16]} UTC, {m['cores']} cores ({m['cpu']}), {result['backbone']} "
            f"{result['precision']}, split {result['split']}, view body-blank, evidence on, empty cache")  # fmt: skip
    header = ["master", "images", "count", "wall s", "time ratio", "img/s", "driver peak GiB", "executors peak GiB"]
    return head + "\n\n" + markdown_table(header, rows) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
