"""The benchmark harness: one command, a Markdown table on stdout, JSON in bench/results/.

    COVIDCT_WEIGHTS_DIR=... python bench/run.py [--sections featurize,layouts,multilayer,dag,scaling] [--quick]

Sections:
  featurize  bare Keras vs the Spark featurizer, img/s per backbone on the same real images (goal ≥ 0.9×);
             --precision bfloat16 measures both paths with Keras' mixed_bfloat16 policy
  layouts    Spark cores × TensorFlow intra-op threads for VGG16
  multilayer the multi-layer poolings (avg-b345, avgmax-b345) against avg, img/s of the Spark featurizer
             for VGG16 and VGG19, one Spark session per backbone (--multilayer-backbones)
  multilayer-cpu  the same poolings' CPU seconds per image through the featurizer's worker model, no
             Spark: a cost that stays comparable when other jobs share the cores
  dag        the whole DAG on the real images, cold then warm feature cache: wall time and peak RSS
             per Spark job, beside the study's 90.6 minutes (goals: cold ≤ 6 min, warm ≤ 60 s)
  scaling    1×, 2×, 4× the images (copies re-encoded so their hashes differ): 2× must take ≤ 2.1× time
  explain    `covidct predict --explain` against plain `covidct predict` (img/s), VGG16 with avg (CAM)
             and avg-b345 (Grad-CAM): plain, the maps alone, and maps + PNGs (--explain-images, default 32)
  warm       `make run` with a warm feature cache (--feature-cache, copied): a first run, then --repeat rounds of
             an unchanged run (skips training; goal ≤ 30 s) and a forced one (param force; goal ≤ 60 s), and with
             --legacy-root a warm run of the code before (interleaved: same load), with where the seconds go
             (start-up, each task, each Spark job's parts)

Real images come from COVIDCT_DATA_DIR (default ../shared/data/COVID-CT); ImageNet weights from
COVIDCT_WEIGHTS_DIR (``make weights``). Timings are noisy: short runs are repeated and medians quoted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, RESULTS, ROOT, machine, markdown_table, run_json, save  # noqa: E402

BACKBONES = ("VGG16", "VGG19", "Xception")
PRECISIONS = ("float32", "bfloat16")


def _key(section: str, precision: str) -> str:
    """Results of float32 runs keep the plain section name; others get a suffix."""
    return section if precision == "float32" else f"{section}_{precision}"


STUDY_TOTAL_MIN = 90.6
FEATURIZE = str(ROOT / "bench" / "featurize.py")
EXPLAIN = str(ROOT / "bench" / "explain.py")
RESULTS_FILE = RESULTS / "bench.json"


def section_featurize(images: int, repeat: int, precision: str = "float32") -> dict:
    rows = {}
    for backbone in BACKBONES:
        args = ["--backbone", backbone, "--images", str(images), "--repeat", str(repeat), "--precision", precision]
        keras = run_json([FEATURIZE, "keras", *args])
        spark = run_json([FEATURIZE, "spark", *args])
        rows[backbone] = {"keras": keras, "spark": spark, "ratio": spark["median"] / keras["median"]}
        print(f"  {backbone}: keras {keras['median']:.2f} img/s, spark {spark['median']:.2f} img/s, "
              f"ratio {rows[backbone]['ratio']:.2f}", file=sys.stderr, flush=True)  # fmt: skip
    return rows


LAYOUTS = {
    "2 tasks × 1 TF thread (default: spark.task.cpus=1)": ({"--master": "local[2]", "--task-cpus": "1"}, {}),
    "1 task × 2 TF threads (spark.task.cpus=2)": ({"--master": "local[2]", "--task-cpus": "2"}, {}),
    "1 task × 1 TF thread (local[1])": ({"--master": "local[1]", "--task-cpus": "1"}, {}),
}


def section_multilayer(images: int, repeat: int, backbones: list[str], precision: str = "float32") -> dict:
    out = {}
    for backbone in backbones:
        args = ["--backbone", backbone, "--images", str(images), "--repeat", str(repeat), "--precision", precision]
        out[backbone] = run_json([FEATURIZE, "poolings", *args])
    return out


def section_multilayer_cpu(images: int, repeat: int, backbones: list[str]) -> dict:
    out = {}
    for backbone in backbones:
        args = ["--backbone", backbone, "--images", str(images), "--repeat", str(repeat), "--batch-size", "16"]
        out[backbone] = run_json([FEATURIZE, "cpu-poolings", *args])
    return out


def section_explain(images: int, repeat: int, backbone: str) -> dict:
    args = [EXPLAIN, "--backbone", backbone, "--images", str(images), "--repeat", str(repeat)]
    return run_json(args)


def section_layouts(images: int, repeat: int) -> dict:
    out = {}
    for name, (flags, env) in LAYOUTS.items():
        args = [FEATURIZE, "spark", "--backbone", "VGG16", "--images", str(images), "--repeat", str(repeat)]
        for key, value in flags.items():
            args += [key, value]
        out[name] = run_json(args, env=env)
        print(f"  {name}: {out[name]['median']:.2f} img/s", file=sys.stderr, flush=True)
    return out


class PeakRSS(threading.Thread):
    """Samples the RSS of every spark-submit process tree (JVM + Python driver + workers) by backbone."""

    def __init__(self, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.every_s, self.peaks, self._halt = every_s, {}, threading.Event()

    def run(self) -> None:
        import psutil

        while not self._halt.wait(self.every_s):
            for proc in psutil.process_iter(["cmdline"]):
                cmd = proc.info["cmdline"] or []
                if "org.apache.spark.deploy.SparkSubmit" not in cmd or "--backbone" not in cmd:
                    continue
                backbone = cmd[cmd.index("--backbone") + 1]
                try:
                    tree = [proc, *proc.children(recursive=True)]
                    rss = sum(p.memory_info().rss for p in tree if p.is_running())
                except psutil.Error:
                    continue
                self.peaks[backbone] = max(self.peaks.get(backbone, 0), rss)

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        return {k: round(v / 2**30, 2) for k, v in self.peaks.items()}


def run_dag(home: Path, data: Path, precision: str, force: bool = False) -> dict:
    conf = {"precision": precision, **({"force": True} if force else {})}
    env = {**os.environ, "COVIDCT_HOME": str(home), "COVIDCT_DATA_SOURCE": str(data), "AIRFLOW_HOME": str(home / "af"),
           "COVIDCT_DAG_CONF": json.dumps(conf)}  # fmt: skip
    sampler = PeakRSS()
    sampler.start()
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "covidct.orchestration.local", "run"], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    peaks = sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"DAG run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    jobs = {}
    latest = max((home / "runs").iterdir(), key=lambda p: p.stat().st_mtime)  # this run's folder
    for metrics_path in sorted(latest.glob("*/*/metrics.json")):
        m = json.loads(metrics_path.read_text())
        t, c = m["timings"], m["cache"]
        job = {
            "total_s": t["total_s"],
            "featurize_s": t["featurize_s"],
            "cache_hits": c["hits"],
            "cache_misses": c["misses"],
        }
        jobs.setdefault(m["backbone"], job)
    for backbone, job in jobs.items():
        job["peak_rss_gib"] = peaks.get(backbone)
    return {"wall_s": wall, "jobs": jobs, "stdout_tail": proc.stdout[-1500:]}


def section_dag(data: Path, precision: str) -> dict:
    home = Path(tempfile.mkdtemp(prefix="covidct-bench-dag-"))
    try:
        cold = run_dag(home, data, precision)
        print(f"  cold: {cold['wall_s']:.0f} s", file=sys.stderr, flush=True)
        warm = run_dag(home, data, precision, force=True)  # unchanged data: without force it would skip training
        print(f"  warm: {warm['wall_s']:.0f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    speedup = STUDY_TOTAL_MIN * 60 / cold["wall_s"]
    return {"precision": precision, "cold": cold, "warm": warm, "speedup_vs_study_cold": speedup}


# --------------------------------------------------------------------------- warm path (issue 12)

WARM_TASKS = ("fetch_dataset", "validate_dataset", "check_changes", "select_backbones", "train_vgg16", "train_vgg19",
              "train_xception", "ensemble", "report", "promote", "record_success")  # fmt: skip


def _task_times(airflow_home: Path, started_at: float) -> tuple[dict, float | None, str]:
    """Each task's seconds and state in the newest DAG run of ``airflow_home`` (SQLite); when the first started."""
    import sqlite3
    from datetime import datetime

    def epoch(text: str | None) -> float | None:
        if not text:
            return None
        text = text.replace(" ", "T")
        stamp = datetime.fromisoformat(text if ("+" in text[10:] or text.endswith("Z")) else text + "+00:00")
        return stamp.timestamp()

    with sqlite3.connect(airflow_home / "airflow.db") as db:
        (run_id,) = db.execute("select run_id from dag_run order by id desc limit 1").fetchone()
        rows = db.execute("select task_id, state, start_date, end_date from task_instance where run_id = ?", (run_id,))
        tasks, first = {}, None
        for task_id, state, start, end in rows.fetchall():
            begin, finish = epoch(start), epoch(end)
            tasks[task_id] = {"state": state, "s": round(finish - begin, 2) if begin and finish else 0.0}
            if begin is not None:
                first = begin if first is None else min(first, begin)
    return tasks, (round(first - started_at, 2) if first else None), run_id


