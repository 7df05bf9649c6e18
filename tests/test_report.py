"""The comparison report: tables, intervals, McNemar, figures, failures, random weights, atomicity.

Run folders are written here the way the training job writes them (metrics.json beside a
Spark-style predictions.parquet folder), from deterministic synthetic predictions; no Spark.
"""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidct.cli import main
from covidct.core.errors import CovidctError
from covidct.data.dataset import group_key
from covidct.modelling import stats
from covidct.reporting import report as reportlib
from covidct.reporting.comparison import COLUMNS
from covidct.reporting.formatting import fmt_p
from support.runs import BACKBONES, SPLITS, make_run, predictions, split_images, write_result

RED = "#b00020"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("run"))
    rep = reportlib.build_report([run])
    return run, rep, rep.html.read_text(encoding="utf-8"), rep.markdown.read_text(encoding="utf-8")


def sections(text: str, marker: str) -> dict[str, str]:
    """Split name -> the text of its section (``\\n## official...`` / ``<h2>official...``)."""
    found = {}
    for split in SPLITS:
        start = text.index(f"{marker}{split}:")
        end = text.find(marker, start + 1)
        end = len(text) if end == -1 else end
        found[split] = text[start:end]
    return found


# --------------------------------------------------------------------------- content


def test_report_files_and_default_location(built):
    run, rep, _html, _md = built
    assert rep.out == (run / "report").absolute()
    assert rep.html.is_file() and rep.markdown.is_file() and rep.summary_json.is_file()
    assert sorted(rep.splits) == sorted(SPLITS)
    summary = json.loads(rep.summary_json.read_text())
    assert set(summary["splits"]) == set(SPLITS)
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_the_shortcut_baselines_section_says_why_without_the_data_folder(built):
    _run, rep, html, md = built
    shortcuts = json.loads(rep.summary_json.read_text())["shortcuts"]
    assert [p["split"] for p in shortcuts["splits"]] == ["random70", "official"]  # the comparison's order
    for part in shortcuts["splits"]:  # the run folders name /data/COVID-CT, which is not there
        assert part["rows"] == [] and part["reason"].startswith("the data folder the backbones were trained on cannot")
        assert f"No shortcut baselines on {part['split']}: {part['reason']}." in md
    assert html.count("<h2>Shortcut baselines: models that never see the anatomy</h2>") == 1
    assert md.index("## Timings and feature cache") < md.index("## Shortcut baselines: models that never see")


def test_every_backbone_row_per_split(built):
    _run, rep, html, md = built
    for text, marker in ((html, "<h2>"), (md, "\n## ")):
        for split, section in sections(text, marker).items():
            for backbone in BACKBONES:
                assert re.search(rf"(<td class=\"name\">|\| ){backbone}\b", section), (split, backbone)
    for split in SPLITS:
        assert [e.backbone for e in rep.splits[split].entries] == list(BACKBONES)
        assert rep.splits[split].failed == {}


def test_table_shows_metrics_json_values_with_intervals(built):
    run, rep, html, md = built
    md_sections = sections(md, "\n## ")
    for split in SPLITS:
        for entry in rep.splits[split].entries:
            written = json.loads(entry.source.read_text())
            row = next(line for line in md_sections[split].splitlines() if line.startswith(f"| {entry.backbone}"))
            for key, _title, percent in COLUMNS:
                value, interval = written[key], entry.interval(key)
                assert interval is not None and interval.low is not None, (split, entry.backbone, key)
                assert interval.low <= value + 1e-9 and value - 1e-9 <= interval.high, (split, entry.backbone, key)
                assert interval.low < interval.high or key in ("sensitivity", "specificity")
                scale, digits = (100, 2) if percent else (1, 3)
                low, point, high = (f"{scale * v:.{digits}f}" for v in (interval.low, value, interval.high))
                cell = f"{point} [{low}, {high}]"
                assert cell in row, (key, cell, row)
                assert cell.split(" ", 1)[1] in html  # the same CI in the HTML
    summary = json.loads(rep.summary_json.read_text())
    for split in SPLITS:
        for row in summary["splits"][split]["rows"]:
            for key, m in row["metrics"].items():
                assert m["ci_low"] <= m["value"] + 1e-9 <= m["ci_high"] + 2e-9, (split, row["backbone"], key)
        units = {r["bootstrap_unit"] for r in summary["splits"][split]["rows"]}
        assert units == {"patient" if split == "official" else "image"}
    assert "trailing '%<n>'" in md and "trailing &#x27;%&lt;n&gt;&#x27;" in html  # the patient heuristic is documented


