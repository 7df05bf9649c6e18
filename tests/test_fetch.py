"""covidct fetch against an emulated upstream: real HTTP on 127.0.0.1, faults injected there.

Every failure case checks both the message (it names the file, entry or expectation)
and that the previous good copy of DEST is untouched.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import threading
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from covidct.cli import main
from covidct.core.errors import CovidctError, DownloadError
from covidct.data.fetch import STATE_NAME, ArchiveLimits, HttpOptions, fetch
from covidct.data.manifest import COLUMNS, MANIFEST_NAME, read_manifest
from upstream import DEFECTS, Upstream, class_zip, self_signed_tls, symlink_entry, upstream_files, write_files

HTTP = HttpOptions(timeout=(2.0, 5.0), retries=2, backoff_factor=0.01, backoff_max=0.05, progress_min_bytes=0)
SMALL = {"expected_covid": 12, "expected_noncovid": 12}
COVID_ZIP = "Images-processed/CT_COVID.zip"
NONCOVID_ZIP = "Images-processed/CT_NonCOVID.zip"


def snapshot(root: Path) -> dict:
    """Everything that must not change: each file's sha256, the folder's inode and mtime."""
    files = {str(p.relative_to(root)): _sha256(p) for p in root.rglob("*") if p.is_file()}
    st = root.stat()
    return {"files": files, "inode": st.st_ino, "mtime": st.st_mtime_ns}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(dest: Path) -> list[str]:
    """Staging or download folders left beside DEST."""
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))


@pytest.fixture(scope="module")
def good_files(small_dataset) -> dict[str, bytes]:
    return upstream_files(small_dataset)


@pytest.fixture(scope="module")
def server(good_files):
    with Upstream(dict(good_files)) as up:
        yield up


def reset(server: Upstream, good_files: dict[str, bytes]) -> Upstream:
    """Serve the good dataset again, without faults."""
    server.files.clear()
    server.files.update(good_files)
    server.fail_with.clear()
    server.drop_midway.clear()
    server.etags = True
    server.log.clear()
    return server


@pytest.fixture
def upstream(server, good_files) -> Upstream:
    """The module's server, reset to serve the good dataset without faults."""
    return reset(server, good_files)


@pytest.fixture(scope="module")
def good_copy(server, good_files, tmp_path_factory) -> Path:
    """A DEST produced by one successful fetch from the loopback server (copied per test)."""
    dest = tmp_path_factory.mktemp("good") / "COVID-CT"
    fetch(dest, reset(server, good_files).base_url, http=HTTP, **SMALL)
    return dest


@pytest.fixture
def dest(good_copy, tmp_path) -> Path:
    """A previous good copy of DEST, as a fetch left it."""
    copy = tmp_path / "data" / "COVID-CT"
    shutil.copytree(good_copy, copy)
    return copy


def fails(dest: Path, source: str, *fragments: str, **kwargs) -> str:
    """Fetch must fail with a message holding every fragment, leaving DEST exactly as it was."""
    before = snapshot(dest) if dest.exists() else None
    with pytest.raises(CovidctError) as info:
        fetch(dest, source, **{"http": HTTP, **SMALL, **kwargs})
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    if before is None:
        assert not dest.exists()
    else:
        assert snapshot(dest) == before
        assert "was left as it was" in message
    assert leftovers(dest) == []
    return message


# --- happy path ----------------------------------------------------------------------------------