def run_make_run(home: Path, data: Path, conf: dict, env_extra: dict | None = None) -> dict:
    """One ``make run`` (``python -m covidct.orchestration.local run``) into ``home``: wall time and where it went."""
    env = {**os.environ, "COVIDCT_HOME": str(home), "COVIDCT_DATA_SOURCE": str(data), "AIRFLOW_HOME": str(home / "af"),
           "COVIDCT_DAG_CONF": json.dumps(conf), **(env_extra or {})}  # fmt: skip
    started_at = time.time()
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "covidct.orchestration.local", "run"], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"make run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    tasks, startup, run_id = _task_times(home / "af", started_at)
    jobs = {}
    run_dir = home / "runs" / "".join(c if c.isalnum() or c in "._-" else "_" for c in run_id).strip("._")
    for metrics_path in sorted(run_dir.glob("*/*/metrics.json")):
        m = json.loads(metrics_path.read_text())
        job = jobs.setdefault(m["backbone"], {"total_s": m["timings"]["total_s"],
                                             "featurize_s": m["timings"]["featurize_s"], "cache": m["cache"],
                                             "splits": {}})  # fmt: skip
        job["splits"][m["split"]] = {**m["timings"], "out_of_fold_s": (m.get("out_of_fold") or {}).get("seconds")}
    return {"wall_s": round(wall, 2), "startup_s": startup, "tasks": tasks, "jobs": jobs, "run_id": run_id,
            "screen": proc.stdout[-2000:]}  # fmt: skip


