"""What users wait for (issue 27): a cold ``make run``, a retrain after 20 new images arrive, a forced retrain and
an unchanged scheduled run, each with where its seconds went.

    COVIDCT_WEIGHTS_DIR=... python bench/users.py [--repeat 2] [--new 20]

Each round starts from an empty home (empty feature cache, fresh Airflow DB) and a copy of the dataset:

1. ``cold``: the whole DAG on the 746 images, every feature computed;
2. ``new``: ``--new`` images added (copies of real ones, each slightly brightened so that its bytes and its
   features are new; half COVID, listed in the official train lists), the counts passed as params: the
   run featurizes only those and refits every model;
3. ``force``: the same data again with ``force``: every feature from the cache, every model refitted;
4. ``unchanged``: the same again without ``force``: nothing to retrain.

``cold`` against its featurization: the three jobs' ``featurize_s`` (from their ``metrics.json``) summed.
JSON in ``bench/results/users.json``; medians over the rounds; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, machine, markdown_table, save  # noqa: E402
from run import run_make_run as make_run  # noqa: E402

RUNS = ("cold", "new", "force", "unchanged")


def add_new_images(data: Path, n: int) -> tuple[int, int]:
    """``n`` new images in ``data`` (half COVID): real ones, brightened by one grey level; returns the new counts."""
    from PIL import Image, ImageOps

    added = {"CT_COVID": 0, "CT_NonCOVID": 0}
    lists = {"CT_COVID": data / "Data-split" / "COVID" / "trainCT_COVID.txt",
             "CT_NonCOVID": data / "Data-split" / "NonCOVID" / "trainCT_NonCOVID.txt"}  # fmt: skip
    for i in range(n):
        folder = "CT_COVID" if i % 2 == 0 else "CT_NonCOVID"
        source = sorted(p for p in (data / folder).iterdir() if p.suffix.lower() == ".png")[i]
        with Image.open(source) as img:
            picture = ImageOps.exif_transpose(img).convert("RGB").point(lambda v: min(v + 1, 255))
        buf = io.BytesIO()
        picture.save(buf, format="PNG")
        name = f"new-{i:03d}-{source.stem}.png"
        (data / folder / name).write_bytes(buf.getvalue())
        with open(lists[folder], "a") as listing:
            listing.write(name + "\n")
        added[folder] += 1
    count = {folder: sum(1 for p in (data / folder).iterdir() if p.is_file()) for folder in added}
    return count["CT_COVID"], count["CT_NonCOVID"]


def one_round(source: Path, new: int, code: Path | None = None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="covidct-bench-users-"))
    try:
        data, home = work / "COVID-CT", work / "home"
        shutil.copytree(source, data)
        env = {"PYTHONPATH": str(code / "include")} if code else None  # another checkout's code (before/after)

        def run_make_run(home, data, conf):
            return make_run(home, data, conf, env)

        out = {"cold": run_make_run(home, data, {})}
        print(f"  cold: {out['cold']['wall_s']:.1f} s", file=sys.stderr, flush=True)
        covid, noncovid = add_new_images(data, new)
        grown = {"expect_covid": covid, "expect_noncovid": noncovid}
        out["new"] = run_make_run(home, data, grown)
        print(f"  {new} new images: {out['new']['wall_s']:.1f} s", file=sys.stderr, flush=True)
        out["force"] = run_make_run(home, data, {**grown, "force": True})
        print(f"  force: {out['force']['wall_s']:.1f} s", file=sys.stderr, flush=True)
        out["unchanged"] = run_make_run(home, data, grown)
        print(f"  unchanged: {out['unchanged']['wall_s']:.1f} s", file=sys.stderr, flush=True)
        for run in out.values():
            run["featurize_s"] = round(sum(j["featurize_s"] for j in run["jobs"].values()), 2)
        cold = out["cold"]
        cold["vs_featurization"] = round(cold["wall_s"] / cold["featurize_s"], 3) if cold["featurize_s"] else None
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def render(result: dict) -> str:
    m = result["machine"]
    rows = []
    for name in RUNS:
        walls = [r[name]["wall_s"] for r in result["rounds"]]
        feats = [r[name]["featurize_s"] for r in result["rounds"]]
        jobs = {}
        for r in result["rounds"]:
            for backbone, job in r[name]["jobs"].items():
                jobs.setdefault(backbone, []).append(job["total_s"])
        detail = ", ".join(f"{b} {statistics.median(v):.0f} s" for b, v in jobs.items()) or "skipped"
        rows.append([name, f"**{statistics.median(walls):.1f}** ({' / '.join(f'{w:.1f}' for w in walls)})",
                     f"{statistics.median(feats):.1f}", detail])  # fmt: skip
    ratios = [r["cold"]["vs_featurization"] for r in result["rounds"]]
    head = (f"`bench/users.py`, {m['date'][:16]} UTC, {m['cores']} cores ({m['cpu']}), float32, ImageNet weights, "
            f"{len(result['rounds'])} rounds (median, rounds in brackets); cold / featurization: "
            f"{statistics.median(ratios):.2f}× ({' / '.join(f'{x:.2f}' for x in ratios)})")  # fmt: skip
    return head + "\n\n" + markdown_table(["run", "wall s", "featurization s (3 jobs)", "train jobs"], rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--new", type=int, default=20)
    parser.add_argument("--name", default="users", help="results file name (bench/results/NAME.json)")
    parser.add_argument("--code", type=Path, help="run another checkout's code (its include/ first on PYTHONPATH)")
    args = parser.parse_args()
    result = {"machine": machine(), "new_images": args.new, "code": str(args.code or "this checkout"), "rounds": []}
    for k in range(args.repeat):
        print(f"round {k + 1} of {args.repeat}", file=sys.stderr, flush=True)
        result["rounds"].append(one_round(args.data, args.new, args.code))
        save(args.name, result)
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
