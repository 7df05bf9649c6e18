"""`make ui`: a really running Airflow (`airflow standalone`), one for the whole module.

`python -m covidct.orchestration.local ui` (api-server on a free port, scheduler, dag-processor,
triggerer) runs with an isolated AIRFLOW_HOME and COVIDCT_HOME in tmp and an operator
allowlist. Its api-server answers; bad trigger params are refused through its REST API: with
HTTP 400 and no run (the param schema), or with a run whose first task fails at once naming
the setting to change (the allowlist); either way nothing is written under the runs and data
folders, and the non-allowlisted host never sees a request. Last, Ctrl-C stops every component.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from support.airflow import processes_of_airflow_home
from support.browser import chromium, log_in, open_trigger_form
from support.net import free_port
from upstream import Upstream, upstream_files

DAG_ID = "covid_ct_transfer_learning"
pytestmark = pytest.mark.slow


class Api:
    """A tiny client of Airflow's REST API (a JWT from /auth/token, JSON in and out)."""

    def __init__(self, base: str, token: str):
        self.base, self.token = base, token

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.base + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {self.token}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def runs(self) -> list[dict]:
        status, body = self.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns?limit=100")
        assert status == 200, body
        return body["dag_runs"]

    def trigger(self, conf: dict) -> tuple[int, dict]:
        return self.call("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf})


@pytest.fixture(scope="module")
def site(small_dataset, tmp_path_factory):
    """Folders of a deployment: allowed ones, outside ones, and symbolic links pointing out."""
    root = tmp_path_factory.mktemp("site")
    allowed, weights, outside = root / "allowed", root / "weights", root / "outside"
    shutil.copytree(small_dataset, allowed / "COVID-CT")
    shutil.copytree(small_dataset, outside / "COVID-CT")
    weights.mkdir()
    (weights / "mine.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    (outside / "secret.h5").write_bytes(b"not for the workers")
    (allowed / "link").symlink_to(outside / "COVID-CT")  # a folder link pointing out
    (weights / "link.h5").symlink_to(outside / "secret.h5")  # a file link pointing out
    return {"root": root, "allowed": allowed, "weights": weights, "outside": outside}


@pytest.fixture(scope="module")
def evil(small_dataset):
    """A mirror on another loopback host (127.0.0.2) that the operator did not allow."""
    with Upstream(upstream_files(small_dataset), host="127.0.0.2") as up:
        yield up


@pytest.fixture(scope="module")
def airflow(site, tmp_path_factory):
    """`python -m covidct.orchestration.local ui` (airflow standalone) on a free port; stopped with Ctrl-C."""
    tmp = tmp_path_factory.mktemp("stack")
    port = free_port()
    env = {
        **os.environ,
        "COVIDCT_HOME": str(tmp / "home"),
        "AIRFLOW_HOME": str(tmp / "af"),
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{port}/execution/",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",  # only our manual runs
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        # The operator's allowlist.
        "COVIDCT_ALLOWED_SOURCES": str(site["allowed"]),
        "COVIDCT_WEIGHTS_DIR": str(site["weights"]),
        "COVIDCT_UPSTREAM_URL": "http://127.0.0.1:9/",  # no internet: the default source fails at once
    }
    for key in ("COVIDCT_DATA_SOURCE", "COVIDCT_ALLOWED_WEIGHTS_DIRS"):
        env.pop(key, None)
    log_file = tmp / "standalone.log"
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "covidct.orchestration.local", "ui"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        base = f"http://127.0.0.1:{port}"
        passwords = tmp / "af" / "simple_auth_manager_passwords.json.generated"
        deadline, token = time.monotonic() + 300, None
        while time.monotonic() < deadline and token is None:
            time.sleep(2)
            assert proc.poll() is None, log_file.read_text()[-3000:]
            try:
                password = json.loads(passwords.read_text())["admin"]
                request = urllib.request.Request(
                    f"{base}/auth/token",
                    data=json.dumps({"username": "admin", "password": password}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=5) as response:
                    token = json.loads(response.read())["access_token"]
            except (OSError, ValueError, KeyError):
                continue
        assert token, "the api-server never answered:\n" + log_file.read_text()[-3000:]
        api = Api(base, token)
        while time.monotonic() < deadline:  # the dag-processor has to parse the DAG first
            status, body = api.call("GET", f"/api/v2/dags/{DAG_ID}")
            if status == 200 and not body.get("is_paused"):
                break
            time.sleep(2)
        else:
            pytest.fail("the DAG never appeared:\n" + log_file.read_text()[-3000:])
        yield {"api": api, "home": tmp / "home", "log": log_file, "base": base, "stop": lambda: ctrl_c(proc),
               "airflow_home": tmp / "af"}  # fmt: skip
    finally:
        ctrl_c(proc)
    # No process of this Airflow home is left running.
    left = processes_of_airflow_home(tmp / "af")
    assert not left, f"processes left running: {left}"


def ctrl_c(proc: subprocess.Popen) -> int:
    """Ctrl-C in the terminal (SIGINT to the process group), as a user stops `make ui`; its exit status."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return proc.returncode


def test_make_ui_serves_the_real_airflow_api(airflow):
    with urllib.request.urlopen(f"{airflow['base']}/api/v2/version", timeout=10) as response:
        assert '"3.3.2"' in response.read().decode()


def _nothing_written(home: Path) -> None:
    assert not (home / "runs").exists(), sorted(str(p) for p in (home / "runs").rglob("*"))
    assert not (home / "data").exists(), sorted(str(p) for p in (home / "data").rglob("*"))


# (param, value given site and evil) -> (what the 400 must mention)
REJECTED_BY_SCHEMA = {
    "file-url source": (lambda s, e: {"data_source": "file:///etc"}, "data_source"),
    "dotdot source": (lambda s, e: {"data_source": f"{s['allowed']}/../outside/COVID-CT"}, "data_source"),
    "dotdot weights": (lambda s, e: {"weights": f"{s['weights']}/../outside/secret.h5"}, "weights"),
    "userinfo url": (
        lambda s, e: {"data_source": f"http://127.0.0.1:9@127.0.0.2:{e.base_url.split(':')[2]}"},
        "data_source",
    ),
    "relative weights": (lambda s, e: {"weights": "secret.h5"}, "weights"),
}

# (param, value) -> fragments the failed task's log must hold
REFUSED_BY_ALLOWLIST = {
    "host not allowed": (
        lambda s, e: {"data_source": e.base_url},
        ["is not an allowed data source", "host 127.0.0.2", "COVIDCT_ALLOWED_SOURCES"],
    ),
    "weights outside": (
        lambda s, e: {"weights": f"{s['outside']}/secret.h5"},
        ["is not inside a folder the operator allows", "COVIDCT_ALLOWED_WEIGHTS_DIRS"],
    ),
    "source symlink out": (
        lambda s, e: {"data_source": f"{s['allowed']}/link"},
        ["resolved: {outside}/COVID-CT", "COVIDCT_ALLOWED_SOURCES"],
    ),
    "weights symlink out": (
        lambda s, e: {"weights": f"{s['weights']}/link.h5"},
        ["resolved: {outside}/secret.h5", "COVIDCT_ALLOWED_WEIGHTS_DIRS"],
    ),
}


def test_the_trigger_form_offers_the_lists_as_multi_selects(airflow, tmp_path):
    """In a real browser: backbones and splits are multi-selects of their allowed values (with the defaults
    chosen), not free-text arrays; weights offers its two words. Screenshot: the test's tmp_path."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    passwords = airflow["airflow_home"] / "simple_auth_manager_passwords.json.generated"
    with chromium() as browser:
        wait = WebDriverWait(browser, 60)
        log_in(browser, f"{airflow['base']}/dags/{DAG_ID}", "admin", json.loads(passwords.read_text())["admin"], wait)
        form, _ = open_trigger_form(browser, wait)
        browser.save_screenshot(str(tmp_path / "trigger-form.png"))

        def chosen(name: str) -> list[str]:  # the multi-select keeps one hidden input per chosen value
            assert not form.find_elements(By.CSS_SELECTOR, f"textarea[name=element_{name}]"), f"{name}: free text"
            inputs = form.find_elements(By.CSS_SELECTOR, f"input[name=element_{name}]")
            return [e.get_attribute("value") for e in inputs]

        assert chosen("backbones") == ["VGG16", "VGG19", "Xception"]
        assert chosen("splits") == ["official", "official-clean", "random70"]
        form.find_element(By.CSS_SELECTOR, "[aria-label='Remove VGG19']").click()  # unticked, not mistyped
        assert chosen("backbones") == ["VGG16", "Xception"]
        browser.save_screenshot(str(tmp_path / "trigger-form-vgg19-removed.png"))
        weights = form.find_element(By.CSS_SELECTOR, "input[name=element_weights]")
        options = form.find_elements(By.CSS_SELECTOR, f"datalist#{weights.get_attribute('list')} option")
        assert [o.get_attribute("value") for o in options] == ["imagenet", "none"]


def test_bad_params_are_refused_through_the_rest_api(airflow, site, evil):
    api, home = airflow["api"], airflow["home"]
    table = []
    before = api.runs()
    for name, (conf_of, field) in REJECTED_BY_SCHEMA.items():
        conf = conf_of(site, evil)
        status, body = api.trigger(conf)
        detail = json.dumps(body)
        table.append((name, conf, f"HTTP {status}: {detail[:160]}"))
        assert status == 400, (name, status, body)
        assert field in detail and "does not match" in detail, (name, body)
    assert api.runs() == before  # no run was created
    _nothing_written(home)

    triggered = {}
    for name, (conf_of, _) in REFUSED_BY_ALLOWLIST.items():
        conf = conf_of(site, evil)
        status, body = api.trigger(conf)
        assert status == 200, (name, status, body)
        triggered[name] = (conf, body["dag_run_id"])

    deadline = time.monotonic() + 900  # max_active_runs=1: one after another
    pending = dict(triggered)
    states = {}
    while pending and time.monotonic() < deadline:
        time.sleep(3)
        for name, (_, run_id) in list(pending.items()):
            status, body = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
            if body.get("state") in ("success", "failed"):
                states[name] = body["state"]
                del pending[name]
    assert not pending, f"runs still going: {pending}\n" + airflow["log"].read_text()[-3000:]

    for name, (conf, run_id) in triggered.items():
        fragments = [f.replace("{outside}", str(site["outside"])) for f in REFUSED_BY_ALLOWLIST[name][1]]
        assert states[name] == "failed", (name, states[name])
        _, tis = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
        fetch = next(ti for ti in tis["task_instances"] if ti["task_id"] == "fetch_dataset")
        assert fetch["state"] == "failed" and fetch["try_number"] == 1, fetch  # not retried
        status, logs = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/fetch_dataset/logs/1")
        text = json.dumps(logs)
        assert status == 200 and "refused trigger params" in text, (name, text[-2000:])
        for fragment in fragments:
            assert fragment in text, (name, fragment, text[-2000:])
        said = re.search(r"refused trigger params: (.{0,220})", text).group(1)
        table.append((name, conf, f"run failed at fetch_dataset (try 1): {said}"))
    _nothing_written(home)
    assert evil.log == []  # the non-allowlisted host never saw a request
    for name, conf, outcome in table:
        print(f"| {name} | `{json.dumps(conf)}` | {outcome} |")


def test_ctrl_c_stops_every_component(airflow):
    """Last in this module (it stops the module's Airflow): exit 0, a closing line, no process left."""
    assert airflow["stop"]() == 0, airflow["log"].read_text()[-3000:]
    output = airflow["log"].read_text()
    assert "Airflow stopped." in output and "Traceback" not in output, output[-3000:]
    # No process of this Airflow home is left (they all carry its AIRFLOW_HOME in their environment).
    left = processes_of_airflow_home(airflow["airflow_home"])
    assert not left, f"processes left running: {left}"