def test_fetch_over_http_lays_out_dataset_with_manifest(upstream, small_dataset, tmp_path):
    dest = tmp_path / "COVID-CT"
    result = fetch(dest, upstream.base_url, http=HTTP, **SMALL)

    assert result.changed and result.counts == {"COVID": 12, "non-COVID": 12}
    assert "fetched 12 COVID + 12 non-COVID images" in result.summary()
    assert str(dest) in result.summary() and "validation passed" in result.summary()
    for folder in ("CT_COVID", "CT_NonCOVID"):  # exactly the source images: no __MACOSX, no .DS_Store
        assert sorted(p.name for p in (dest / folder).iterdir()) == sorted(
            p.name for p in (small_dataset / folder).iterdir()
        )
        for p in (small_dataset / folder).iterdir():
            assert (dest / folder / p.name).read_bytes() == p.read_bytes()
    assert not (dest / "__MACOSX").exists()
    for lst in (small_dataset / "Data-split").rglob("*.txt"):
        assert (dest / lst.relative_to(small_dataset)).read_bytes() == lst.read_bytes()

    manifest = read_manifest(dest / MANIFEST_NAME)
    assert list(manifest.columns) == list(COLUMNS) and len(manifest) == 24
    row = manifest.set_index("relpath").loc["CT_COVID/2020.02.11.20020003-p3-43%0.png"]  # JPEG data named .png
    assert (row["label"], row["format"], row["split"]) == (1, "JPEG", "train")
    assert row["sha256"] == _sha256(small_dataset / row.name)
    assert set(manifest["mode"]) == {"RGBA", "RGB", "L"} and manifest["decode_error"].isna().all()
    assert (manifest["dhash"].str.fullmatch("[0-9a-f]{64}")).all()  # the perceptual hash, 256 bits
    assert set(manifest.loc[manifest["label"] == 0, "split"]) == {"train", "val", "test"}

    assert (dest / "validation" / "result.json").is_file()
    assert (dest / "validation" / "data-docs" / "index.html").is_file()
    assert (dest / STATE_NAME).is_file() and leftovers(dest) == []


def test_refetch_of_unchanged_upstream_is_a_quick_noop(upstream, dest):
    before = snapshot(dest)
    started = time.monotonic()
    result = fetch(dest, upstream.base_url, http=HTTP, **SMALL)
    assert not result.changed and "nothing changed" in result.summary()
    assert time.monotonic() - started < 2
    assert snapshot(dest) == before
    # The good copy came from this server's URL, so every file was asked for conditionally.
    assert upstream.statuses() == [304] * 8


def test_refetch_without_etags_compares_hashes(upstream, dest):
    upstream.etags = False
    before = snapshot(dest)
    result = fetch(dest, upstream.base_url, http=HTTP, **SMALL)
    assert not result.changed
    assert upstream.statuses() == [200] * 8
    assert snapshot(dest) == before


def test_changed_upstream_replaces_dest(upstream, dest, small_dataset, tmp_path):
    changed = shutil.copytree(small_dataset, tmp_path / "v2")
    (changed / "CT_NonCOVID" / "new%0.png").write_bytes(_new_png(seed=7))
    with open(changed / "Data-split/NonCOVID/testCT_NonCOVID.txt", "a") as f:
        f.write("new%0.png\n")
    upstream.files.update(upstream_files(changed))
    result = fetch(dest, upstream.base_url, http=HTTP, expected_covid=12, expected_noncovid=13)
    assert result.changed and result.counts == {"COVID": 12, "non-COVID": 13}
    assert (dest / "CT_NonCOVID" / "new%0.png").is_file()
    assert len(read_manifest(dest / MANIFEST_NAME)) == 25 and leftovers(dest) == []


def _new_png(seed: int) -> bytes:
    from PIL import Image

    img = Image.effect_noise((64, 64), 40 + seed)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_dest_that_no_longer_matches_its_manifest_is_fetched_again(upstream, dest):
    victim = sorted((dest / "CT_COVID").iterdir())[0]
    victim.unlink()
    result = fetch(dest, upstream.base_url, http=HTTP, **SMALL)
    assert result.changed and victim.is_file()


def test_a_manifest_from_before_perceptual_hashes_is_fetched_again_once(upstream, dest, caplog):
    old = read_manifest(dest / MANIFEST_NAME).drop(columns="dhash")
    old.to_parquet(dest / MANIFEST_NAME, index=False)
    result = fetch(dest, upstream.base_url, http=HTTP, **SMALL)
    assert result.changed
    assert "was written by an older covidct, without perceptual hashes); fetching again" in caplog.text
    assert read_manifest(dest / MANIFEST_NAME)["dhash"].notna().all()
    assert not fetch(dest, upstream.base_url, http=HTTP, **SMALL).changed