def section_warm(data: Path, feature_cache: Path, repeat: int, legacy_root: Path | None = None) -> dict:
    """A warm feature cache (copied from ``feature_cache``): a first run, then ``repeat`` rounds of runs.

    Each round: an unchanged run (skips training) and a forced one (param ``force``: retrains from
    the cache); with ``legacy_root`` (a copy of the code before retrain-on-change: its ``include/``,
    ``dags/``, ``jobs/``) also a warm run of that code, in its own home, interleaved with the others
    so that both see the same load on a shared machine. Partial results are saved after each run.
    """
    homes = {"new": Path(tempfile.mkdtemp(prefix="covidct-bench-warm-"))}
    envs = {"new": {}}
    if legacy_root is not None:
        homes["before"] = Path(tempfile.mkdtemp(prefix="covidct-bench-warm-before-"))
        envs["before"] = {"PYTHONPATH": str(legacy_root / "include")}
    out: dict = {"legacy_root": str(legacy_root) if legacy_root else None, "rounds": repeat}
    plan = [("before", "first_before", {}), ("new", "first", {})] if legacy_root else [("new", "first", {})]
    for _ in range(repeat):
        if legacy_root:
            plan.append(("before", "before", {}))
        plan += [("new", "unchanged", {}), ("new", "forced", {"force": True})]
    try:
        for home in homes.values():
            shutil.copytree(feature_cache, home / "feature-cache")
        for which, mode, conf in plan:
            result = run_make_run(homes[which], data, conf, envs[which])
            if mode.startswith("first"):
                out[mode] = result
            else:
                out.setdefault(mode, []).append(result)
            print(f"  {mode}: {result['wall_s']:.0f} s", file=sys.stderr, flush=True)
            save("warm-partial", out)
    finally:
        for home in homes.values():
            shutil.rmtree(home, ignore_errors=True)
    return out