def test_paper_figures_beside_the_three_backbones(built):
    _run, _rep, html, md = built
    for figure in ("85.65 (185/216)", "84.26 (182/216)", "82.87 (179/216)"):
        assert md.count(figure) == 2 and figure in html  # one per split
    assert "different protocol" in sections(md, "\n## ")["official"]
    assert "not directly comparable" in md


def test_random_weights_flagged_in_red_words_everywhere(built):
    _run, rep, html, md = built
    warning = "RANDOM WEIGHTS — not a meaningful result"
    # HTML: a red banner, red row and a label in words wherever Xception appears
    banner = re.search(r"<div class='banner'>(.*?)</div>", html, re.S)
    assert banner and warning in banner.group(1) and "Xception" in banner.group(1)
    assert re.search(r"\.banner\{background:#b00020", html) and re.search(r"tr\.random td\{[^}]*#b00020", html)
    rows = re.findall(r"<tr[^>]*>.*?</tr>", html, re.S)
    xception_rows = [r for r in rows if "Xception" in r]
    assert len(xception_rows) >= 2 * 3 + 2  # 2 metric rows, 2 x 2 McNemar rows, 2 timing rows
    for r in xception_rows:
        assert r.startswith('<tr class="random">') and warning in r
    for r in rows:
        if "VGG" in r and "Xception" not in r:
            assert warning not in r
    # Markdown: a warning line before the first section, and a bold note in every Xception row
    top = md[: md.index("## ")]
    assert "> **⚠ RANDOM WEIGHTS** — not a meaningful result" in top and "Xception" in top
    for line in md.splitlines():
        if line.startswith("|") and "Xception" in line:
            assert "**⚠ RANDOM WEIGHTS**" in line, line
    assert rep.random_weights == ["Xception (random70)", "Xception (official)"]
    summary = json.loads(rep.summary_json.read_text())
    flagged = {r["backbone"]: r["warning"] for s in summary["splits"].values() for r in s["rows"]}
    assert flagged == {"VGG16": None, "VGG19": None, "Xception": warning}


def test_timings_and_cache_beside_the_study(built):
    _run, _rep, html, md = built
    timings = md[md.index("## Timings") :]
    for backbone, fit, evaluate in (("VGG16", 16.1, 14.2), ("VGG19", 20.3, 17.6), ("Xception", 12.4, 10.5)):
        row = next(line for line in timings.splitlines() if line.startswith(f"| {backbone}"))
        assert "| 321.5 | 12.3 | 3.5 | 360.0 | 700 hits / 46 misses |" in row
        assert row.endswith(f"| {fit} | {evaluate} |")
    assert "700 hits / 46 misses" in html