def test_progress_is_logged_for_large_files(upstream, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="covidct.data.download"):  # where the progress is logged
        fetch(tmp_path / "d", upstream.base_url, http=HTTP, gate=False)
    assert any("CT_COVID.zip: " in m and "%" in m for m in caplog.messages)
    assert any("CT_COVID.zip: downloaded" in m for m in caplog.messages)


def test_upstream_url_can_be_overridden_by_env(upstream, tmp_path, monkeypatch):
    monkeypatch.setenv("COVIDCT_UPSTREAM_URL", upstream.base_url)
    result = fetch(tmp_path / "d", None, http=HTTP, **SMALL)
    assert result.changed and result.source == upstream.base_url
    assert upstream.statuses(COVID_ZIP) == [200]


def test_zips_with_entries_at_the_top_level(upstream, small_dataset, tmp_path):
    upstream.files.update(upstream_files(small_dataset, top_folder=False, macos_litter=False))
    result = fetch(tmp_path / "d", upstream.base_url, http=HTTP, **SMALL)
    assert result.counts == {"COVID": 12, "non-COVID": 12}


# --- HTTP faults ---------------------------------------------------------------------------------


def test_http_500_then_success_is_retried(upstream, tmp_path):
    upstream.fail_with[COVID_ZIP] = [500, 503]
    result = fetch(tmp_path / "d", upstream.base_url, http=HTTP, **SMALL)
    assert result.changed and result.counts == {"COVID": 12, "non-COVID": 12}
    assert upstream.statuses(COVID_ZIP) == [500, 503, 200]


def test_http_500_for_good_fails_cleanly(upstream, dest):
    upstream.fail_with[NONCOVID_ZIP] = [500] * 10
    fails(dest, upstream.base_url, "CT_NonCOVID.zip", "gave up after 2 retries", "too many 500 error responses")
    assert upstream.statuses(NONCOVID_ZIP) == [500, 500, 500]


def test_http_404_names_the_url_and_is_not_retried(upstream, dest):
    del upstream.files["Data-split/NonCOVID/valCT_NonCOVID.txt"]
    fails(dest, upstream.base_url, "Data-split/NonCOVID/valCT_NonCOVID.txt: HTTP 404")
    assert upstream.statuses("Data-split/NonCOVID/valCT_NonCOVID.txt") == [404]
    assert not failure(dest, upstream.base_url).transient


def test_connection_dropped_mid_file_is_retried(upstream, tmp_path):
    upstream.drop_midway[COVID_ZIP] = 1
    result = fetch(tmp_path / "d", upstream.base_url, http=HTTP, **SMALL)
    assert result.changed and upstream.statuses(COVID_ZIP) == [200, 200]


def test_connection_dropped_mid_file_every_time_fails_cleanly(upstream, dest):
    upstream.files[COVID_ZIP] = class_zip(dest, "CT_COVID", macos_litter=False)
    upstream.drop_midway[COVID_ZIP] = 10
    fails(dest, upstream.base_url, "CT_COVID.zip", "the connection kept breaking mid-file", "IncompleteRead")


def test_unreachable_server_fails_cleanly(dest, tmp_path):
    with Upstream({}) as gone:
        url = gone.base_url
    fails(dest, url, "cannot download", "Connection refused")


# --- what is retried: the default policy (the scheduled DAG's), on real sockets ------------------
# Backoff under HttpOptions(): 0, 2, 4, 8, 16 s between the 6 attempts; ~30 s when every retry is used.


def failure(dest: Path, source: str, http: HttpOptions = HTTP) -> DownloadError:
    with pytest.raises(DownloadError) as info:
        fetch(dest, source, http=http, **SMALL)
    return info.value