def section_warm_job(data: Path, feature_cache: Path, repeat: int, legacy_root: Path, backbone: str = "VGG16") -> dict:
    """One warm train job (``spark-submit jobs/transfer_learning.py``, both splits, every feature cached),
    this code against ``legacy_root``'s, alternately ``repeat`` times: wall time and the job's own timings.

    ``data`` must be a fetched dataset folder (with ``manifest.parquet``, as ``make run`` leaves it).
    """
    work = Path(tempfile.mkdtemp(prefix="covidct-bench-job-"))
    out: dict = {"backbone": backbone, "legacy_root": str(legacy_root), "before": [], "after": []}
    try:
        shutil.copytree(feature_cache, work / "feature-cache")
        for i in range(repeat):
            for which, root in (("before", legacy_root), ("after", ROOT)):
                env = {**os.environ, "COVIDCT_CACHE_DIR": str(work / "feature-cache")}
                if which == "before":
                    env["PYTHONPATH"] = str(root / "include")
                target = work / f"{which}-{i}"
                start = time.perf_counter()
                subprocess.run(
                    ["spark-submit", "--master", "local[*]", "--driver-memory", "4g",
                     str(root / "jobs" / "transfer_learning.py"), "--data", str(data), "--backbone", backbone,
                     "--split", "official,random70", "--seed", "42", "--out", str(target)],
                    check=True, capture_output=True, env=env,
                )  # fmt: skip
                wall = time.perf_counter() - start
                splits = {}
                for split in ("official", "random70"):
                    m = json.loads((target / split / "metrics.json").read_text())
                    oof = (m.get("out_of_fold") or {}).get("seconds")
                    splits[split] = {"timings": m["timings"], "out_of_fold_s": oof, "accuracy": m["accuracy"],
                                     "auc": m["auc"], "cache": m["cache"]}  # fmt: skip
                out[which].append({"wall_s": round(wall, 2), "splits": splits})
                print(f"  {which} #{i + 1}: {wall:.0f} s", file=sys.stderr, flush=True)
                save("warm-job-partial", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 1) if values else None


def warm_breakdown(runs: list[dict]) -> dict[str, float | None]:
    """Median seconds per part of a ``make run`` (over ``runs``): start-up, each task, Spark jobs' parts, the rest."""
    rows: dict[str, list] = {}

    def add(name: str, value) -> None:
        rows.setdefault(name, []).append(value)

    for run in runs:
        add("whole make run (wall)", run["wall_s"])
        add("start-up: Python, Airflow import, DB check/migration, DAG parse", run["startup_s"])
        accounted = run["startup_s"] or 0.0
        for task in WARM_TASKS:
            info = run["tasks"].get(task)
            seconds = info["s"] if info and info["state"] not in ("skipped", None) else None
            add(f"task {task}", seconds)
            accounted += seconds or 0.0
        for backbone, job in run["jobs"].items():
            task = f"train_{backbone.lower()}"
            task_s = (run["tasks"].get(task) or {}).get("s")
            add(
                f"  {backbone}: spark-submit, JVM, session, imports",
                round(task_s - job["total_s"], 2) if task_s else None,
            )
            add(f"  {backbone}: image table + cache read", job["featurize_s"])
            splits = job["splits"].values()
            for part in ("fit_s", "evaluate_s", "save_s", "out_of_fold_s"):
                add(f"  {backbone}: {part[:-2].replace('_', '-')} (all splits)",
                    round(sum(s.get(part) or 0.0 for s in splits), 2))  # fmt: skip
        add("between tasks and shutdown (dag.test loop, summary)", round(run["wall_s"] - accounted, 2))
    return {name: _median(values) for name, values in rows.items()}


