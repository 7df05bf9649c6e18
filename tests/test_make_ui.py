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
from support.browser import chromium, follow_extra_link, log_in, open_trigger_form, type_into
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
        # Runs tracked in the embedded MLflow store (make ui's default; the suite turns it off elsewhere), and
        # where the tasks' MLflow links point (`make mlflow-ui`, started by the test that follows them).
        "COVIDCT_TRACKING": "on",
        "COVIDCT_MLFLOW_UI_PORT": str(free_port()),
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
               "airflow_home": tmp / "af", "env": env}  # fmt: skip
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


REPORT_HTML = """<!DOCTYPE html><html><body><h1>COVID-CT comparison</h1>
<table id="comparison"><tr><th>Backbone</th><th>Accuracy</th></tr><tr><td>VGG16</td><td>85.65</td></tr></table>
<img src="official-roc.png" alt="ROC"></body></html>"""


def raw_get(base: str, path: str, token: str | None = None) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (no client normalises its ``..`` or its escapes)."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(base)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
    response = conn.getresponse()
    return response.status, response.read()


def test_the_report_pages_need_airflow_login_and_stay_in_their_folder(airflow, tmp_path):
    """The covidct plugin inside `make ui`'s api-server: a run's report (written here as a task would)
    listed and served to a logged-in user, in the browser under the DAG run's "Report" tab too; refused
    anonymously (401); no path leaves the report's folder: `..`, its encodings, an absolute path, a
    symbolic link out. Screenshots: the test's tmp_path."""
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    from covidct.core.paths import safe_name

    api, home, base = airflow["api"], airflow["home"], airflow["base"]
    # A DAG run to hang the report on: one the operator's allowlist refuses (it fails in seconds).
    status, body = api.trigger({"weights": "/nonexistent/weights.h5"})
    assert status == 200, body
    run_id = body["dag_run_id"]
    report = home / "runs" / safe_name(run_id) / "report"
    report.mkdir(parents=True)
    (report / "report.html").write_text(REPORT_HTML)
    Image.new("L", (64, 64), 128).save(report / "official-roc.png")
    row = {"label": "VGG16", "metrics": {"accuracy": {"value": 0.8565}, "auc": {"value": 0.9012}}}
    (report / "summary.json").write_text(json.dumps({"splits": {"official": {"title": "official", "rows": [row]}}}))
    (home / "secret.txt").write_text("not for the browser")
    (report / "escape.txt").symlink_to(home / "secret.txt")
    page = f"/covidct/runs/{safe_name(run_id)}/report"

    # Anonymous: no list, no report.
    for path in ("/covidct/runs", f"{page}/report.html", f"/covidct/dag-runs/{DAG_ID}/{run_id}"):
        status, _ = raw_get(base, path)
        assert status == 401, (path, status)
    # Logged in (the REST API's token): the list with the run's headline, the report and its figure.
    status, listing = raw_get(base, "/covidct/runs", api.token)
    assert status == 200 and safe_name(run_id).encode() in listing and b"VGG16 85.65 %" in listing, listing[:2000]
    status, _ = raw_get(base, f"/covidct/dag-runs/{DAG_ID}/{run_id}", api.token)
    assert status == 303
    status, html = raw_get(base, f"{page}/report.html", api.token)
    assert status == 200 and b'<table id="comparison">' in html
    assert raw_get(base, f"{page}/official-roc.png", api.token)[0] == 200
    # Nothing outside the report's folder, however the path is written.
    for escape in ("../../../secret.txt", "%2e%2e/%2e%2e/%2e%2e/secret.txt", "..%2f..%2f..%2fsecret.txt",
                   "%252e%252e/%252e%252e/%252e%252e/secret.txt", f"{'%2F'}{home / 'secret.txt'}", "escape.txt",
                   "..", "./"):  # fmt: skip
        status, answer = raw_get(base, f"{page}/{escape}", api.token)
        assert status == 404 and b"not for the browser" not in answer, (escape, status, answer[:300])
    for bad_run in ("..", "%2e%2e", "."):
        status, _ = raw_get(base, f"/covidct/runs/{bad_run}/report/report.html", api.token)
        assert status == 404, (bad_run, status)

    # In the browser: the run's "Report" tab frames the report; the nav's page lists the run.
    passwords = airflow["airflow_home"] / "simple_auth_manager_passwords.json.generated"
    with chromium() as browser:
        wait = WebDriverWait(browser, 60)
        log_in(browser, f"{base}/dags/{DAG_ID}", "admin", json.loads(passwords.read_text())["admin"], wait)
        browser.get(f"{base}/dags/{DAG_ID}/runs/{run_id}")
        tab = wait.until(expected_conditions.element_to_be_clickable((By.XPATH, "//a[normalize-space()='Report']")))
        tab.click()
        frame = wait.until(expected_conditions.presence_of_element_located((By.TAG_NAME, "iframe")))
        browser.save_screenshot(str(tmp_path / "dag-run-report-tab.png"))
        browser.switch_to.frame(frame)
        assert wait.until(lambda b: b.find_element(By.ID, "comparison")).text.startswith("Backbone")
        browser.switch_to.default_content()
        browser.get(f"{base}/covidct/runs")
        assert "VGG16 85.65 %" in browser.find_element(By.TAG_NAME, "body").text
        browser.save_screenshot(str(tmp_path / "covidct-runs.png"))
    with chromium() as anonymous:
        anonymous.get(f"{base}{page}/report.html")
        assert "COVID-CT comparison" not in anonymous.page_source and "Not authenticated" in anonymous.page_source


