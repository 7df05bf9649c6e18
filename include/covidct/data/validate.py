"""Great Expectations validation of a dataset folder, as a library call.

Two batches are validated in an ephemeral GX context (nothing is written outside
``OUT``, no usage statistics are sent):

- ``images``: the manifest (``covidct.data.manifest``), one row per image: expected counts
  per class, every file decodes fully, no duplicate content (sha256), labels in {0, 1},
  width/height within sane bounds and pixels below PIL's decompression-bomb limit,
  format PNG or JPEG (by content), every image in exactly one official split list;
  no picture filed under both classes, nor in two official splits of one class
  (near-duplicates by perceptual hash, ``covidct.data.duplicates``): these two are
  *warnings* by default (the upstream data has such pairs), failures with
  ``near_duplicates="fail"``;
- ``split_lists``: one row per line of ``Data-split/``: every named file exists, and
  no file is named twice.

``OUT`` (default ``DIR/validation``) receives ``result.json`` and the GX Data Docs site
(``data-docs/index.html``), replaced atomically. ``ValidationResult.summary()`` names each
failed expectation and warning, with the offending files.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from PIL import Image

from covidct.core.atomic import atomic_dir
from covidct.core.errors import CovidctError, ImageDecodeError
from covidct.data.dataset import LABEL_NAMES, check_layout
from covidct.data.duplicates import (
    ACROSS_CLASSES,
    ACROSS_SPLITS,
    BITS,
    MAX_DISTANCE,
    POLICIES,
    near_duplicates,
    side_by_side,
)
from covidct.data.manifest import SPLITS, dataset_digest, load_manifest, split_entries

log = logging.getLogger(__name__)

MIN_SIDE, MAX_SIDE = 32, 10_000  # pixels; the real images are 115..1671 wide, 96..1225 high
FORMATS = ("PNG", "JPEG")
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
SHOW_FILES = 10  # offending files named per failure in the summary (all are in result.json)
MAX_NOTED = 20  # near-duplicate pairs shown with their pictures in the Data Docs (all are in result.json)
THUMB_HEIGHT = 96  # pixels, of those pictures
# the near-duplicate kinds the gate checks: each image's closest twin of that kind, in a column, and the check
TWINS = {
    ACROSS_CLASSES: ("twin_other_class", "no picture under both classes"),
    ACROSS_SPLITS: ("twin_other_split", "no picture in two official splits"),
}


@dataclass(frozen=True)
class Failure:
    """One failed expectation: what was expected, what was found, which files."""

    expectation: str  # the GX expectation type, e.g. expect_column_values_to_be_null
    column: str | None
    description: str
    message: str
    files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ValidationResult:
    success: bool
    data_dir: Path
    label: str
    evaluated: int  # expectations evaluated
    images: int
    failures: list[Failure]  # failed critical expectations: the data did not pass
    result_json: Path
    data_docs: Path  # index.html
    seconds: float
    warnings: list[Failure] = field(default_factory=list)  # failed expectations of severity "warning"

    def summary(self) -> str:
        verdict = "passed" if self.success else "FAILED"
        met = self.evaluated - len(self.failures) - len(self.warnings)
        warned = f", {len(self.warnings)} with a warning" if self.warnings else ""
        lines = [
            f"validation of {self.label} {verdict}: {met} of {self.evaluated} expectations met{warned} "
            f"({self.images} images, {self.seconds:.1f} s)"
        ]
        lines += [f"  - {failure.message}" for failure in self.failures]
        lines += [f"  - warning: {warning.message}" for warning in self.warnings]
        lines += [f"result: {self.result_json}", f"data docs: {self.data_docs}"]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Check:
    batch: str  # "images" or "split_lists"
    expectation: object  # a great_expectations.expectations.Expectation
    show: Callable[[dict], str | None] = lambda row: None  # how an offending row is described
    severity: str = "critical"  # or "warning": reported, does not fail the validation


def validate(
    data_dir: str | Path,
    expected_covid: int = 349,
    expected_noncovid: int = 397,
    *,
    out: str | Path | None = None,
    label: str | None = None,
    near_duplicates: str = "warn",
) -> ValidationResult:
    """Validate the dataset folder ``data_dir``; write ``OUT/result.json`` and ``OUT/data-docs/``.

    ``near_duplicates``: ``warn`` (default) reports a picture filed under both classes or in two
    official splits as a warning, ``fail`` as a failure. Raises CovidctError only when the folder
    cannot be validated at all (not laid out like the dataset, a split list missing, ``OUT`` not
    writable) or for an unknown ``near_duplicates``; failed expectations are reported in the
    result, not raised.
    """
    started = time.monotonic()
    if near_duplicates not in POLICIES:
        raise CovidctError(f"near_duplicates must be one of {', '.join(POLICIES)}, got {near_duplicates!r}")
    root = check_layout(data_dir).absolute()
    out = Path(out).expanduser().absolute() if out is not None else root / "validation"
    manifest = load_manifest(root)
    entries = split_entries(root)
    pairs = near_duplicates_of(manifest)
    images = _with_derived_columns(manifest, pairs)
    severity = "critical" if near_duplicates == "fail" else "warning"
    checks = _checks(expected_covid, expected_noncovid, entries, severity)
    for kind in TWINS:  # Data Docs show both files of each pair, side by side
        notes = pair_notes(root, pairs[pairs["kind"] == kind])
        if notes:
            checks[twin_check(kind)].expectation.notes = notes
    log.info("validating %s: %d images, %d split-list entries", root, len(images), len(entries))
    try:
        with atomic_dir(out) as staging:
            gx_results = _run_gx(checks, {"images": images, "split_lists": entries}, staging / "data-docs")
            failures, warnings, evaluated = _failures(gx_results, checks)
            result = ValidationResult(
                success=not failures,
                data_dir=root,
                label=label or str(root),
                evaluated=evaluated,
                images=len(images),
                failures=failures,
                result_json=out / "result.json",
                data_docs=out / "data-docs" / "index.html",
                seconds=time.monotonic() - started,
                warnings=warnings,
            )
            report = {
                "success": result.success,
                "data_dir": label or str(root),
                "validated_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "expected": {"covid": expected_covid, "noncovid": expected_noncovid},
                "images": len(images),
                "split_list_entries": len(entries),
                # what was validated: lets a later run skip validating the very same data (passed_before)
                "dataset_digest": dataset_digest(root, manifest),
                "covidct_sources": _own_sources_digest(),
                "evaluated_expectations": evaluated,
                "failures": [asdict(f) for f in failures],
                "warnings": [asdict(w) for w in warnings],
                "near_duplicates": {
                    "policy": near_duplicates,
                    "hash": "dhash 16x16",
                    "max_distance_bits": MAX_DISTANCE,
                    "pairs": pairs.to_dict(orient="records"),  # every kind, closest first
                },
                "great_expectations": {batch: r.describe_dict() for batch, r in gx_results.items()},
            }
            (staging / "result.json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    except OSError as exc:  # read-only data folder, disk full
        raise CovidctError(f"cannot write the validation report to {out}: {exc.strerror or exc}") from None
    log.info("%s", result.summary().splitlines()[0])
    return result


def passed_before(
    data_dir: str | Path, expected_covid: int = 349, expected_noncovid: int = 397, near_duplicates: str = "warn"
) -> dict | None:
    """``DIR/validation/result.json`` if it is a pass of exactly these data, expectations and code; else None.

    Validation is a function of the manifest, the split lists and the expectations: when the
    folder still matches its manifest (names and sizes, as ``load_manifest`` checks) and their
    digest equals the one that passed with the same expectations and the same validation code,
    validating again would give the same answer. Cheap: reads the manifest, no image, no GX.
    """
    root = check_layout(data_dir).absolute()
    try:
        previous = json.loads((root / "validation" / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(previous, dict) or previous.get("success") is not True:
        return None
    if previous.get("expected") != {"covid": expected_covid, "noncovid": expected_noncovid}:
        return None
    if (previous.get("near_duplicates") or {}).get("policy") != near_duplicates:
        return None
    if previous.get("covidct_sources") != _own_sources_digest():
        return None
    if previous.get("dataset_digest") != dataset_digest(root, load_manifest(root)):
        return None
    return previous


def _own_sources_digest() -> str:
    """sha256 of the modules that decide a validation (this one, the manifest's, the image decoder, the hash)."""
    import hashlib

    from covidct.data import duplicates, image, manifest

    digest = hashlib.sha256()
    for module in (__file__, manifest.__file__, image.__file__, duplicates.__file__):
        digest.update(Path(module).read_bytes())
    return digest.hexdigest()


def near_duplicates_of(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest's near-duplicate pairs (``covidct.data.duplicates.near_duplicates``), logged by kind."""
    pairs = near_duplicates(manifest)
    counts = pairs["kind"].value_counts().to_dict()
    log.info("near-duplicate pairs (dhash, <= %d of %d bits apart): %s", MAX_DISTANCE, BITS,
             ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "none")  # fmt: skip
    return pairs


def twin_check(kind: str) -> str:
    """The key of the near-duplicate check of ``kind`` (``no_twin_across_classes``, ``no_twin_across_splits``)."""
    return f"no_twin_{kind.replace(' ', '_')}"


def pair_notes(root: Path, pairs: pd.DataFrame) -> list[str] | None:
    """Data Docs notes (the expectation's ``notes``, Markdown) naming each pair's files, with both pictures side by side
    (an inline PNG ``THUMB_HEIGHT`` pixels high; at most ``MAX_NOTED`` pairs)."""
    if pairs.empty:
        return None
    lines = []
    for pair in pairs.head(MAX_NOTED).itertuples(index=False):
        text = f"**{pair.relpath_a}** and **{pair.relpath_b}**: {pair.distance} of {BITS} bits apart ({pair.kind})"
        try:
            buf = io.BytesIO()
            side_by_side(root, pair.relpath_a, pair.relpath_b, THUMB_HEIGHT).save(buf, format="PNG")
            png = base64.b64encode(buf.getvalue()).decode("ascii")
            text += f"\n\n![{pair.relpath_a} and {pair.relpath_b}](data:image/png;base64,{png})"
        except (OSError, ImageDecodeError) as exc:
            log.warning("no thumbnail of %s and %s in the Data Docs: %s", pair.relpath_a, pair.relpath_b, exc)
        lines.append(text)
    if len(pairs) > MAX_NOTED:
        lines.append(f"... and {len(pairs) - MAX_NOTED} more pairs (result.json names them all)")
    return lines


def _with_derived_columns(manifest: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """The manifest plus what the expectations count: one column per class, pixels, and each image's
    closest near-duplicate under the other class (``twin_other_class``) and in another official split
    of its class (``twin_other_split``), described, or null."""
    images = manifest.copy()
    images["covid"] = (images["label"] == 1).astype("int64")
    images["noncovid"] = (images["label"] == 0).astype("int64")
    images["pixels"] = images["width"] * images["height"]
    for kind, (column, _) in TWINS.items():
        twins: dict[str, str] = {}
        for pair in pairs[pairs["kind"] == kind].itertuples():  # closest first: the first one stays
            sides = ((pair.relpath_a, pair.relpath_b, pair.label_b, pair.split_b),
                     (pair.relpath_b, pair.relpath_a, pair.label_a, pair.split_a))  # fmt: skip
            for this, other, label, split in sides:
                where = f"{LABEL_NAMES[label]}, {split or 'in no split list'}"
                twins.setdefault(this, f"same picture as {other}: {where}, {pair.distance} of {BITS} bits apart")
        images[column] = images["relpath"].map(twins).astype("object")
    return images


def _import_gx():
    """great_expectations, with usage statistics off and its INFO chatter out of our logs."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    quiet = logging.getLogger("great_expectations").level == logging.NOTSET
    if quiet:
        logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx

    if quiet:  # this one sets itself to INFO on import
        logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    return gx


def _checks(
    expected_covid: int, expected_noncovid: int, entries: pd.DataFrame, near_duplicates: str = "warning"
) -> dict[str, _Check]:
    """The expectations by key; ``near_duplicates`` is the severity of the two near-duplicate checks."""
    gxe = _import_gx().expectations

    lists_of = entries.groupby("relpath")["list"].agg(list).to_dict()
    twins = f"perceptual hash, <= {MAX_DISTANCE} of {BITS} bits apart"
    # GX's Data Docs show a failed warning like any failed expectation: the description says which it is
    twins = f"({twins}; a warning, does not fail the gate)" if near_duplicates == "warning" else f"({twins})"

    def in_lists(row: dict) -> str:
        return "in " + ", ".join(lists_of.get(row["relpath"], []))

    def value(column: str, fmt: Callable = str) -> Callable[[dict], str]:
        return lambda row: fmt(row.get(column))

    checks = {
        "covid_count": _Check(
            "images",
            gxe.ExpectColumnSumToBeBetween(
                column="covid",
                min_value=expected_covid,
                max_value=expected_covid,
                description=f"expected {expected_covid} COVID images",
            ),
        ),
        "noncovid_count": _Check(
            "images",
            gxe.ExpectColumnSumToBeBetween(
                column="noncovid",
                min_value=expected_noncovid,
                max_value=expected_noncovid,
                description=f"expected {expected_noncovid} non-COVID images",
            ),
        ),
        "labels": _Check(
            "images",
            gxe.ExpectColumnValuesToBeInSet(
                column="label", value_set=[0, 1], description="labels are 0 (non-COVID) or 1 (COVID)"
            ),
            value("label"),
        ),
        "decodes": _Check(
            "images",
            gxe.ExpectColumnValuesToBeNull(column="decode_error", description="every file decodes fully as an image"),
            value("decode_error"),
        ),
        "unique": _Check(
            "images",
            gxe.ExpectColumnValuesToBeUnique(column="sha256", description="no duplicate images (sha256 unique)"),
            value("sha256", lambda sha: f"sha256 {str(sha)[:12]}"),
        ),
        "width": _Check(
            "images",
            gxe.ExpectColumnValuesToBeBetween(
                column="width",
                min_value=MIN_SIDE,
                max_value=MAX_SIDE,
                description=f"image width within {MIN_SIDE}..{MAX_SIDE} px",
            ),
            value("width", lambda w: f"{w} px wide"),
        ),
        "height": _Check(
            "images",
            gxe.ExpectColumnValuesToBeBetween(
                column="height",
                min_value=MIN_SIDE,
                max_value=MAX_SIDE,
                description=f"image height within {MIN_SIDE}..{MAX_SIDE} px",
            ),
            value("height", lambda h: f"{h} px high"),
        ),
        "pixels": _Check(
            "images",
            gxe.ExpectColumnValuesToBeBetween(
                column="pixels",
                min_value=1,
                max_value=MAX_PIXELS,
                description=f"pixels below the decompression-bomb limit ({MAX_PIXELS:,})",
            ),
            value("pixels", lambda p: f"{p} pixels"),
        ),
        "formats": _Check(
            "images",
            gxe.ExpectColumnValuesToBeInSet(
                column="format", value_set=list(FORMATS), description="image format (by content) is PNG or JPEG"
            ),
            value("format"),
        ),
        "in_a_split": _Check(
            "images",
            gxe.ExpectColumnValuesToNotBeNull(column="split", description="every image is in an official split list"),
        ),
        "one_split": _Check(
            "images",
            gxe.ExpectColumnValuesToBeInSet(
                column="split", value_set=list(SPLITS), description="no image is in more than one official split list"
            ),
            value("split", lambda s: f"in {s}"),
        ),
        **{
            twin_check(kind): _Check(
                "images",
                gxe.ExpectColumnValuesToBeNull(column=column, description=f"{what} {twins}", severity=near_duplicates),
                value(column),
                near_duplicates,
            )
            for kind, (column, what) in TWINS.items()
        },
        "listed_exist": _Check(
            "split_lists",
            gxe.ExpectColumnValuesToBeInSet(
                column="present", value_set=[True], description="every file named in Data-split exists"
            ),
            in_lists,
        ),
        "listed_once": _Check(
            "split_lists",
            gxe.ExpectColumnValuesToBeUnique(column="relpath", description="no file is named twice in Data-split"),
            in_lists,
        ),
    }
    for key, check in checks.items():
        check.expectation.meta = {"covidct_check": key}  # the twin checks' notes are added by validate
    return checks


def _run_gx(checks: dict[str, _Check], frames: dict[str, pd.DataFrame], docs_dir: Path):
    """Run every check on its batch in an ephemeral context; build Data Docs into ``docs_dir``."""
    gx = _import_gx()
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        data_docs_sites={
            "covidct": {
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            }
        },
    )
    context = gx.get_context(project_config=config, mode="ephemeral")
    source = context.data_sources.add_pandas("covidct")
    result_format = {"result_format": "COMPLETE", "unexpected_index_column_names": ["relpath"]}
    results = {}
    for batch, frame in frames.items():  # one checkpoint per batch: each has its own DataFrame
        definition = source.add_dataframe_asset(batch).add_batch_definition_whole_dataframe(batch)
        suite = context.suites.add(gx.ExpectationSuite(name=batch))
        for check in checks.values():
            if check.batch == batch:
                suite.add_expectation(check.expectation)
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(name=batch, data=definition, suite=suite)
        )
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"covidct-{batch}",
                validation_definitions=[validation],
                actions=[UpdateDataDocsAction(name="data_docs", site_names=["covidct"])],
                result_format=result_format,
            )
        )
        results[batch] = checkpoint.run(batch_parameters={"dataframe": frame})
    return results


def _failures(results: dict, checks: dict[str, _Check]) -> tuple[list[Failure], list[Failure], int]:
    """The failed expectations (critical, then warnings), in the order of ``checks``, with human
    messages; and how many ran."""
    failed: dict[str, Failure] = {}
    evaluated = 0
    for checkpoint_result in results.values():
        for suite_result in checkpoint_result.run_results.values():
            for outcome in suite_result.results:
                evaluated += 1
                config = outcome.expectation_config
                key = (config.meta or {}).get("covidct_check")
                check = checks.get(key)
                if outcome.success or check is None:
                    continue
                failed[key] = _failure(config, outcome, check)
    critical = [failed[key] for key in checks if key in failed and checks[key].severity == "critical"]
    warnings = [failed[key] for key in checks if key in failed and checks[key].severity != "critical"]
    return critical, warnings, evaluated


def _failure(config, outcome, check: _Check) -> Failure:
    description = config.description or config.type
    result = outcome.result or {}
    error = _exception_message(outcome.exception_info)
    if error:
        message = f"{description}: could not be evaluated ({error})"
        return Failure(config.type, config.kwargs.get("column"), description, message)
    if "observed_value" in result:
        observed = result["observed_value"]
        message = f"{description}, found {observed if observed is not None else 0}"
        return Failure(config.type, config.kwargs.get("column"), description, message)
    rows = result.get("unexpected_index_list") or []
    files = list(dict.fromkeys(str(row.get("relpath")) for row in rows))  # once each, in order
    shown = []
    for row in rows:
        detail = check.show(row)
        item = f"{row.get('relpath')} ({detail})" if detail else str(row.get("relpath"))
        if item not in shown:
            shown.append(item)
    count = len(files) if rows else int(result.get("unexpected_count") or 0)
    more = f", and {len(shown) - SHOW_FILES} more" if len(shown) > SHOW_FILES else ""
    noun = "offending file" if count == 1 else "offending files"
    message = f"{description}: {count} {noun}: {', '.join(shown[:SHOW_FILES])}{more}"
    return Failure(config.type, config.kwargs.get("column"), description, message, files)


def _exception_message(info) -> str | None:
    """The message of an exception GX caught while evaluating an expectation, if any."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    nested = [v for v in info.values() if isinstance(v, dict) and v.get("raised_exception")]
    return str(nested[0].get("exception_message")) if nested else None