def render_warm(results: dict) -> str | None:
    warm = results.get("warm", {})
    columns = [
        ("before: a warm run (always retrains)", warm.get("before", [])),
        ("unchanged (skips training)", warm.get("unchanged", [])),
        ("force (retrains, warm cache)", warm.get("forced", [])),
    ]
    columns = [(title, runs) for title, runs in columns if runs]
    if not columns:
        return None
    tables = [(title, warm_breakdown(runs), len(runs)) for title, runs in columns]
    names = list(dict.fromkeys(name for _, table, _ in tables for name in table))
    rows = [
        [name] + ["—" if table.get(name) is None else f"{table[name]:.1f}" for _, table, _ in tables] for name in names
    ]
    header = ["seconds (median)"] + [f"{title}, n={n}" for title, _, n in tables]
    return ("\n**Warm path: `make run`, float32, 746 images, feature cache warm (median seconds)**\n\n"
            + markdown_table(header, rows))  # fmt: skip


def reencoded_dataset(source: Path, dest: Path, copies: int, limit: int | None) -> int:
    """``source``'s images ``copies`` times; each copy re-encoded (same pixels, other bytes)."""
    from PIL import Image, PngImagePlugin

    n = 0
    for folder in ("CT_COVID", "CT_NonCOVID"):
        (dest / folder).mkdir(parents=True)
        files = sorted((source / folder).iterdir())
        files = files[: limit // 2] if limit else files
        for f in files:
            data = f.read_bytes()
            (dest / folder / f.name).write_bytes(data)
            n += 1
            for copy in range(1, copies):
                img = Image.open(io.BytesIO(data))
                buf = io.BytesIO()
                if img.format == "PNG":
                    info = PngImagePlugin.PngInfo()
                    info.add_text("covidct-bench-copy", str(copy))
                    img.save(buf, format="PNG", pnginfo=info)
                else:
                    img.save(buf, format="JPEG", quality=95, comment=f"covidct-bench-copy {copy}".encode())
                (dest / folder / f"copy{copy}-{f.name}").write_bytes(buf.getvalue())
                n += 1
    return n


def section_scaling(data: Path, backbone: str, limit: int | None, precision: str) -> dict:
    out = {}
    work = Path(tempfile.mkdtemp(prefix="covidct-bench-scale-"))
    try:
        for factor in (1, 2, 4):
            dataset = work / f"x{factor}"
            n = reencoded_dataset(data, dataset, factor, limit)
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "covidct.cli", "-q", "train", "--data", str(dataset), "--backbone", backbone,
                 "--split", "random70", "--no-cache", "--precision", precision, "--out", str(work / f"out{factor}")],
                check=True, capture_output=True,
            )  # fmt: skip
            wall = time.perf_counter() - start
            m = json.loads((work / f"out{factor}" / "metrics.json").read_text())
            out[f"{factor}x"] = {"images": n, "wall_s": wall, "featurize_s": m["timings"]["featurize_s"]}
            print(f"  {factor}x ({n} images): {wall:.0f} s", file=sys.stderr, flush=True)
            shutil.rmtree(dataset)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = out["1x"]["wall_s"]
    for row in out.values():
        row["time_ratio"] = row["wall_s"] / base
    return out