def test_from_the_trigger_form_to_the_report_and_the_mlflow_run(airflow, site, tmp_path):
    """In the browser only: trigger a run through the form (choosing one backbone and one split in the
    multi-selects), wait for it in the grid, then follow the train task's "MLflow run" link (`make
    mlflow-ui`'s page of that run, with its metrics) and the report task's "Report" link (the comparison
    table). A local[*] job has no Spark application page: no such link. Screenshots: the test's tmp_path."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    api, env = airflow["api"], airflow["env"]
    base = airflow["base"].replace("127.0.0.1", "localhost")  # as a user opens it, and as the links name it
    mlflow_port = env["COVIDCT_MLFLOW_UI_PORT"]
    command = [sys.executable, "-m", "covidct.orchestration.local", "mlflow-ui"]
    mlflow_ui = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
    )
    passwords = airflow["airflow_home"] / "simple_auth_manager_passwords.json.generated"
    try:
        with chromium() as browser:
            wait = WebDriverWait(browser, 60)
            log_in(browser, f"{base}/dags/{DAG_ID}", "admin", json.loads(passwords.read_text())["admin"], wait)
            before = {r["dag_run_id"] for r in api.runs()}
            form, submit = open_trigger_form(browser, wait)
            for chip in ("VGG19", "Xception", "official", "official-clean"):
                form.find_element(By.CSS_SELECTOR, f"[aria-label='Remove {chip}']").click()
            for name, value in (("data_source", str(site["allowed"] / "COVID-CT")), ("weights", "none"),
                                ("expect_covid", "12"), ("expect_noncovid", "12")):  # fmt: skip
                type_into(browser, form.find_element(By.CSS_SELECTOR, f"input[name=element_{name}]"), value)
            browser.save_screenshot(str(tmp_path / "1-trigger-form-filled.png"))
            submit.click()
            deadline = time.monotonic() + 60
            while not (new := [r for r in api.runs() if r["dag_run_id"] not in before]) and time.monotonic() < deadline:
                time.sleep(1)
            assert len(new) == 1, "submitting the form created no run"
            run_id = new[0]["dag_run_id"]
            conf = new[0]["conf"]
            assert conf["backbones"] == ["VGG16"] and conf["splits"] == ["random70"], conf
            assert conf["data_source"] == str(site["allowed"] / "COVID-CT") and conf["expect_covid"] == 12, conf
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                state = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")[1]["state"]
                if state in ("success", "failed"):
                    break
                time.sleep(3)
            assert state == "success", airflow["log"].read_text()[-3000:]

            def follow(task_id: str, name: str) -> str:
                links = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/links"
                task_page = f"{base}/dags/{DAG_ID}/runs/{run_id}/tasks/{task_id}"
                shot = tmp_path / f"2-{task_id}-links.png"
                return follow_extra_link(browser, wait, task_page, name, shot, lambda: api.call("GET", links))

            href = follow("train_vgg16", "MLflow run")
            assert href.startswith(f"http://127.0.0.1:{mlflow_port}/#/experiments/"), href
            wait.until(lambda b: "random70/accuracy" in b.find_element(By.TAG_NAME, "body").text)
            browser.save_screenshot(str(tmp_path / "3-mlflow-run.png"))
            browser.get(f"{base}/dags/{DAG_ID}/runs/{run_id}/tasks/train_vgg16/details")
            wait.until(expected_conditions.presence_of_element_located((By.LINK_TEXT, "MLflow run")))
            assert not browser.find_elements(By.LINK_TEXT, "Spark application")  # local[*]: no page to link
            href = follow("report", "Report")
            assert href.startswith(f"{base}/covidct/runs/"), href
            table = wait.until(lambda b: b.find_element(By.TAG_NAME, "table"))
            assert "VGG16" in table.text
            browser.save_screenshot(str(tmp_path / "4-report.png"))
    finally:
        os.killpg(mlflow_ui.pid, signal.SIGTERM)
        mlflow_ui.wait(timeout=60)


def test_ctrl_c_stops_every_component(airflow):
    """Last in this module (it stops the module's Airflow): exit 0, a closing line, no process left."""
    assert airflow["stop"]() == 0, airflow["log"].read_text()[-3000:]
    output = airflow["log"].read_text()
    assert "Airflow stopped." in output and "Traceback" not in output, output[-3000:]
    # No process of this Airflow home is left (they all carry its AIRFLOW_HOME in their environment).
    left = processes_of_airflow_home(airflow["airflow_home"])
    assert not left, f"processes left running: {left}"
