"""This CPU's matmul peak with the project's TensorFlow, and the backbones' featurization as a share of it.

    python bench/peak.py matmul   [--repeat 5]                 # GFLOP/s of large matmuls, fp32 and bf16
    python bench/peak.py forward  --backbone VGG16 [--batch 32] [--threads 0] [--precision float32]
    python bench/peak.py all      [--images 96] [--repeat 3]   # both, plus bare Keras and the Spark featurizer

``matmul``: ``tf.linalg.matmul`` of two square matrices (n = 2048, 4096) in one process with all cores
(and with one thread, the share a single-thread Spark task can reach), after a warm-up; the best n is
the peak. ``forward``: the backbone on already-decoded, preprocessed inputs (no decoding, no Spark):
what TensorFlow's convolutions reach on this CPU. ``all`` adds bare Keras ``predict`` and the Spark featurizer on real
images (``bench/featurize.py keras`` / ``spark``: decoding; for the DAG's job the body view and the grids,
Arrow, single-thread tasks of ~32 images in whole rounds over the cores, as the train job's) and
reports each as GFLOP/s (the backbone's multiply-adds × 2 per image, counted from the Keras model's
conv and dense layers) over the peak. JSON in ``bench/results/peak.json``; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, run_json, save  # noqa: E402

HERE = Path(__file__).resolve().parent


def _tf(threads: int):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    return tf


def matmul(repeat: int, threads: int) -> dict:
    tf = _tf(threads)
    out = {}
    for dtype in ("float32", "bfloat16"):
        best = {}
        for n in (2048, 4096):
            a = tf.random.uniform((n, n), dtype=tf.float32)
            b = tf.random.uniform((n, n), dtype=tf.float32)
            a, b = tf.cast(a, dtype), tf.cast(b, dtype)
            tf.linalg.matmul(a, b).numpy()  # warm-up
            rates = []
            for _ in range(repeat):
                start = time.perf_counter()
                tf.linalg.matmul(a, b).numpy()
                rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
            best[n] = statistics.median(rates)
        n = max(best, key=best.get)
        out[dtype] = {"gflops": round(best[n], 1), "n": n, "by_n": {k: round(v, 1) for k, v in best.items()}}
    return out


def backbone_gflop(model) -> float:
    """GFLOP per image: 2 × multiply-adds of the conv (incl. depthwise/separable) and dense layers."""
    total = 0
    for layer in model.layers:
        kind = type(layer).__name__
        if kind not in ("Conv2D", "SeparableConv2D", "DepthwiseConv2D", "Dense"):
            continue
        out_shape = layer.output.shape
        cin = layer.input.shape[-1]
        if kind == "Dense":
            total += cin * out_shape[-1]
            continue
        h, w, cout = out_shape[1], out_shape[2], out_shape[3]
        kh, kw = layer.kernel_size
        if kind == "Conv2D":
            total += h * w * cout * kh * kw * cin
        elif kind == "DepthwiseConv2D":
            total += h * w * cin * kh * kw
        else:  # separable: depthwise then pointwise
            total += h * w * cin * kh * kw + h * w * cin * cout
    return 2 * total / 1e9


def forward(backbone_name: str, batch: int, threads: int, precision: str, repeat: int) -> dict:
    _tf(threads)
    import numpy as np

    from featurize import imagenet_model

    backbone, model = imagenet_model(backbone_name, precision)
    x = np.random.default_rng(0).uniform(-100, 100, (batch, backbone.input_size, backbone.input_size, 3))
    x = x.astype(np.float32)
    model.predict_on_batch(x)  # warm-up: builds the graph, oneDNN primitives
    rates = []
    for _ in range(repeat):
        start = time.perf_counter()
        model.predict_on_batch(x)
        rates.append(batch / (time.perf_counter() - start))
    return {"backbone": backbone.name, "batch": batch, "threads": threads, "precision": precision,
            "img_s": round(statistics.median(rates), 3), "rates": [round(r, 3) for r in rates],
            "gflop_per_image": round(backbone_gflop(model), 3)}  # fmt: skip


def everything(images: int, repeat: int, backbones: list[str]) -> dict:
    me = [str(HERE / "peak.py")]
    result = {"machine": machine(), "matmul": {}, "forward": [], "spark": []}
    for threads in (0, 1):
        result["matmul"][f"threads={threads or 'all'}"] = run_json([*me, "matmul", "--threads", str(threads)])
    for backbone in backbones:
        batches = (16, 32, 64) if backbone == backbones[0] else (32,)  # the batch size matters little: once
        for batch in batches:
            result["forward"].append(run_json([*me, "forward", "--backbone", backbone, "--batch", str(batch),
                                               "--repeat", str(repeat)]))  # fmt: skip
        if backbone == backbones[0]:
            result["forward"].append(run_json([*me, "forward", "--backbone", backbone, "--batch", "32",
                                               "--threads", "1", "--repeat", str(repeat)]))  # fmt: skip
        keras = run_json([str(HERE / "featurize.py"), "keras", "--backbone", backbone,
                          "--images", str(images), "--repeat", str(repeat)])  # fmt: skip
        result["keras"] = [*result.get("keras", []), {**keras, "backbone": backbone}]
        for extra in ([], ["--view", "body-blank", "--grids"]):  # plain; what the DAG's train job computes
            spark = run_json([str(HERE / "featurize.py"), "spark", "--backbone", backbone,
                              "--images", str(images), "--repeat", str(repeat), *extra])  # fmt: skip
            result["spark"].append({**spark, "backbone": backbone})
    return result


def render(result: dict) -> str:
    m = result["machine"]
    peak = result["matmul"]["threads=all"]
    one = result["matmul"]["threads=1"]
    peaks = [[d, peak[d]["gflops"], one[d]["gflops"]] for d in ("float32", "bfloat16")]
    lines = [f"`bench/peak.py all`, {m['date'][:16]} UTC, {m['cores']} cores ({m['cpu']})", "",
             markdown_table(["matmul peak (GFLOP/s)", "all cores", "one thread"], peaks), ""]  # fmt: skip
    rows = []
    gflop = {}
    for f in result["forward"]:
        gflop[f["backbone"]] = f["gflop_per_image"]
        reference = peak if f["threads"] == 0 else one
        rate = f["img_s"] * f["gflop_per_image"]
        rows.append([f["backbone"], f"bare Keras forward, batch {f['batch']}, "
                     f"{'all cores' if f['threads'] == 0 else 'one thread'}", f"{f['img_s']:.2f}", f"{rate:.0f}",
                     f"{100 * rate / reference['float32']['gflops']:.0f} %"])  # fmt: skip
    for k in result.get("keras", []):
        rate = k["median"] * gflop[k["backbone"]]
        share = 100 * rate / peak["float32"]["gflops"]
        rows.append([k["backbone"], "bare Keras predict on the decoded images (view full), TF default threads",
                     f"{k['median']:.2f}", f"{rate:.0f}", f"{share:.0f} %"])  # fmt: skip
    for s in result["spark"]:
        rate = s["median"] * gflop[s["backbone"]]
        what = "view body-blank + grids (the DAG's job)" if s.get("grids") else "view full, features only"
        share = 100 * rate / peak["float32"]["gflops"]
        parts = s.get("partitions")  # older results lack it
        layout = f"{parts} tasks of ~{-(-s['images'] // parts)} images" if parts else "tasks as read"
        threads = s.get("task_cpus", 1)
        layout = f"{threads} thread{'s' * (threads > 1)} per task, {layout}"
        rows.append([s["backbone"], f"Spark featurizer, {layout}: {what}", f"{s['median']:.2f}",
                     f"{rate:.0f}", f"{share:.0f} %"])  # fmt: skip
    lines.append(markdown_table(["backbone", "what", "img/s", "GFLOP/s", "of fp32 peak"], rows))
    # The same work both ways (decoding, view full, features only): the featurizer against bare Keras.
    keras = {k["backbone"]: k["median"] for k in result.get("keras", [])}
    ratios = [[s["backbone"], f"{s['median']:.2f}", f"{keras[s['backbone']]:.2f}",
               f"{s['median'] / keras[s['backbone']]:.2f}×"]
              for s in result["spark"] if not s.get("grids") and s["backbone"] in keras]  # fmt: skip
    if ratios:
        lines += ["", markdown_table(["backbone", "Spark img/s", "bare Keras img/s", "Spark / bare Keras"], ratios)]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("matmul", "forward", "all"))
    parser.add_argument("--backbone", default="VGG16")
    parser.add_argument("--backbones", default="VGG16,VGG19,Xception")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="TensorFlow intra-op threads (0: all cores)")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--images", type=int, default=96)
    args = parser.parse_args()
    if args.what == "matmul":
        print(json.dumps(matmul(args.repeat, args.threads)))
    elif args.what == "forward":
        print(json.dumps(forward(args.backbone, args.batch, args.threads, args.precision, args.repeat)))
    else:
        result = everything(args.images, args.repeat, [b.strip() for b in args.backbones.split(",")])
        save("peak", result)
        print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