def render(results: dict) -> str:
    m = results["machine"]
    parts = [f"Benchmarks of {m['date'][:10]} on {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB."]
    for precision in PRECISIONS:
        name = _key("featurize", precision)
        if name not in results:
            continue
        rows = [[b, f"{r['keras']['median']:.2f}", f"{r['spark']['median']:.2f}", f"{r['ratio']:.2f}",
                 f"{r['spark']['cold']:.2f}"] for b, r in results[name].items()]  # fmt: skip
        n = next(iter(results[name].values()))["keras"]["images"]
        parts.append(f"\n**Featurization ({precision}), {n} real images, median of repeated passes (img/s)**\n")
        parts.append(markdown_table(["backbone", "bare Keras", "Spark featurizer", "ratio", "Spark cold pass"], rows))
    if "multilayer" in results:
        rows, n = [], None
        for backbone, r in results["multilayer"].items():
            n = r["images"]
            rows += [[backbone, pooling, p["dim"], f"{p['median']:.2f}", f"{p['ratio']:.2f}",
                      " / ".join(f"{x:.2f}" for x in p["rates"])] for pooling, p in r["poolings"].items()]  # fmt: skip
        parts.append(f"\n**Multi-layer poolings (Spark featurizer, float32), {n} real images, median of "
                     "repeated passes in one Spark session (img/s)**\n")  # fmt: skip
        parts.append(markdown_table(["backbone", "pooling", "dims", "img/s", "vs avg", "passes"], rows))
    if "multilayer-cpu" in results:
        rows, n = [], None
        for backbone, r in results["multilayer-cpu"].items():
            n = r["images"]
            for pooling, p in r["poolings"].items():
                passes = " / ".join(f"{x:.3f}" for x in p["cpu_s_per_image"])
                rows.append([backbone, pooling, p["dim"], f"{p['median_cpu_s']:.3f}", f"{p['cost_ratio']:.2f}", passes])
        parts.append(f"\n**Multi-layer poolings, CPU seconds per image (featurizer's worker model, float32), {n} real "
                     "images, median of repeated passes**\n")  # fmt: skip
        parts.append(markdown_table(["backbone", "pooling", "dims", "CPU s/image", "vs avg", "passes"], rows))
    if "explain" in results:
        e, rows = results["explain"], []
        for pooling, r in e["poolings"].items():
            for name, rate in r["median"].items():
                passes = " / ".join(f"{x:.2f}" for x in r["rates"][name])
                rows.append([pooling, r["method"], name, f"{rate:.2f}", f"{r['cost_vs_predict'][name]:.2f}", passes])
        parts.append(f"\n**Explanations, {e['backbone']}, {e['images']} real images, {e['master']}, median of "
                     "repeated passes in one Spark session**\n")  # fmt: skip
        parts.append(markdown_table(["pooling", "method", "path", "img/s", "time vs predict", "passes"], rows))
    if "layouts" in results:
        rows = [[name, f"{r['median']:.2f}"] for name, r in results["layouts"].items()]
        parts.append("\n**Thread layouts, VGG16 (img/s)**\n")
        parts.append(markdown_table(["Spark cores × TF threads", "img/s"], rows))
    for precision in PRECISIONS:
        name = _key("dag", precision)
        if name not in results:
            continue
        d = results[name]
        rows = []
        for run in ("cold", "warm"):
            jobs = d[run]["jobs"]
            detail = ", ".join(
                f"{b} {j['total_s']:.0f} s / {j['peak_rss_gib']} GiB / cache {j['cache_hits']}+{j['cache_misses']}"
                for b, j in jobs.items()
            )
            rows.append([run, f"{d[run]['wall_s'] / 60:.1f} min", detail])
        parts.append(f"\n**Whole DAG ({precision}), 746 images (study: {STUDY_TOTAL_MIN} min; cold speed-up "
                     f"{d['speedup_vs_study_cold']:.1f}×)**\n")  # fmt: skip
        parts.append(markdown_table(["cache", "wall", "per job: time / peak RSS / cache hits+misses"], rows))
    warm = render_warm(results)
    if warm:
        parts.append(warm)
    if "scaling" in results:
        rows = [
            [k, r["images"], f"{r['wall_s']:.0f} s", f"{r['time_ratio']:.2f}"] for k, r in results["scaling"].items()
        ]
        parts.append(f"\n**Scaling ({results.get('scaling_backbone')}, {results.get('scaling_precision', 'float32')}, "
                     "`covidct train`, no cache)**\n")  # fmt: skip
        parts.append(markdown_table(["images", "count", "wall", "time ratio"], rows))
    return "\n".join(parts) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="featurize,layouts,multilayer,dag,scaling")
    parser.add_argument("--images", type=int, default=200, help="images for featurize/layouts (≥ 200)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scaling-backbone", default="Xception")
    parser.add_argument("--multilayer-backbones", default="VGG16,VGG19")
    parser.add_argument("--precision", default="float32", choices=PRECISIONS, help="for featurize, dag and scaling")
    parser.add_argument("--explain-images", type=int, default=32, help="images for the explain section")
    parser.add_argument("--quick", action="store_true", help="fewer images everywhere (a smoke run)")
    parser.add_argument("--feature-cache", type=Path, default=ROOT / "var" / "feature-cache",
                        help="warm: a feature cache holding the data's features (copied, never written)")  # fmt: skip
    parser.add_argument("--legacy-root", type=Path, default=None,
                        help="warm: a copy (include/, dags/, jobs/) of the code before retrain-on-change, e.g. "
                        "`git archive 08fd8fe include dags jobs | tar -x -C DIR`: its warm runs")  # fmt: skip
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("COVIDCT_DATA_DIR", DEFAULT_DATA)))
    args = parser.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    images, repeat, limit = (20, 1, 40) if args.quick else (args.images, args.repeat, None)
    # Sections not re-run keep their last results (bench/results/bench.json), so the table stays whole.
    previous = RESULTS_FILE.is_file() and json.loads(RESULTS_FILE.read_text()) or {}
    results: dict = {
        **previous,
        "machine": machine(),
        "sections": sorted(set(previous.get("sections", [])) | set(sections)),
    }
    for section in sections:
        print(f"[bench] {section} ...", file=sys.stderr, flush=True)
        if section == "featurize":
            results[_key("featurize", args.precision)] = section_featurize(images, repeat, args.precision)
        elif section == "layouts":
            results["layouts"] = section_layouts(images, repeat)
        elif section == "explain":
            results["explain"] = section_explain(min(images, args.explain_images), repeat, "VGG16")
        elif section == "multilayer-cpu":
            backbones = [b.strip() for b in args.multilayer_backbones.split(",") if b.strip()]
            results["multilayer-cpu"] = section_multilayer_cpu(min(images, 32), repeat, backbones)
        elif section == "multilayer":
            backbones = [b.strip() for b in args.multilayer_backbones.split(",") if b.strip()]
            results["multilayer"] = section_multilayer(images, repeat, backbones)
        elif section == "dag":
            results[_key("dag", args.precision)] = section_dag(args.data, args.precision)
        elif section == "warm-job":
            results["warm-job"] = section_warm_job(args.data, args.feature_cache, args.repeat, args.legacy_root)
        elif section == "warm":
            results["warm"] = section_warm(args.data, args.feature_cache, args.repeat, args.legacy_root)
        elif section == "scaling":
            results["scaling_backbone"], results["scaling_precision"] = args.scaling_backbone, args.precision
            results["scaling"] = section_scaling(args.data, args.scaling_backbone, limit, args.precision)
        else:
            parser.error(f"unknown section {section}")
    table = render(results)
    results["markdown"] = table
    path = save("bench", results)
    print(table)
    print(f"(JSON: {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