def test_a_503_then_200_succeeds_under_the_default_policy(upstream, tmp_path):
    upstream.fail_with[COVID_ZIP] = [503]
    result = fetch(tmp_path / "d", upstream.base_url, http=HttpOptions(), **SMALL)
    assert result.changed and upstream.statuses(COVID_ZIP) == [503, 200]


def test_5xx_to_the_end_is_transient(upstream, dest):
    upstream.fail_with[COVID_ZIP] = [503] * 10
    error = failure(dest, upstream.base_url)
    assert error.transient and "gave up after 2 retries" in str(error)


def test_an_unknown_host_name_is_not_retried(dest):
    started = time.monotonic()
    error = failure(dest, "http://covidct.invalid/", http=HttpOptions())
    assert time.monotonic() - started < 10  # 5 retries would back off for ~30 s
    assert "Failed to resolve 'covidct.invalid'" in str(error) and "not retried" in str(error)
    assert not error.transient  # nor retried by Airflow: no retry fixes a name that does not exist


def test_an_untrusted_certificate_is_not_retried(upstream, dest, tmp_path):
    with Upstream(dict(upstream.files), tls=self_signed_tls(tmp_path)) as tls:
        started = time.monotonic()
        error = failure(dest, tls.base_url, http=HttpOptions())
    assert time.monotonic() - started < 10
    assert "CERTIFICATE_VERIFY_FAILED" in str(error) and not error.transient
    assert tls.log == []  # no request ever got through


def test_a_refused_connection_is_retried_briefly_and_is_transient(dest):
    with Upstream({}) as gone:
        url = gone.base_url
    started = time.monotonic()
    error = failure(dest, url, http=HttpOptions())
    took = time.monotonic() - started
    assert 1.5 < took < 10, took  # 2 retries: backoff 0 s, then 2 s; not the ~30 s of the full budget
    assert "Connection refused" in str(error) and "after 2 retries" in str(error) and error.transient


def test_a_server_restarting_on_its_port_is_waited_for(good_files, tmp_path):
    """Refused at first, listening a second later: the refused-connection retries get it."""
    with Upstream({}) as probe:
        port = probe._server.server_address[1]
    started: list[Upstream] = []
    timer = threading.Timer(1.0, lambda: started.append(Upstream(dict(good_files), port=port).__enter__()))
    timer.start()
    try:
        result = fetch(
            tmp_path / "d", f"http://127.0.0.1:{port}/UCSD-AI4H/COVID-CT/master/", http=HttpOptions(), **SMALL
        )
    finally:
        timer.join()
        for server in started:
            server.__exit__(None, None, None)
    assert result.changed and started[0].statuses(COVID_ZIP) == [200]


# --- bad archives --------------------------------------------------------------------------------


def _corrupt_entry_data(good: bytes) -> bytes:
    """The zip with bytes in the middle of its first image's compressed data flipped."""
    info = next(i for i in zipfile.ZipFile(io.BytesIO(good)).infolist() if i.filename.endswith(".png"))
    data = bytearray(good)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    middle = start + info.compress_size // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    return bytes(data)


