"""Scoring under load: five ``covidct score`` jobs started at once over overlapping folders of real images.

    python bench/scoring_load.py --model RUN/model [--images 2000] [--jobs 5] [--width 800]

The images are the real COVID-CT copy re-encoded (same pixels, other bytes: each copy is another image
for the ledger) until there are ``--images``; job ``k`` scores a folder of ``--width`` of them starting
at ``k * stride`` (hard links), so most images lie in two or three folders. The jobs run as the scoring
DAG's job runs (one process each: driver, JVM, Python workers), all with the same model version and
ledger. Measured: the wall time from the start of the first to the end of the last, images/s (distinct
images over that time), each job's peak RSS (its whole process tree, sampled every 0.2 s), and checked:
every image in the ledger once, each run one row per file of its folder. Prints one JSON line and saves
it under bench/results/. Needs the model's weights (a VGG16 model trained with ImageNet weights is what
the figures in docs/performance.md used).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, machine, save  # noqa: E402
from run import reencoded_dataset  # noqa: E402


def pool_of_images(data: Path, dest: Path, n: int) -> list[Path]:
    """``n`` distinct images: the real ones, then re-encoded copies, in one flat list."""
    copies = -(-n // sum(1 for _ in data.glob("CT_*/*")))
    reencoded_dataset(data, dest, copies, None)
    files = sorted(dest.glob("CT_*/*"), key=lambda p: (p.name.startswith("copy"), p.name))
    if len(files) < n:
        raise SystemExit(f"only {len(files)} images could be made from {data}")
    return files[:n]


def tree_rss(process: psutil.Process) -> int:
    try:
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    except psutil.Error:
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model/ folder of `covidct train`")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--width", type=int, default=800, help="images per job's folder")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    stride = (args.images - args.width) // max(1, args.jobs - 1)
    work = Path(tempfile.mkdtemp(prefix="covidct-bench-load-"))
    try:
        images = pool_of_images(args.data, work / "pool", args.images)
        folders = []
        for k in range(args.jobs):
            folder = work / f"incoming-{k}"
            folder.mkdir()
            for image in images[k * stride : k * stride + args.width]:
                (folder / image.name).hardlink_to(image)
            folders.append(folder)
        covidct = str(Path(sys.executable).parent / "covidct")
        started = time.perf_counter()
        model = ["--model", str(args.model), "--model-name", "covid-ct", "--model-version", "1"]
        jobs = [
            psutil.Popen([covidct, "-q", "score", "--images", str(folder), *model,
                          "--out", str(work / "scores" / f"run-{k}"), "--ledger", str(work / "scores" / "_ledger")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for k, folder in enumerate(folders)
        ]  # fmt: skip
        peaks = [0] * len(jobs)
        ended: list[float | None] = [None] * len(jobs)
        while any(job.poll() is None for job in jobs):
            for k, job in enumerate(jobs):
                if job.poll() is None:
                    peaks[k] = max(peaks[k], tree_rss(job))
                elif ended[k] is None:
                    ended[k] = time.perf_counter() - started
            time.sleep(0.2)
        wall = time.perf_counter() - started
        errors = [job.communicate()[1] for job in jobs]
        if any(job.returncode for job in jobs):
            raise SystemExit("a job failed:\n" + "\n".join(e[-2000:] for e in errors))
        ledger = pd.concat(pd.read_parquet(p) for p in (work / "scores" / "_ledger").rglob("part-*.parquet"))
        distinct = {hashlib.sha256(p.read_bytes()).hexdigest() for p in images}
        summaries = [json.loads((work / "scores" / f"run-{k}" / "summary.json").read_text()) for k in range(len(jobs))]
        rows_ok = all(
            len(pd.read_parquet(work / "scores" / f"run-{k}" / "predictions.parquet")) == len(list(folder.iterdir()))
            for k, folder in enumerate(folders)
        )
        result = {
            "machine": machine(),
            "model": str(args.model),
            "images": len(distinct),
            "jobs": len(jobs),
            "files_per_job": args.width,
            "wall_s": round(wall, 1),
            "images_per_s": round(len(distinct) / wall, 2),
            "job_end_s": [round(e or wall, 1) for e in ended],
            "scored_new": [s["scored_new"] for s in summaries],
            "already_scored": [s["already_scored"] for s in summaries],
            "score_s": [s["timings"]["score_s"] for s in summaries],
            "peak_rss_gib": [round(p / 2**30, 2) for p in peaks],
            "ledger_rows": len(ledger),
            "ledger_each_image_once": len(ledger) == ledger["sha256"].nunique() == len(distinct),
            "every_run_one_row_per_file": rows_ok,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save(f"scoring-load-{args.images}", result)
    print(json.dumps(result))
    return 0 if result["ledger_each_image_once"] and result["every_run_one_row_per_file"] else 1


if __name__ == "__main__":
    sys.exit(main())
