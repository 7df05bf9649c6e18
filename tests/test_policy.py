"""The operator's allowlist for trigger params (covidct.orchestration.policy), the param schema, the job's re-check,
and redirects over real loopback HTTP on two addresses (127.0.0.1 allowed, 127.0.0.2 not)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from airflow.sdk.exceptions import AirflowFailException

from conftest import ROOT
from covidct.core.errors import CovidctError
from covidct.orchestration import pipeline
from covidct.orchestration.policy import SOURCES_ENV, WEIGHTS_DIRS_ENV, Policy, PolicyError, parse_url
from upstream import PREFIX, Upstream, upstream_files

MIRROR = "http://mirror.example:8000/covid/"


@pytest.fixture
def site(tmp_path):
    allowed, weights, outside = tmp_path / "allowed", tmp_path / "weights", tmp_path / "outside"
    for folder in (allowed / "COVID-CT", weights, outside / "COVID-CT"):
        folder.mkdir(parents=True)
    (weights / "mine.h5").write_bytes(b"w")
    (outside / "secret.h5").write_bytes(b"s")
    (allowed / "out").symlink_to(outside / "COVID-CT")
    (allowed / "in").symlink_to(allowed / "COVID-CT")
    (weights / "out.h5").symlink_to(outside / "secret.h5")
    (tmp_path / "allowed-link").symlink_to(allowed)  # the operator's entry may itself be a link
    return {"root": tmp_path, "allowed": allowed, "weights": weights, "outside": outside}


def policy(**env) -> Policy:
    return Policy.from_env(env)


# --- URLs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, rebuilt",
    [
        (MIRROR, MIRROR),
        ("http://mirror.example:8000/covid", "http://mirror.example:8000/covid"),
        ("http://mirror.example:8000/covid/sub/", "http://mirror.example:8000/covid/sub/"),
        ("HTTP://MIRROR.Example:8000/covid/", MIRROR),  # scheme and host case
        ("http://mirror.example.:8000/covid/", MIRROR),  # trailing dot of the host
        ("https://raw.githubusercontent.com/UCSD-AI4H/COVID-CT/master/", None),  # upstream: implicit
        ("https://raw.githubusercontent.com:443/UCSD-AI4H/COVID-CT/master/", None),  # the default port spelt out
    ],
)
def test_allowed_urls(url, rebuilt):
    got = policy(**{SOURCES_ENV: MIRROR}).check_source(url)
    assert got == (rebuilt or got) and got.startswith(("http://", "https://"))


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("file:///etc/passwd", "only http:// and https:// URLs"),
        ("ftp://mirror.example:8000/covid/", "only http:// and https:// URLs"),
        ("http://evil.example:8000/covid/", "host evil.example"),
        ("http://mirror.example/covid/", "port 80"),  # another port of the allowed host
        ("http://mirror.example:8001/covid/", "port 8001"),
        ("https://mirror.example:8000/covid/", "is not an allowed data source"),  # another scheme
        ("http://mirror.example:8000/other/", "is not an allowed data source"),  # outside the path
        ("http://mirror.example:8000/covidx/", "is not an allowed data source"),  # a prefix is not a folder
        ("http://mirror.example:8000@evil.example/covid/", "user names and passwords"),
        ("http://mirror.example:8000\\@evil.example/covid/", "backslashes"),
        ("http://evil.example#@mirror.example:8000/covid/", "no query or fragment"),
        ("http://mirror.example:8000/covid/../admin/", "'..' segments"),
        ("http://mirror.example:8000/covid/%2e%2e/admin/", "encoded dots"),
        ("http://mirror.example:8000/covid/?x=http://evil", "no query or fragment"),
        ("http://mirror.example :8000/covid/", "whitespace"),
        ("http://mirror.example:99999/covid/", "not a valid URL"),
        ("http://mirr_or.example:8000/covid/", "not a valid host name"),
        ("https://raw.githubusercontent.com/someone-else/repo/master/", "is not an allowed data source"),
        ("http://127.0.0.1:8000/covid/", "host 127.0.0.1"),
        ("http://[::1]:8000/covid/", "host ::1"),
    ],
)
def test_refused_urls_name_the_setting(url, fragment):
    with pytest.raises(PolicyError) as info:
        policy(**{SOURCES_ENV: MIRROR}).check_source(url)
    assert fragment in str(info.value) and SOURCES_ENV in str(info.value)


def test_the_url_handed_on_is_rebuilt_from_the_parsed_parts():
    origin = parse_url("HTTP://Mirror.Example.:80/covid/")
    assert (origin.scheme, origin.host, origin.port, origin.path) == ("http", "mirror.example", 80, "/covid/")
    assert origin.url == "http://mirror.example/covid/"


def test_a_bad_allowlist_entry_is_an_error_naming_the_setting():
    with pytest.raises(PolicyError, match=SOURCES_ENV):
        policy(**{SOURCES_ENV: "http://user@mirror.example/"})
    with pytest.raises(PolicyError, match=SOURCES_ENV):
        policy(**{SOURCES_ENV: "relative/folder"})


# --- folders and weights -------------------------------------------------------------------------


def test_folders_are_resolved_before_the_check(site):
    allowed, outside = site["allowed"], site["outside"]
    p = policy(**{SOURCES_ENV: f"{site['root']}/allowed-link, {MIRROR}"})
    assert p.check_source(str(allowed / "COVID-CT")) == str(allowed / "COVID-CT")
    assert p.check_source(str(allowed / "in")) == str(allowed / "COVID-CT")  # a link that stays inside
    assert p.check_source(str(site["root"] / "allowed-link" / "COVID-CT")) == str(allowed / "COVID-CT")
    for bad, resolved in (
        (allowed / "out", outside / "COVID-CT"),  # a link pointing out
        (f"{allowed}/../outside/COVID-CT", outside / "COVID-CT"),  # '..'
        (outside / "COVID-CT", outside / "COVID-CT"),
        ("/etc", "/etc"),
    ):
        with pytest.raises(PolicyError) as info:
            p.check_source(str(bad))
        assert f"resolved: {resolved}" in str(info.value) and SOURCES_ENV in str(info.value)
    with pytest.raises(PolicyError, match="give an absolute path"):
        p.check_source("allowed/COVID-CT")


def test_the_operators_own_data_source_and_upstream_are_allowed(site):
    p = policy(COVIDCT_DATA_SOURCE=str(site["outside"] / "COVID-CT"))
    assert p.check_source(str(site["outside"] / "COVID-CT")) == str(site["outside"] / "COVID-CT")
    assert p.check_source(None) is None and p.check_source("upstream") is None and p.check_source("") is None
    with pytest.raises(PolicyError):
        p.check_source(str(site["allowed"]))  # nothing else
    mirror = policy(COVIDCT_UPSTREAM_URL=MIRROR)
    assert mirror.check_source(MIRROR + "sub/") == MIRROR + "sub/"
    with pytest.raises(PolicyError):
        mirror.check_source("https://raw.githubusercontent.com/UCSD-AI4H/COVID-CT/master/")


def test_weights_files_only_from_the_allowed_folders(site):
    weights, outside = site["weights"], site["outside"]
    for env in ({"COVIDCT_WEIGHTS_DIR": str(weights)}, {WEIGHTS_DIRS_ENV: f"/nonexistent,{weights}"}):
        p = policy(**env)
        assert p.check_weights("imagenet") == "imagenet" and p.check_weights("none") == "none"
        assert p.check_weights(str(weights / "mine.h5")) == str(weights / "mine.h5")
        for bad, resolved in (
            (outside / "secret.h5", outside / "secret.h5"),
            (weights / "out.h5", outside / "secret.h5"),  # a link pointing out
            (f"{weights}/../outside/secret.h5", outside / "secret.h5"),
            ("/etc/passwd", "/etc/passwd"),
        ):
            with pytest.raises(PolicyError) as info:
                p.check_weights(str(bad))
            message = str(info.value)
            assert (
                f"resolved: {resolved}" in message and WEIGHTS_DIRS_ENV in message and "COVIDCT_WEIGHTS_DIR" in message
            )
    with pytest.raises(PolicyError, match="allowed folders: none"):
        policy().check_weights(str(weights / "mine.h5"))  # safe by default: no weights folder, no files


def test_a_star_trusts_every_ui_user(site):
    p = policy(**{SOURCES_ENV: "*", WEIGHTS_DIRS_ENV: "*"})
    assert p.check_source("http://anything.example/x/") == "http://anything.example/x/"
    assert p.check_source("/etc") == "/etc"
    assert p.check_weights(str(site["outside"] / "secret.h5")) == str(site["outside"] / "secret.h5")


def test_check_params_fails_the_task_without_retries(site, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    monkeypatch.setenv(SOURCES_ENV, str(site["allowed"]))
    monkeypatch.setenv("COVIDCT_WEIGHTS_DIR", str(site["weights"]))
    monkeypatch.delenv(WEIGHTS_DIRS_ENV, raising=False)
    monkeypatch.delenv("COVIDCT_DATA_SOURCE", raising=False)
    pipeline.check_params(
        {"data_source": str(site["allowed"] / "COVID-CT"), "weights": str(site["weights"] / "mine.h5")}
    )
    pipeline.check_params({"data_source": None, "weights": "imagenet"})
    for bad in ({"data_source": "/etc", "weights": "none"}, {"data_source": None, "weights": "/etc/passwd"}):
        with pytest.raises(AirflowFailException, match="refused trigger params"):
            pipeline.check_params(bad)


# --- the DAG's param schema ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def params(dag):
    return dag.params


@pytest.mark.parametrize(
    "good",
    [
        {"data_source": None},
        {"data_source": ""},
        {"data_source": "upstream"},
        {"data_source": "https://mirror.example:8443/covid-ct/master/"},
        {"data_source": "/srv/data/COVID-CT"},
        {"weights": "none"},
        {"weights": "/opt/covidct/weights/vgg16_notop.h5"},
    ],
)
def test_param_schema_accepts(params, good):
    candidate = copy.deepcopy(params)
    candidate.update(good)
    candidate.validate()


@pytest.mark.parametrize(
    "bad",
    [
        {"data_source": "file:///etc"},
        {"data_source": "/srv/data/../../etc"},
        {"data_source": "/srv/data/.."},
        {"data_source": "relative/folder"},
        {"data_source": "http://mirror.example@evil.example/"},
        {"data_source": "http://mirror.example/\nX-Header: 1"},
        {"data_source": "--conf=spark.driver.extraJavaOptions=-Dx"},
        {"data_source": "/" + "a" * 1100},
        {"data_source": 7},
        {"weights": "/opt/weights/../../etc/passwd"},
        {"weights": "weights.h5"},
        {"weights": "--out=/tmp/elsewhere"},
        {"weights": "/opt/weights/a b.h5"},
        {"weights": ""},
        {"weights": None},
    ],
)
def test_param_schema_refuses(params, bad):
    from airflow.sdk.exceptions import ParamValidationError

    candidate = copy.deepcopy(params)
    with pytest.raises(ParamValidationError):
        candidate.update(bad)
        candidate.validate()


# --- the job checks again; the CLI stays free ----------------------------------------------------


def _job(args, env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "transfer_learning.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


@pytest.mark.slow
def test_the_job_refuses_what_the_schema_and_the_allowlist_refuse(site, small_dataset, tmp_path):
    env = {"COVIDCT_WEIGHTS_DIR": str(site["weights"]), WEIGHTS_DIRS_ENV: ""}
    base = ["--data", str(small_dataset), "--backbone", "VGG16", "--out", str(tmp_path / "out")]
    for weights, fragment in (
        (str(site["weights"] / "out.h5"), f"resolved: {site['outside'] / 'secret.h5'}"),
        ("/etc/passwd", WEIGHTS_DIRS_ENV),
        (f"{site['weights']}/../outside/secret.h5", "it must match"),
        ("secret.h5", "it must match"),
    ):
        result = _job([*base, "--weights", weights], env)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "error: " in result.stderr and fragment in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_the_cli_run_by_the_operator_is_not_confined(site, small_dataset, tmp_path, capsys):
    from covidct.cli import main

    missing = site["outside"] / "missing.h5"  # outside every allowed folder: the CLI does not care
    code = main(["train", "--data", str(small_dataset), "--backbone", "VGG16", "--out", str(tmp_path / "o"),
                 "--weights", str(missing)])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert f"weights file {missing} does not exist" in err and "allow" not in err


# --- redirects -----------------------------------------------------------------------------------


class Redirector:
    """A loopback server answering every GET with a 302 to ``target`` + the same path."""

    def __init__(self, target: str, host: str = "127.0.0.1"):
        self.target, self.hits = target.rstrip("/"), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.hits.append(self.path)
                self.send_response(302)
                self.send_header("Location", outer.target + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def origin(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def chain(small_dataset):
    """first (127.0.0.1) -> second (127.0.0.1, another port) -> the data on 127.0.0.2."""
    with Upstream(upstream_files(small_dataset), host="127.0.0.2") as data:
        origin = data.base_url[: -len(PREFIX)]
        with Redirector(origin) as second, Redirector(second.origin) as first:
            yield {"data": data, "second": second, "first": first, "url": first.origin + PREFIX}


def _dag_fetch(chain, monkeypatch, tmp_path, allowed: list[str]):
    monkeypatch.setenv("COVIDCT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(SOURCES_ENV, ",".join(allowed))
    monkeypatch.delenv("COVIDCT_DATA_SOURCE", raising=False)
    for server in ("data", "second", "first"):
        (chain[server].log if server == "data" else chain[server].hits).clear()
    return pipeline.fetch_dataset(chain["url"], 12, 12)


def test_a_redirect_to_a_host_not_allowed_is_refused_at_that_hop(chain, monkeypatch, tmp_path):
    first, second = chain["first"].origin, chain["second"].origin
    with pytest.raises(AirflowFailException) as info:  # a refused redirect is not retried
        _dag_fetch(chain, monkeypatch, tmp_path, [first + "/", second + "/"])
    assert isinstance(info.value.__cause__, CovidctError)
    message = str(info.value)
    assert f"refusing the redirect from {second}{PREFIX}" in message
    assert "to http://127.0.0.2:" in message and "host 127.0.0.2" in message and SOURCES_ENV in message
    assert chain["first"].hits and chain["second"].hits  # the allowed hops were followed ...
    assert chain["data"].log == []  # ... the disallowed host never saw a request
    assert not (tmp_path / "home" / "data" / "COVID-CT").exists()
    assert not [p for p in (tmp_path / "home" / "data").iterdir()]  # no staging, no download, no lock left


def test_a_redirect_to_the_first_hop_only_allowed_is_refused_too(chain, monkeypatch, tmp_path):
    with pytest.raises(AirflowFailException, match=f"refusing the redirect from {chain['first'].origin}"):
        _dag_fetch(chain, monkeypatch, tmp_path, [chain["first"].origin + "/"])
    assert chain["second"].hits == [] and chain["data"].log == []


@pytest.mark.slow
def test_redirects_between_allowed_hosts_are_followed(chain, monkeypatch, tmp_path):
    origins = [chain[s].origin + "/" for s in ("first", "second")] + [chain["data"].base_url]
    data_dir = _dag_fetch(chain, monkeypatch, tmp_path, origins)
    assert (tmp_path / "home" / "data" / "COVID-CT" / "manifest.parquet").is_file()
    assert data_dir == str(tmp_path / "home" / "data" / "COVID-CT")
    assert chain["data"].statuses() and set(chain["data"].statuses()) == {200}


def test_the_cli_follows_redirects_freely(chain, tmp_path, capsys):
    from covidct.cli import main

    code = main(["fetch", "--dest", str(tmp_path / "COVID-CT"), "--source", chain["url"],
                 "--expect-covid", "12", "--expect-noncovid", "12"])  # fmt: skip
    assert code == 0, capsys.readouterr().err[-2000:]
    assert (tmp_path / "COVID-CT" / "manifest.parquet").is_file()


def test_make_run_refuses_a_param_outside_the_allowlist_in_seconds(site, tmp_path):
    env = {**os.environ, "COVIDCT_HOME": str(tmp_path / "home"), "AIRFLOW_HOME": str(tmp_path / "af"),
           "COVIDCT_WEIGHTS_DIR": str(site["weights"]), "COVIDCT_DAG_CONF": '{"weights": "/etc/passwd"}'}  # fmt: skip
    env.pop(WEIGHTS_DIRS_ENV, None)
    result = subprocess.run([sys.executable, "-m", "covidct.orchestration.local", "run"], capture_output=True,
                            text=True, env=env, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: weights file '/etc/passwd'" in result.stderr and WEIGHTS_DIRS_ENV in result.stderr
    assert not (tmp_path / "af").exists() and not (tmp_path / "home").exists()