@pytest.mark.parametrize(
    "corrupt, fragments",
    [
        (lambda good: b"<html>rate limited</html>", ["not a valid zip archive", "looks like an HTML page"]),
        (lambda good: good[: len(good) // 2], ["CT_COVID.zip is not a valid zip archive"]),
        (lambda good: b"version https://git-lfs.github.com/spec/v1\noid sha256:00\n", ["Git LFS pointer"]),
        (_corrupt_entry_data, ["CT_COVID.zip is corrupt: cannot extract 'CT_COVID/"]),
    ],
    ids=["html", "truncated", "lfs-pointer", "bad-entry-data"],
)
def test_corrupt_zip(upstream, dest, corrupt, fragments):
    upstream.files[COVID_ZIP] = corrupt(upstream.files[COVID_ZIP])
    fails(dest, upstream.base_url, *fragments)


@pytest.mark.parametrize(
    "entry, fragment",
    [
        (("../evil.png", b"x"), "refusing entry '../evil.png': '..' in the path (zip-slip)"),
        (("CT_COVID/../../evil.png", b"x"), "'..' in the path (zip-slip)"),
        (("/tmp/evil.png", b"x"), "refusing entry '/tmp/evil.png': absolute path (zip-slip)"),
        (("..\\evil.png", b"x"), "'..' in the path (zip-slip)"),
        (symlink_entry("CT_COVID/link.png", "/etc/passwd"), "entry 'CT_COVID/link.png': it is a symbolic link"),
        (("CT_COVID/sub/deeper.png", b"x"), "unexpected entry 'CT_COVID/sub/deeper.png'"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "backslash", "symlink", "subfolder"],
)
def test_unsafe_zip_entries_are_refused(upstream, dest, small_dataset, tmp_path, entry, fragment):
    upstream.files[COVID_ZIP] = class_zip(small_dataset, "CT_COVID", extra=[entry])
    fails(dest, upstream.base_url, "CT_COVID.zip", fragment)
    assert not list(tmp_path.rglob("evil.png")) and not Path("/tmp/evil.png").exists()


def test_zip_bomb_by_size_is_refused(upstream, dest, small_dataset):
    bomb = ("CT_COVID/bomb.png", b"\0" * (64 * 1024 * 1024))
    upstream.files[COVID_ZIP] = class_zip(small_dataset, "CT_COVID", extra=[bomb])
    assert len(upstream.files[COVID_ZIP]) < 1024 * 1024
    limits = ArchiveLimits(max_bytes=16 * 2**20)
    fails(dest, upstream.base_url, "CT_COVID.zip would extract to", "zip bomb", limits=limits)


def test_zip_bomb_by_entry_count_is_refused(upstream, dest, small_dataset):
    many = [(f"CT_COVID/{i}.png", b"") for i in range(200)]
    upstream.files[COVID_ZIP] = class_zip(small_dataset, "CT_COVID", extra=many)
    fails(dest, upstream.base_url, "entries, over the limit of 100", limits=ArchiveLimits(max_entries=100))


def test_duplicate_zip_entries_are_refused(upstream, dest, small_dataset):
    name = sorted(os.listdir(small_dataset / "CT_COVID"))[0]
    twice = (f"CT_COVID/{name}", b"another content")
    with pytest.warns(UserWarning, match="Duplicate name"):
        upstream.files[COVID_ZIP] = class_zip(small_dataset, "CT_COVID", extra=[twice])
    fails(dest, upstream.base_url, f"holds CT_COVID/{name} twice")


# --- bad data: the validation gate ---------------------------------------------------------------


@pytest.mark.parametrize("defect", list(DEFECTS), ids=list(DEFECTS))
def test_bad_dataset_fails_validation_and_is_not_published(upstream, dest, small_dataset, tmp_path, defect):
    broken = shutil.copytree(small_dataset, tmp_path / "broken")
    fragments = DEFECTS[defect](broken)
    upstream.files.update(upstream_files(broken))
    message = fails(dest, upstream.base_url, "failed validation and was not published", *fragments)
    assert message.count("\n  - ") >= 1


def test_first_fetch_of_bad_data_writes_nothing(upstream, small_dataset, tmp_path):
    broken = shutil.copytree(small_dataset, tmp_path / "broken")
    fragments = DEFECTS["zero-byte file"](broken)
    upstream.files.update(upstream_files(broken))
    message = fails(tmp_path / "new" / "COVID-CT", upstream.base_url, *fragments)
    assert "nothing was written to" in message


# --- local sources, refusals, CLI ----------------------------------------------------------------


def test_fetch_from_local_dataset_folder(small_dataset, tmp_path):
    dest = tmp_path / "COVID-CT"
    result = fetch(dest, small_dataset, **SMALL)
    assert result.changed and result.counts == {"COVID": 12, "non-COVID": 12}
    assert result.source == str(small_dataset)
    before = snapshot(dest)
    again = fetch(dest, small_dataset, **SMALL)
    assert not again.changed and snapshot(dest) == before


def test_a_symbolic_link_out_of_the_source_folder_is_refused_and_nothing_published(small_dataset, dest, tmp_path):
    """The operator allows a folder, not what its links lead to: a class folder or a split list linked from
    elsewhere is refused (image files that are links already were)."""

    elsewhere = shutil.copytree(small_dataset, tmp_path / "elsewhere")
    linked_folder = shutil.copytree(small_dataset, tmp_path / "linked-folder")
    shutil.rmtree(linked_folder / "CT_COVID")
    (linked_folder / "CT_COVID").symlink_to(elsewhere / "CT_COVID", target_is_directory=True)
    fails(dest, str(linked_folder), "CT_COVID/", "is a symbolic link that leads outside the source folder")
    linked_list = shutil.copytree(small_dataset, tmp_path / "linked-list")
    listed = next(p for p in linked_list.rglob("*.txt") if p.is_file())
    listed.unlink()
    listed.symlink_to(elsewhere / listed.relative_to(linked_list))
    fails(dest, str(linked_list), "is a symbolic link that leads outside the source folder")
    inner = shutil.copytree(small_dataset, tmp_path / "inner-link")  # a link that stays inside is fine
    alias = next(p for p in inner.rglob("*.txt") if p.is_file())
    shutil.move(alias, inner / "lists.txt")
    alias.symlink_to(inner / "lists.txt")
    assert fetch(tmp_path / "ok", inner, **SMALL).changed


def test_local_dataset_folder_with_a_bad_image_is_not_published(small_dataset, dest, tmp_path):
    broken = shutil.copytree(small_dataset, tmp_path / "broken")
    fragments = DEFECTS["extra truncated image"](broken)
    fails(dest, str(broken), *fragments)


@pytest.mark.parametrize("layout", ["clone", "flat"])
def test_fetch_from_folder_of_zips(good_files, tmp_path, layout):
    files = dict(good_files)
    if layout == "flat":  # CT_COVID.zip, CT_NonCOVID.zip and Data-split/ side by side
        files = {name.removeprefix("Images-processed/"): data for name, data in files.items()}
    root = write_files(files, tmp_path / "mirror")
    result = fetch(tmp_path / "COVID-CT", root, **SMALL)
    assert result.counts == {"COVID": 12, "non-COVID": 12}


def test_fetch_from_folder_of_zips_with_a_corrupt_zip(good_files, dest, tmp_path):
    root = write_files({**good_files, NONCOVID_ZIP: b"PK\x03\x04 not really"}, tmp_path / "mirror")
    fails(dest, str(root), "Images-processed/CT_NonCOVID.zip is not a valid zip archive")


def test_unknown_sources_are_refused(tmp_path):
    with pytest.raises(CovidctError, match="neither an http"):
        fetch(tmp_path / "d", tmp_path / "nowhere")
    with pytest.raises(CovidctError, match="holds neither CT_COVID/"):
        fetch(tmp_path / "d", tmp_path)
    with pytest.raises(CovidctError, match="unsupported source ftp://"):
        fetch(tmp_path / "d", "ftp://example.org/COVID-CT")
    assert not (tmp_path / "d").exists()


def test_refuses_to_replace_a_folder_it_did_not_write(small_dataset, tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(CovidctError, match="was not written by `covidct fetch`"):
        fetch(precious, small_dataset, **SMALL)
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_cli_fetch(upstream, tmp_path, capsys):
    dest = tmp_path / "COVID-CT"
    args = ["fetch", "--dest", str(dest), "--source", upstream.base_url, "--expect-covid", "12"]
    assert main([*args, "--expect-noncovid", "12"]) == 0
    assert "fetched 12 COVID + 12 non-COVID images" in capsys.readouterr().out
    assert main([*args, "--expect-noncovid", "12"]) == 0
    assert "nothing changed" in capsys.readouterr().out
    assert main([*args, "--expect-noncovid", "13"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "expected 13 non-COVID images, found 12" in err


# --- the real dataset (COVIDCT_DATA_DIR) ---------------------------------------------------------


@pytest.mark.slow
def test_real_fetch_from_folder_then_validate(real_data_dir, tmp_path):
    if real_data_dir is None:
        pytest.skip("set COVIDCT_DATA_DIR to the real COVID-CT copy")
    from covidct.data.validate import validate

    dest = tmp_path / "COVID-CT"
    started = time.monotonic()
    result = fetch(dest, real_data_dir)
    fetch_s = time.monotonic() - started
    assert result.counts == {"COVID": 349, "non-COVID": 397}
    checked = validate(dest)
    assert checked.success, checked.summary()
    # the two pictures filed under both classes (COVID test, non-COVID train): a warning, not a failure
    [warning] = checked.warnings
    assert sorted(warning.files) == ["CT_COVID/kjr-21-e24-p5-29.png", "CT_COVID/kjr-21-e24-p5-31.png",
                                     "CT_NonCOVID/71%0.jpg", "CT_NonCOVID/71%1.jpg"]  # fmt: skip
    pairs = json.loads(checked.result_json.read_text())["near_duplicates"]["pairs"]
    assert [(p["relpath_a"], p["relpath_b"], p["distance"]) for p in pairs if p["kind"] != "within a split"] == [
        ("CT_COVID/kjr-21-e24-p5-29.png", "CT_NonCOVID/71%0.jpg", 8),
        ("CT_COVID/kjr-21-e24-p5-31.png", "CT_NonCOVID/71%1.jpg", 19),
    ]
    print(f"\nreal data: fetch from folder {fetch_s:.1f} s, validate {checked.seconds:.1f} s")

    ours = read_manifest(dest / MANIFEST_NAME).set_index("relpath")
    theirs = pd.read_csv(real_data_dir / "MANIFEST.tsv", sep="\t", keep_default_na=False).set_index("relpath")
    assert sorted(ours.index) == sorted(theirs.index)
    theirs = theirs.loc[ours.index]
    assert (ours["sha256"] == theirs["sha256"]).all() and (ours["bytes"] == theirs["bytes"]).all()
    assert (ours["width"] == theirs["width"]).all() and (ours["height"] == theirs["height"]).all()
    assert (ours["format"] == theirs["format"]).all() and (ours["mode"] == theirs["mode"]).all()
    assert (ours["split"] == theirs["split"]).all()
    assert (ours["label"] == (theirs["class"] == "COVID").astype(int)).all()
    assert int((ours["format"] == "JPEG").sum()) == 236

    before = snapshot(dest)
    assert not fetch(dest, real_data_dir).changed and snapshot(dest) == before


@pytest.mark.slow
def test_real_fetch_over_loopback_zips(real_data_dir, tmp_path):
    if real_data_dir is None:
        pytest.skip("set COVIDCT_DATA_DIR to the real COVID-CT copy")
    files = upstream_files(real_data_dir)
    with Upstream(files) as up:
        dest = tmp_path / "COVID-CT"
        started = time.monotonic()
        result = fetch(dest, up.base_url, http=HTTP)
        fetch_s = time.monotonic() - started
        assert result.changed and result.counts == {"COVID": 349, "non-COVID": 397}
        assert len(list((dest / "CT_COVID").iterdir())) == 349

        started = time.monotonic()
        assert not fetch(dest, up.base_url, http=HTTP).changed
        noop_s = time.monotonic() - started
        print(f"\nreal data over loopback zips: fetch {fetch_s:.1f} s, no-op re-fetch {noop_s:.2f} s")

        broken = shutil.copytree(real_data_dir, tmp_path / "broken", copy_function=shutil.copyfile)
        fragments = DEFECTS["missing image"](broken)  # 348 COVID images
        assert "expected 349 COVID images, found 348" in fragments
        up.files[COVID_ZIP] = class_zip(broken, "CT_COVID")
        fails(dest, up.base_url, *fragments, expected_covid=349, expected_noncovid=397)