def test_pngs_are_valid_images_and_embedded(built):
    _run, rep, html, md = built
    assert len(rep.images) == 3 * len(SPLITS)
    names = {p.name for p in rep.images}
    assert names == {f"{kind}_{split}.png" for kind in ("roc", "confusion", "calibration") for split in SPLITS}
    for path in rep.images:
        assert path.is_file() and path.stat().st_size > 5000
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width >= 300 and img.height >= 300
            assert len(set(img.convert("L").getdata())) > 10  # not blank
        assert f"]({path.name})" in md
    uris = re.findall(r"src='(data:image/png;base64,[^']+)'", html)
    assert len(uris) == len(rep.images)
    assert base64.b64decode(uris[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    links = re.findall(r"(?:src|href|url)\s*[=(]\s*['\"]?([^'\")]*)", html)
    assert links and all(link.startswith("data:image/png;base64,") for link in links)  # self-contained
    assert "<script" not in html and "<link" not in html


# --------------------------------------------------------------------------- McNemar


def hand_mcnemar(a: pd.DataFrame, b: pd.DataFrame) -> tuple[int, int, float]:
    right_a = {r.relpath: r.prediction == r.label for r in a.itertuples()}
    right_b = {r.relpath: r.prediction == r.label for r in b.itertuples()}
    only_a = sum(1 for p in right_a if right_a[p] and not right_b[p])
    only_b = sum(1 for p in right_a if right_b[p] and not right_a[p])
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return only_a, only_b, min(1.0, 2 * tail)


def test_mcnemar_matches_hand_computation(built):
    _run, rep, html, md = built
    md_sections = sections(md, "\n## ")
    for split in SPLITS:
        rows = rep.splits[split].mcnemar
        assert [(r["backbone_a"], r["backbone_b"]) for r in rows] == [
            ("VGG16", "VGG19"),
            ("VGG16", "Xception"),
            ("VGG19", "Xception"),
        ]
        for row in rows:
            b, c, p = hand_mcnemar(predictions(row["backbone_a"], split), predictions(row["backbone_b"], split))
            assert row["tested"] and (row["b"], row["c"]) == (b, c)
            assert row["pvalue"] == pytest.approx(p, rel=1e-9)
            assert row["n"] == len(split_images(split))
            assert f"| {row['n']} | {b} | {c} | {fmt_p(p)} |" in md_sections[split]
        assert any(r["b"] + r["c"] > 0 for r in rows)


def test_mcnemar_not_tested_when_test_sets_differ(tmp_path):
    a = make_run(tmp_path / "seed42", backbones=("VGG16",), seed=42)
    b = make_run(tmp_path / "seed7", backbones=("VGG16",), seed=7)
    rep = reportlib.build_report([a, b], out=tmp_path / "rep")
    rows = rep.splits["random70"].mcnemar
    assert len(rows) == 1 and not rows[0]["tested"] and "test sets differ" in rows[0]["reason"]
    assert {rows[0]["backbone_a"], rows[0]["backbone_b"]} == {"VGG16 (seed=42)", "VGG16 (seed=7)"}
    assert "test sets differ" in rep.markdown.read_text() and "test sets differ" in rep.html.read_text()


# --------------------------------------------------------------------------- failures


def test_failed_and_missing_backbones_are_named(tmp_path):
    run = make_run(tmp_path / "run", backbones=("VGG16",))
    rep = reportlib.build_report(
        [run],
        expected_backbones=["vgg16", "VGG19", "xception"],
        failures={"xception": "task train_xception failed; see its log"},
    )
    assert rep.failures == {"Xception": "task train_xception failed; see its log", "VGG19": "no results"}
    html, md = rep.html.read_text(), rep.markdown.read_text()
    for text in (html, md):
        assert "VGG19: failed — no results" in text
        assert "Xception: failed — task train_xception failed; see its log" in text
    for split in SPLITS:
        assert set(rep.splits[split].failed) == {"VGG19", "Xception"}
        section = sections(md, "\n## ")[split]
        assert "**VGG19: failed — no results**" in section
    summary = json.loads(rep.summary_json.read_text())
    assert summary["failures"]["VGG19"] == "no results"
    assert summary["splits"]["official"]["failed"][0] == {"backbone": "VGG19", "reason": "no results"}


def test_backbone_missing_one_split_is_named_on_that_split(tmp_path):
    run = make_run(tmp_path / "run", backbones=("VGG16",))
    write_result(tmp_path / "run" / "vgg19", "VGG19", "random70")  # a single-split job
    rep = reportlib.build_report([run])
    assert rep.splits["official"].failed == {"VGG19": "no results on this split"}
    assert rep.splits["random70"].failed == {}
    assert "VGG19: failed — no results on this split" in rep.markdown.read_text()


def test_no_metrics_at_all_is_an_error(tmp_path):
    (tmp_path / "run" / "vgg16").mkdir(parents=True)
    with pytest.raises(CovidctError, match="no metrics.json"):
        reportlib.build_report([tmp_path / "run"], expected_backbones=["vgg16"])
    with pytest.raises(CovidctError, match="does not exist"):
        reportlib.build_report([tmp_path / "nowhere"])
    assert not (tmp_path / "run" / "report").exists()


def test_staging_folders_of_running_jobs_are_ignored(tmp_path):
    run = make_run(tmp_path / "run", backbones=("VGG16",))
    write_result(run / ".vgg19.tmp-0123456789ab", "VGG19", "random70")  # a job still writing
    rep = reportlib.build_report([run])
    assert [e.backbone for e in rep.splits["random70"].entries] == ["VGG16"]


def test_refuses_to_replace_a_run_folder(tmp_path):
    run = make_run(tmp_path / "run", backbones=("VGG16",))
    with pytest.raises(CovidctError, match="would replace run folder"):
        reportlib.build_report([run], out=run)
    with pytest.raises(CovidctError, match="would replace run folder"):
        reportlib.build_report([run], out=tmp_path)
    assert (run / "vgg16" / "official" / "metrics.json").is_file()


# --------------------------------------------------------------------------- CLI, atomicity


def test_cli_report(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    out = tmp_path / "rep"
    assert main(["-q", "report", str(run), "--out", str(out), "--expect", "vgg16,vgg19,xception,resnet50"]) == 0
    printed = capsys.readouterr().out
    assert str(out.absolute() / "report.html") in printed and str(out.absolute() / "report.md") in printed
    assert "ResNet50: failed — no results" in (out / "report.md").read_text()
    assert main(["-q", "report", str(tmp_path / "empty-does-not-exist")]) == 2
    assert "error:" in capsys.readouterr().err


def test_failure_midway_leaves_previous_report(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", backbones=("VGG16", "VGG19"))
    first = reportlib.build_report([run])
    before = {p.name: p.read_bytes() for p in first.out.iterdir()}
    make_run(tmp_path / "run", backbones=("Xception",))  # new results arrive

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(reportlib, "render_markdown", boom)  # after the PNGs, HTML and summary are written
    with pytest.raises(RuntimeError, match="disk full"):
        reportlib.build_report([run])
    assert {p.name: p.read_bytes() for p in first.out.iterdir()} == before
    assert not [p for p in run.iterdir() if p.name.startswith(".report")]  # staging removed


# --------------------------------------------------------------------------- stats


@pytest.mark.parametrize("grouped", [False, True])
def test_vectorized_resample_metrics_equal_sklearn(grouped):
    frame = predictions("VGG19", "official")
    y, pred, score = frame["label"].to_numpy(), frame["prediction"].to_numpy(), frame["probability"].to_numpy()
    score = np.round(score, 1)  # ties, as Spark's probabilities can have
    codes = np.unique([group_key(p) for p in frame["relpath"]], return_inverse=True)[1] if grouped else None
    weights = stats.resample_weights(len(y), codes, 150, np.random.default_rng(3))
    got = stats.weighted_metrics(y, pred, score, weights)
    for r in range(len(weights)):
        idx = np.repeat(np.arange(len(y)), weights[r].astype(int))
        ref = stats.reference_metrics(y[idx], pred[idx], score[idx])
        for name in stats.METRICS:
            if ref[name] is None:
                assert np.isnan(got[name][r])
            else:
                assert got[name][r] == pytest.approx(ref[name], abs=1e-12), (r, name)


def test_group_key_and_degenerate_bootstrap():
    assert group_key("CT_COVID/2020.02.10.20021584-p6-52%3.png") == "CT_COVID/2020.02.10.20021584-p6-52"
    assert group_key("CT_NonCOVID/12%1.jpg") == "CT_NonCOVID/12"
    assert group_key("CT_NonCOVID/12.png") == group_key("CT_NonCOVID/12%0.jpg")
    assert group_key("CT_COVID/a%1.png") != group_key("CT_NonCOVID/a%1.png")
    # one test image per class: most resamples hold one class only -> those are skipped, not zero
    boot = stats.bootstrap([0, 1], [0, 1], [0.2, 0.9], n_resamples=400)
    assert boot.intervals["accuracy"].n_valid == 400
    assert 0 < boot.intervals["auc"].n_valid < 400 and boot.intervals["auc"].low == 1.0
    assert stats.mcnemar([1, 1, 0], [1, 1, 0], [1, 1, 0]) == stats.McNemar(0, 0, 3, 1.0)


# --------------------------------------------------------------------------- ensemble and repeated seeds


def write_seeds(folder: Path, backbone: str, accuracies: list[float], **extra) -> None:
    folder.mkdir(parents=True)
    runs = [
        {"seed": s, "accuracy": a, "auc": 0.8 + a / 10, "n_train": 522, "n_test": 224} for s, a in enumerate(accuracies)
    ]
    data = {"backbone": backbone, "split": "random70", "seeds": list(range(len(accuracies))), "runs": runs, **extra}
    (folder / "seeds.json").write_text(json.dumps(data))


def test_ensemble_rows_get_intervals_mcnemar_and_curves(tmp_path):
    from covidct.modelling.ensemble import build_ensemble

    run = make_run(tmp_path / "run")
    result = build_ensemble(run)
    assert any("Ensemble (stacked) on official: no out-of-fold predictions" in n for n in result.notes)
    rep = reportlib.build_report([run])
    for split in SPLITS:
        rows = rep.summary["splits"][split]["rows"]
        assert [r["label"] for r in rows] == ["VGG16", "VGG19", "Xception", "Ensemble"]
        ensemble = rows[-1]
        expected = np.mean([predictions(b, split)["probability"] for b in BACKBONES], axis=0)
        labels = predictions("VGG16", split)["label"].to_numpy()
        accuracy = float(((expected > 0.5) == labels).mean())
        assert ensemble["metrics"]["accuracy"]["value"] == pytest.approx(accuracy)
        assert ensemble["metrics"]["accuracy"]["ci_low"] < accuracy < ensemble["metrics"]["accuracy"]["ci_high"]
        assert ensemble["random_weights"] is True  # one member (Xception) has random weights
        tested = {(m["backbone_a"], m["backbone_b"]) for m in rep.summary["splits"][split]["mcnemar"] if m["tested"]}
        assert {(b, "Ensemble") for b in BACKBONES} <= tested
    assert "Ensemble" not in {r["backbone"] for r in rep.summary["timings"]}  # no job of its own
    md = rep.markdown.read_text(encoding="utf-8")
    assert "| Ensemble **⚠ RANDOM WEIGHTS** — not a meaningful result |" in md


def test_official_clean_beside_official_in_the_report_and_the_ensemble(tmp_path):
    from covidct.modelling.ensemble import build_ensemble

    run = tmp_path / "run"
    for backbone in ("VGG16", "VGG19"):
        for split in ("random70", "official", "official-clean"):
            write_result(run / backbone.lower() / split, backbone, split)  # OUT/<split>/, as a job with three splits
    result = build_ensemble(run)
    assert set(result.splits) == {"random70", "official", "official-clean"}
    assert result.model_split == "official"  # the saved ensemble's members stay those trained on official
    rep = reportlib.build_report([run], gallery=0)
    assert list(rep.splits) == ["random70", "official", "official-clean"]
    clean = rep.summary["splits"]["official-clean"]
    assert [r["label"] for r in clean["rows"]] == ["VGG16", "VGG19", "Ensemble"]
    assert {r["bootstrap_unit"] for r in clean["rows"]} == {"patient"}  # whole patients, as on official
    assert all(m["tested"] and m["n"] == len(split_images("official")) - 1 for m in clean["mcnemar"])
    html, md = rep.html.read_text(encoding="utf-8"), rep.markdown.read_text(encoding="utf-8")
    title = "official-clean: the official lists without the test images that show the same picture as"
    assert html.index("<h2>official:") < html.index(f"<h2>{title}") and md.index("\n## official:") < md.index(
        f"\n## {title}"
    )
    for kind in ("roc", "confusion", "calibration"):
        assert (rep.out / f"{kind}_official-clean.png").is_file()
        assert f"]({kind}_official-clean.png)" in md
    assert "alt='ROC curves, official-clean split'" in html


def test_repeated_seeds_table_with_the_study_percentile(tmp_path):
    run = make_run(tmp_path / "run", backbones=("VGG16",))
    accuracies = [0.80, 0.82, 0.84, 0.86, 0.8565, 0.88]
    write_seeds(run / "vgg16" / "random70-seeds", "VGG16", accuracies)
    write_seeds(run / "ensemble" / "random70-seeds" / "mean", "Ensemble", [0.9] * 6, ensemble=True)
    rep = reportlib.build_report([run])
    repeats = {r["label"]: r for r in rep.summary["repeats"]}
    vgg16 = repeats["VGG16"]
    assert vgg16["accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
    assert vgg16["accuracy"]["sd"] == pytest.approx(np.std(accuracies, ddof=1))
    assert (vgg16["accuracy"]["min"], vgg16["accuracy"]["max"]) == (0.80, 0.88)
    # 3 seeds below 85.65 %, one equal (counts half), 2 above: (3 + 0.5) / 6
    assert vgg16["study_percentile"] == pytest.approx(100 * 3.5 / 6)
    assert repeats["Ensemble"]["study"] == "VGG16" and repeats["Ensemble"]["study_percentile"] == 0
    md = rep.markdown.read_text(encoding="utf-8")
    assert (
        f"| VGG16 | 6 (0-5) | {100 * np.mean(accuracies):.2f} ± {100 * np.std(accuracies, ddof=1):.2f} | 80.00–88.00 |"
        in md
    )
    assert "| 85.65 | 58 |" in md and "85.65 (the study's best, VGG16) | 0 |" in md
    html = rep.html.read_text(encoding="utf-8")
    assert "<h2>random70 repeated over 6 seeds</h2>" in html and "alt='Accuracy and AUC per seed, random70'" in html
    assert (rep.out / "seeds_random70.png").is_file() and rep.out / "seeds_random70.png" in rep.images


# --------------------------------------------------------------------------- the data section


def test_the_data_section_shows_pictures_filed_twice_side_by_side(small_dataset, tmp_path):
    import shutil

    from covidct.data.validate import validate
    from covidct.reporting.data_audit import append_data_section
    from synthetic import first_listed, plant_near_duplicate

    data = shutil.copytree(small_dataset, tmp_path / "COVID-CT")
    covid_test = first_listed(data, "COVID/testCT_COVID.txt", "CT_COVID")
    twin = plant_near_duplicate(data, covid_test, "CT_NonCOVID", "NonCOVID/trainCT_NonCOVID.txt", "71%0.jpg")
    gate = validate(data, expected_covid=12, expected_noncovid=13)
    rep = reportlib.build_report([make_run(tmp_path / "run")], n_resamples=50)

    for _ in range(2):  # added again (a retried report task): replaced, not repeated
        found = append_data_section(rep.out, gate.result_json)
    html, md = rep.html.read_text(encoding="utf-8"), rep.markdown.read_text(encoding="utf-8")
    assert html.count("<h2>Data: pictures filed twice</h2>") == 1 and md.count("## Data: pictures filed twice") == 1
    [pair] = found["pairs"]
    assert (pair["relpath_a"], pair["relpath_b"], pair["kind"]) == (covid_test, twin, "across classes")
    row = html[html.index("<h2>Data: pictures filed twice</h2>") :]
    assert covid_test in row and twin in row and "COVID, test" in row and "non-COVID, train" in row
    assert "<code>near_duplicates: fail</code> stops such data" in row
    [uri] = re.findall(r"src='data:image/png;base64,([^']+)'", row)
    thumb = Image.open(rep.out / pair["thumbnail"])
    assert thumb.height == 128 and base64.b64decode(uri) == (rep.out / pair["thumbnail"]).read_bytes()
    assert f"| across classes | {covid_test} (COVID, test) | {twin} (non-COVID, train) | {pair['distance']} |" in md
    assert f"]({pair['thumbnail']}) |" in md
    assert json.loads(rep.summary_json.read_text())["data"]["pairs"] == found["pairs"]


def test_the_data_section_says_when_no_picture_is_filed_twice_and_is_absent_without_a_gate(small_dataset, tmp_path):
    import shutil

    from covidct.data.validate import validate
    from covidct.reporting.data_audit import append_data_section

    data = shutil.copytree(small_dataset, tmp_path / "COVID-CT")
    gate = validate(data, expected_covid=12, expected_noncovid=12)
    rep = reportlib.build_report([make_run(tmp_path / "run")], n_resamples=50)
    before = rep.html.read_text(encoding="utf-8")
    assert append_data_section(rep.out, tmp_path / "nowhere.json") is None
    assert rep.html.read_text(encoding="utf-8") == before
    assert append_data_section(rep.out, gate.result_json)["pairs"] == []
    assert "found no picture filed twice under both classes or in two official splits" in rep.html.read_text()
    assert not (rep.out / "near-duplicates").exists()
