"""The docker-compose stack, built and run for real on a Docker engine, driven as a user would.

One stack for the whole module (a unique compose project name, free host ports, ``down -v``
always); its tests run after every other test of the session, and its image builds in the
background from the session's start (``support.compose.Prebuild``). Build the image, ``up -d``,
wait until every service is healthy, then through Airflow's REST API (as the UI does: a token,
the trigger endpoint) run the DAG on a small subset of the real dataset, bind-mounted read-only;
check outputs in the runs volume, that the Spark master ran the executors on a worker, and what
the run left on the MLflow tracking server (and that server: its UI on loopback, its Host check,
its database in Postgres). Then the scoring DAG, the trigger form in a real browser, two workers,
and faults on the running stack, each mid-job, on as few runs as prove them: the only worker
stopped for good (that run fails within the executor wait), then one run through which the
scheduler is restarted, the worker killed and Postgres restarted in turn (it succeeds).

Needs a Docker engine (``../shared/tools/docker_offline.sh`` provides one offline) and the real
data (``COVIDCT_DATA_DIR``). Without an engine the tests skip, except under ``CI=true``, where
they fail. Figures (build, healthy, task durations, faults) go to ``compose-measurements.json``
in the test's output folder, and the screenshots beside it; the path is printed.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests

from conftest import PREBUILD, ROOT
from support.browser import IN_CI, chromium, follow_extra_link, log_in, open_trigger_form, type_into
from support.compose import compose_bin, compose_env, engine_available
from support.net import free_port

pytestmark = [pytest.mark.docker, pytest.mark.slow]

DAG_ID, SCORING_DAG_ID = "covid_ct_transfer_learning", "covid_ct_scoring"
EXPERIMENT, REGISTERED_MODEL = "covid-ct", "covid-ct"  # covidct.lifecycle.store / covidct.lifecycle.registry
QUICK_CONF = {"backbones": ["VGG16"], "splits": ["random70"], "weights": "none"}
# Per class: images taken from the head of each official list (so every split has some).
SUBSET = {"train": 30, "val": 5, "test": 10}
N_PER_CLASS = sum(SUBSET.values())
N_INCOMING = 6  # real test images for the scoring DAG, half of each class (none in the subset)
N_SLICES = 3  # ... and a DICOM CT series beside them
CLASSES = {"CT_COVID": "COVID", "CT_NonCOVID": "NonCOVID"}
INPUT_MOUNT = "/opt/covidct/input"
ADMIN_PASSWORD = "compose-test-" + uuid.uuid4().hex[:8]
# A bound, not a speed target: the quick run (now with MLflow logging and the promote task) took
# 15.5 min once on a 2-core host at load 30+.
RUN_TIMEOUT_S = 1200
# The driver's executor watchdog on this stack (default 300 s): short, so that a worker stopped for
# good fails the run quickly, yet long enough that a worker back after 20 s (plus its start-up and
# the executor's, slow on a loaded host) lets the job go on.
EXECUTOR_WAIT_S = 90


def non_loopback_address() -> str | None:
    """This machine's address on its default route (a UDP connect sends nothing), if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))
            address = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def make_subset(real: Path, dest: Path) -> Path:
    """A small copy of the real dataset with matching official lists, readable by the image's user."""
    for folder, short in CLASSES.items():
        (dest / folder).mkdir(parents=True)
        (dest / "Data-split" / short).mkdir(parents=True)
        for part, count in SUBSET.items():
            listed = real / "Data-split" / short / f"{part}CT_{short}.txt"
            names = [line.strip() for line in listed.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
            names = names[:count]
            (dest / "Data-split" / short / listed.name).write_text("\n".join(names) + "\n")
            for name in names:
                shutil.copyfile(real / folder / name, dest / folder / name)
    return readable_by_the_image_user(dest)


def make_incoming(real: Path, dest: Path) -> Path:
    """New scans for the scoring DAG (the host folder bind-mounted as the stack's incoming folder):
    the last few test images of each class, none of them in the subset, one file that is no image, and a
    DICOM export: a CT series of ``N_SLICES`` slices, a JPEG 2000 CT, an MR slice and a broken slice, patient
    data planted in the synthetic ones."""
    import numpy as np

    from covidct.data.dataset import split_lists
    from dicom_files import series_folder, uid, write_ct
    from test_dicom import shipped

    dest.mkdir(parents=True)
    test = split_lists(real)["test"]  # relpaths, CT_COVID/... then CT_NonCOVID/...
    for folder in CLASSES:
        for relpath in [r for r in test if r.startswith(f"{folder}/")][-N_INCOMING // 2 :]:
            shutil.copyfile(real / relpath, dest / Path(relpath).name)
    (dest / "notes.txt").write_text("not a scan\n")
    slices = series_folder(dest / "export" / "series1", N_SLICES)
    write_ct(dest / "export" / "mr.dcm", np.zeros((8, 8)), series=uid(), study=uid(), modality="MR")
    (dest / "export" / "broken.dcm").write_bytes(slices[0].read_bytes()[:2000])
    shutil.copyfile(shipped("693_J2KI.dcm"), dest / "export" / "j2k.dcm")  # JPEG 2000, decoded by GDCM
    return readable_by_the_image_user(dest)


def readable_by_the_image_user(root: Path) -> Path:
    """Folders 755, files 644: the image's user (uid 50000) reads what the test mounts."""
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def active_app_ids(master: dict) -> frozenset[str]:
    """The ids of the applications running on the Spark master (its ``/json/`` view)."""
    return frozenset(a["id"] for a in master["activeapps"])


class Stack:
    """One compose project: compose commands, the Airflow REST API, the Spark master's JSON."""

    def __init__(self, out: Path, data: Path, incoming: Path):
        self.out = out
        self.project = f"covidct-test-{uuid.uuid4().hex[:8]}"
        self.airflow_port, self.spark_port, self.mlflow_port = free_port(), free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.airflow_port}"
        self.spark = f"http://127.0.0.1:{self.spark_port}"
        self.mlflow = f"http://127.0.0.1:{self.mlflow_port}"
        override = out / "docker-compose.test.yml"
        # The data subset, read-only, where fetch_dataset (an Airflow task) reads it.
        # The DAG files do not change during the test: the dag-processor parses them at its start and
        # then every 10 min instead of every 30 s (each parse imports the package: CPU the jobs need).
        # The test's Spark jobs are tiny: their JVMs (drivers in the scheduler, executors, the daemons)
        # take a local driver's options (no C2 JIT, covidct.core.session), as the local tests' JVMs do.
        from covidct.core.session import LOCAL_DRIVER_JAVA_OPTIONS as JVM

        volumes = [f"{data}:{INPUT_MOUNT}:ro"]
        services = {
            "scheduler": {
                "volumes": volumes,
                "environment": {"SPARK_SUBMIT_OPTS": f"{JVM} -Dspark.executor.extraJavaOptions={JVM}"},
            },
            "api-server": {"volumes": volumes},
            "dag-processor": {"environment": {"AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600"}},
            "spark-master": {"environment": {"SPARK_DAEMON_JAVA_OPTS": JVM}},
            "spark-worker": {"environment": {"SPARK_DAEMON_JAVA_OPTS": JVM}},
        }
        override.write_text(json.dumps({"services": services}, indent=2))  # JSON is YAML
        env_file = out / "test.env"
        env_file.write_text("")  # nothing from a developer's .env
        self.cmd = [compose_bin(), "-p", self.project, "-f", str(ROOT / "docker-compose.yml"), "-f", str(override)]
        self.cmd += ["--project-directory", str(ROOT), "--env-file", str(env_file)]
        self.env = compose_env()
        # The image under this project's own tag (its layers come from the build cache): another
        # stack built meanwhile on the same engine cannot swap the image under this one.
        self.image = f"covid-ct-pipelines:{self.project}"
        self.env |= {
            "COVIDCT_IMAGE": self.image,
            "COVIDCT_AIRFLOW_PORT": str(self.airflow_port),
            "COVIDCT_SPARK_UI_PORT": str(self.spark_port),
            "COVIDCT_MLFLOW_PORT": str(self.mlflow_port),
            "COVIDCT_DATA_SOURCE": INPUT_MOUNT,
            "COVIDCT_WEIGHTS_HOST_DIR": str(out / "weights"),
            "COVIDCT_INCOMING_HOST_DIR": str(incoming),
            "AIRFLOW_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "COVIDCT_EXECUTOR_WAIT_S": str(EXECUTOR_WAIT_S),
            # A task whose process died with the scheduler is found by the new scheduler within a minute
            # (its orphaned-tasks check every 30 s; default 300): the scheduler fault costs minutes less.
            "COVIDCT_ORPHANED_TASKS_CHECK_S": "30",
        }
        (out / "weights").mkdir()
        self.figures: dict = {"project": self.project}
        self._token = None
        self._mlflow_logins: dict[str, tuple[str, str]] = {}
        self.quick_run_id: str | None = None

    # ---------------------------------------------------------------- compose

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([*self.cmd, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, (
                f"compose {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}"
            )
        return result

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).stdout.split()

    def exec(self, service: str, *command: str) -> str:
        return self.compose("exec", "-T", service, *command, timeout=120).stdout

    def save(self) -> None:
        (self.out / "compose-measurements.json").write_text(json.dumps(self.figures, indent=2, default=str) + "\n")

    # ---------------------------------------------------------------- Airflow REST API

    def token(self) -> str:
        if self._token is None:
            response = requests.post(
                f"{self.base}/auth/token", json={"username": "admin", "password": ADMIN_PASSWORD}, timeout=30
            )
            assert response.status_code == 201, response.text
            self._token = response.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        """One call, retried while the API server is down (a restarted database or scheduler) or too
        slow to answer (it stalled for 55 s once on a loaded 2-core host; GET and PATCH only)."""
        deadline = time.monotonic() + 180
        while True:
            try:
                response = requests.request(
                    method, f"{self.base}/api/v2{path}", headers={"Authorization": f"Bearer {self.token()}"},
                    timeout=30, **kwargs,
                )  # fmt: skip
                if response.status_code < 500 or time.monotonic() > deadline:
                    return response
            except (requests.ConnectionError, requests.Timeout) as exc:
                # A POST that timed out may have been done: never sent twice (two runs).
                if time.monotonic() > deadline or (isinstance(exc, requests.Timeout) and method == "POST"):
                    raise
            time.sleep(3)

    def runs(self) -> list[dict]:
        response = self.api("GET", f"/dags/{DAG_ID}/dagRuns", params={"limit": 100})
        assert response.status_code == 200, response.text
        return response.json()["dag_runs"]

    def unpause(self, dag_id: str = DAG_ID) -> None:
        """Unpause a DAG, as a user does before triggering it (it starts no run by itself)."""
        response = self.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
        assert response.status_code == 200 and response.json()["is_paused"] is False, response.text

    def trigger(self, conf: dict, dag_id: str = DAG_ID) -> str:
        response = self.api("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})
        assert response.status_code == 200, response.text
        return response.json()["dag_run_id"]

    def tasks(self, run_id: str, dag_id: str = DAG_ID) -> dict[str, dict]:
        response = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        assert response.status_code == 200, response.text
        return {t["task_id"]: t for t in response.json()["task_instances"]}

    def wait_run(self, run_id: str, timeout: float = RUN_TIMEOUT_S, dag_id: str = DAG_ID) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            response = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
            if response.status_code == 200 and response.json()["state"] in ("success", "failed"):
                return response.json()["state"]
            time.sleep(5)
        pytest.fail(f"run {run_id} not finished after {timeout:.0f} s: {self.summary(run_id, dag_id)}")

    def wait_task_running(self, run_id: str, task_id: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.tasks(run_id)[task_id]["state"] == "running":
                return
            time.sleep(2)
        pytest.fail(f"{task_id} never ran: {self.summary(run_id)}")

    def wait_task_done(self, run_id: str, task_id: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.tasks(run_id)[task_id]["state"]
            if state in ("success", "failed", "upstream_failed", "skipped"):
                return state
            time.sleep(2)
        pytest.fail(f"{task_id} not finished after {timeout:.0f} s: {self.summary(run_id)}")

    def task_log(self, run_id: str, task_id: str, try_number: int) -> str:
        response = self.api(
            "GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
            params={"full_content": "true"},
        )  # fmt: skip
        assert response.status_code == 200, response.text
        return response.text

    def links(self, run_id: str, task_id: str, dag_id: str = DAG_ID) -> dict[str, str | None]:
        """A task's extra links, as the Airflow UI gets them."""
        response = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/links")
        assert response.status_code == 200, response.text
        return response.json()["extra_links"]

    def summary(self, run_id: str, dag_id: str = DAG_ID) -> dict:
        return {t: (ti["state"], ti["try_number"], ti["duration"]) for t, ti in self.tasks(run_id, dag_id).items()}

    # ---------------------------------------------------------------- MLflow REST API

    def mlflow_login(self, who: str = "service") -> tuple[str, str]:
        """The MLflow login of the pipeline's service account (``service``: as the tasks read it, from
        the credentials file in the scheduler) or of the admin (``admin``: the server's auth config)."""
        if who not in self._mlflow_logins:
            parser = configparser.ConfigParser(interpolation=None)
            if who == "service":
                parser.read_string(self.exec("scheduler", "cat", "/home/airflow/.mlflow/credentials"))
                login = parser["mlflow"]["mlflow_tracking_username"], parser["mlflow"]["mlflow_tracking_password"]
            else:
                parser.read_string(self.exec("mlflow", "cat", "/opt/mlflow/secrets/basic_auth.ini"))
                login = parser["mlflow"]["admin_username"], parser["mlflow"]["admin_password"]
            self._mlflow_logins[who] = login
        return self._mlflow_logins[who]

    def mlflow_request(self, method: str, path: str, login: tuple[str, str] | None = None, **kwargs):
        """One call to the MLflow server's REST API (``/api/2.0/mlflow...``) through its published port,
        as ``login`` (default: the service account)."""
        return requests.request(
            method, f"{self.mlflow}/api/2.0/mlflow{path}", auth=login or self.mlflow_login(), timeout=30, **kwargs
        )

    def mlflow_api(self, method: str, path: str, **kwargs) -> dict:
        response = self.mlflow_request(method, path, **kwargs)
        assert response.status_code == 200, (path, response.status_code, response.text[:2000])
        return response.json()

    # ---------------------------------------------------------------- Spark

    def master(self) -> dict:
        return requests.get(f"{self.spark}/json/", timeout=10).json()

    def wait_executors_busy(self, timeout: float = 600, other_than: frozenset[str] = frozenset()) -> dict:
        """Wait until an application (one not in ``other_than``: a retry's new job) runs tasks on a
        worker (cores in use); returns the master's view."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.master()
            if active_app_ids(state) - other_than and state["coresused"] > 0:
                return state
            time.sleep(1)
        pytest.fail(f"no Spark application{f' other than {sorted(other_than)}' if other_than else ''} got executors")

    def wait_tasks_on_executors(self, timeout: float = 600) -> int:
        """Wait until the driver (in the scheduler) runs tasks on a registered executor: mid-job.

        Stricter than the master's ``coresused``, which counts cores granted to executors that
        may not have started yet. Reads the driver's REST API; returns the executors' active tasks.
        """
        script = (
            "import json, urllib.request as u\n"
            "for port in (4040, 4041, 4042):\n"
            "    try:\n"
            "        base = f'http://localhost:{port}/api/v1/applications'\n"
            "        app = json.load(u.urlopen(base, timeout=5))[0]['id']\n"
            "        ex = json.load(u.urlopen(f'{base}/{app}/executors', timeout=5))\n"
            "        print(sum(e['activeTasks'] for e in ex if e['id'] != 'driver'))\n"
            "        break\n"
            "    except Exception:\n"
            "        pass\n"
            "else:\n"
            "    print(0)\n"
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            active = int(self.exec("scheduler", "python", "-c", script).strip() or 0)
            if active > 0:
                return active
            time.sleep(1)
        pytest.fail("no task ran on an executor")

    def outputs(self, run_id: str) -> dict:
        """metrics.json of a one-split VGG16 run (``vgg16/``, no split folder) and the report's files."""
        script = (
            "import json, sys; from covidct.core import paths; d = paths.run_dir(sys.argv[1]); "
            "print(json.dumps({'dir': str(d), "
            "'metrics': json.loads((d / 'vgg16' / 'metrics.json').read_text()), "
            "'report': sorted(p.name for p in (d / 'report').iterdir())}))"
        )
        return json.loads(self.exec("scheduler", "python", "-c", script, run_id))


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory, real_data_dir):
    if not engine_available():
        if IN_CI:
            pytest.fail("CI=true but no Docker engine answers (.ci/run provisions one with docker_offline.sh)")
        pytest.skip("no Docker engine (bash ../shared/tools/docker_offline.sh starts one)")
    if real_data_dir is None:
        if IN_CI:
            pytest.fail("CI=true but COVIDCT_DATA_DIR does not point at the real COVID-CT copy")
        pytest.skip("COVIDCT_DATA_DIR does not point at the real COVID-CT copy")
    out = tmp_path_factory.mktemp("compose")
    print(f"\ncompose test output: {out}")
    data = make_subset(real_data_dir, out / "data" / "COVID-CT")
    stack = Stack(out, data, make_incoming(real_data_dir, out / "incoming"))
    try:
        prebuild = request.config.stash.get(PREBUILD, None)
        if prebuild is not None:  # started with the session: its layers are the build cache of the one below
            rc, took = prebuild.wait()
            assert rc == 0, f"the image's build failed:\n{prebuild.tail()}"
            stack.figures["prebuild_s"] = round(took, 1)
        started = time.monotonic()
        stack.compose("build", timeout=3600)
        stack.figures["build_s"] = round(time.monotonic() - started, 1)
        image = json.loads(stack.compose("config", "--format", "json").stdout)["services"]["scheduler"]["image"]
        size = subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", image], capture_output=True, text=True)
        stack.figures["image"] = {"name": image, "size_gb": round(int(size.stdout) / 1e9, 2)}
        started = time.monotonic()
        stack.compose("up", "-d", "--wait", "--wait-timeout", "1200", timeout=1500)
        stack.figures["up_to_healthy_s"] = round(time.monotonic() - started, 1)
        yield stack
    finally:
        stack.save()
        logs = stack.compose("logs", "--no-color", "--timestamps", timeout=300, check=False)
        (out / "compose.log").write_text(logs.stdout + logs.stderr)
        down = stack.compose("down", "-v", "--remove-orphans", "-t", "20", timeout=600, check=False)
        subprocess.run(["docker", "image", "rm", stack.image], capture_output=True, timeout=300)  # the tag
        assert down.returncode == 0, down.stderr


def test_every_service_is_healthy(stack):
    ps = [json.loads(line) for line in stack.compose("ps", "-a", "--format", "json").stdout.splitlines() if line]
    states = {p["Service"]: (p["State"], p.get("Health", ""), p.get("ExitCode")) for p in ps}
    assert states.pop("init-secrets") == ("exited", "", 0)
    assert states.pop("airflow-init") == ("exited", "", 0)
    assert set(states) == {
        "postgres",
        "api-server",
        "scheduler",
        "dag-processor",
        "triggerer",
        "spark-master",
        "spark-worker",
        "mlflow",
    }
    assert all(state == ("running", "healthy", 0) for state in states.values()), states
    # Published on loopback only, on the ports we chose.
    published = {
        (p["Service"], pub["URL"], pub["PublishedPort"])
        for p in ps
        for pub in p.get("Publishers") or []
        if pub["PublishedPort"]
    }
    assert published == {
        ("api-server", "127.0.0.1", stack.airflow_port),
        ("spark-master", "127.0.0.1", stack.spark_port),
        ("mlflow", "127.0.0.1", stack.mlflow_port),
    }
    # And so not on this machine's other addresses.
    address = non_loopback_address()
    if address:
        for port in (stack.airflow_port, stack.spark_port, stack.mlflow_port):
            with socket.socket() as sock:
                sock.settimeout(5)
                assert sock.connect_ex((address, port)) != 0, f"port {port} answers on {address}"


def test_quick_run_through_the_rest_api(stack):
    # The DAG starts paused; unpausing it (as a user does before triggering) starts no run by itself.
    stack.unpause()
    conf = QUICK_CONF | {"expect_covid": N_PER_CLASS, "expect_noncovid": N_PER_CLASS}
    run_id = stack.trigger(conf)
    stack.quick_run_id = run_id
    assert stack.wait_run(run_id) == "success", stack.summary(run_id)
    assert [r["dag_run_id"] for r in stack.runs()] == [run_id], "a scheduled run started on unpause"
    tasks = stack.tasks(run_id)
    stack.figures["quick_run"] = {
        "run_id": run_id,
        "tasks_s": {t: round(ti["duration"] or 0, 1) for t, ti in tasks.items()},
        "states": {t: ti["state"] for t, ti in tasks.items()},
    }
    stack.save()
    assert tasks["train_vgg16"]["state"] == "success" and tasks["report"]["state"] == "success"
    assert {tasks[t]["state"] for t in ("train_vgg19", "train_xception")} == {"skipped"}
    # A first run of this data and these params: trained, and recorded as the last successful run.
    assert tasks["check_changes"]["state"] == tasks["record_success"]["state"] == "success", stack.summary(run_id)
    found = stack.outputs(run_id)
    metrics = found["metrics"]
    assert metrics["backbone"] == "VGG16" and metrics["split"] == "random70" and metrics["random_weights"] is True
    assert metrics["n_train"] + metrics["n_test"] == 2 * N_PER_CLASS
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert {"report.html", "report.md", "summary.json"} <= set(found["report"])
    # The Spark master ran the job, and its executors ran on a worker (not in the driver).
    master = stack.master()
    apps = [a for a in master["completedapps"] if a["state"] == "FINISHED"]
    assert apps and all(a["cores"] > 0 for a in apps), master["completedapps"]
    worker = json.loads(stack.exec("spark-worker", "curl", "-s", "http://localhost:8081/json/"))
    ran_here = {e["appid"] for e in worker["finishedexecutors"]}
    assert {a["id"] for a in apps} <= ran_here, (apps, worker["finishedexecutors"])
    # The Airflow UI's links (from what each task recorded, at the stack's published addresses): the train
    # task's Spark application on the master's UI and its MLflow run; the report, behind Airflow's login.
    links = stack.links(run_id, "train_vgg16")
    app_id = metrics["spark"]["application_id"]
    assert links["Spark application"] == f"http://localhost:{stack.spark_port}/app/?appId={app_id}", links
    page = requests.get(links["Spark application"], timeout=30)
    assert page.status_code == 200 and app_id in page.text and "covidct-train-VGG16" in page.text, page.text[:500]
    mlflow_run = re.fullmatch(
        rf"http://localhost:{stack.mlflow_port}/#/experiments/(\w+)/runs/(\w+)", links["MLflow run"]
    )
    assert mlflow_run, links
    logged = stack.mlflow_api("GET", "/runs/get", params={"run_id": mlflow_run.group(2)})["run"]
    assert {m["key"] for m in logged["data"]["metrics"]} >= {"random70/accuracy", "random70/auc"}, logged["data"]
    report = stack.links(run_id, "report")["Report"]
    assert report == f"http://localhost:{stack.airflow_port}/covidct/runs/{Path(found['dir']).name}/report/report.html"
    assert requests.get(report, timeout=30).status_code == 401  # anonymous: no report
    shown = requests.get(report, headers={"Authorization": f"Bearer {stack.token()}"}, timeout=30)
    assert shown.status_code == 200 and "VGG16" in shown.text and "<table" in shown.text, shown.text[:500]
    assert stack.links(run_id, "promote") == {"Model version": None}  # random weights: never promoted
    assert stack.links(run_id, "train_vgg19") == {"MLflow run": None, "Spark application": None}  # skipped


# ------------------------------------------------------------------------- the MLflow server


def quick_run(stack: Stack) -> str:
    """The quick run test_quick_run_through_the_rest_api triggered (finished), or one made now (a test run alone)."""
    if stack.quick_run_id is None:
        stack.unpause()
        stack.quick_run_id = stack.trigger(QUICK_CONF | {"expect_covid": N_PER_CLASS, "expect_noncovid": N_PER_CLASS})
    assert stack.wait_run(stack.quick_run_id) == "success", stack.summary(stack.quick_run_id)
    return stack.quick_run_id


def test_mlflow_server(stack):
    """The tracking server: healthy, its UI on 127.0.0.1, Host headers checked, a login required, its
    stores in Postgres as a role that owns them and nothing else."""
    health = requests.get(f"{stack.mlflow}/health", timeout=10)  # the healthcheck needs no login
    assert health.status_code == 200 and health.text.strip() == "OK", health.text
    service = stack.mlflow_login()
    for base in (stack.mlflow, f"http://localhost:{stack.mlflow_port}"):  # the UI, as a browser opens it
        anonymous = requests.get(f"{base}/", timeout=30)
        # Refused, with the challenge that makes a browser ask for a login.
        assert anonymous.status_code == 401, (base, anonymous.status_code, anonymous.text[:300])
        assert anonymous.headers.get("WWW-Authenticate", "").lower().startswith("basic"), anonymous.headers
        ui = requests.get(f"{base}/", auth=service, timeout=30)
        assert ui.status_code == 200 and "text/html" in ui.headers["content-type"], (base, ui.status_code)
        assert "mlflow" in ui.text.lower(), ui.text[:500]
    search = {"max_results": 1}
    for login in (None, ("covidct", "not-its-password"), ("admin", "")):
        refused = requests.get(
            f"{stack.mlflow}/api/2.0/mlflow/experiments/search", params=search, auth=login, timeout=30
        )
        assert refused.status_code == 401, (login and login[0], refused.status_code, refused.text[:300])
    # DNS-rebinding protection is on: a Host header that is not ours is refused.
    foreign = requests.get(
        f"{stack.mlflow}/api/2.0/mlflow/experiments/search", params=search, auth=service,
        headers={"Host": f"attacker.example:{stack.mlflow_port}"}, timeout=30,
    )  # fmt: skip
    assert foreign.status_code == 403, (foreign.status_code, foreign.text[:300])
    # Inside the stack, the services reach it by its name (the URI every task and driver has), logged in
    # by MLflow's own client from the credentials file; without it, refused.
    script = (
        "import mlflow, requests, os\n"
        "uri = os.environ['MLFLOW_TRACKING_URI'] + '/api/2.0/mlflow/experiments/search?max_results=1'\n"
        "print(requests.get(uri).status_code)\n"
        "print(len(mlflow.MlflowClient().search_experiments()) >= 1)"
    )
    assert stack.exec("scheduler", "python", "-c", script).split()[-2:] == ["401", "True"]
    assert stack.mlflow_login()[0] == "covidct"
    # Its stores are the databases airflow-init created in the stack's Postgres, owned by the role mlflow;
    # Airflow's by the role airflow; neither role is a superuser, nor may create roles or databases, nor
    # connect to the other's databases. No service but Postgres and airflow-init holds the superuser's password.
    init_log = stack.compose("logs", "--no-color", "airflow-init").stdout
    assert "database 'mlflow' created, owned by 'mlflow'" in init_log, init_log[-2000:]
    psql = ("postgres", "psql", "-U", "postgres", "-d", "postgres", "-tA", "-F", "|", "-c")
    owners = stack.exec(
        *psql, "SELECT datname, pg_get_userbyid(datdba) FROM pg_database WHERE datname NOT LIKE 'template%'"
    )
    assert dict(line.split("|") for line in owners.split()) == {
        "postgres": "postgres", "airflow": "airflow", "mlflow": "mlflow", "mlflow_auth": "mlflow",
    }, owners  # fmt: skip
    roles = stack.exec(
        *psql,
        "SELECT rolname, rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname IN ('airflow', 'mlflow')",
    )
    assert sorted(roles.split()) == ["airflow|f|f|f", "mlflow|f|f|f"], roles
    for role, database in (("airflow", "mlflow"), ("airflow", "mlflow_auth"), ("mlflow", "airflow")):
        denied = stack.compose(
            "exec", "-T", "postgres", "psql", "-U", role, "-d", database, "-c", "SELECT 1", check=False
        )
        assert denied.returncode != 0 and "permission denied for database" in denied.stderr, (
            role,
            database,
            denied.stderr,
        )
    count = stack.exec("postgres", "psql", "-U", "mlflow", "-d", "mlflow", "-tAc", "SELECT count(*) FROM experiments")
    assert int(count.strip()) >= 1  # at least MLflow's Default experiment
    # Each service sees only its own secrets' volume (the image has the three folders, empty).
    holds = 'for d in airflow mlflow postgres; do [ -n "$(ls -A /opt/$d/secrets 2>/dev/null)" ] && echo $d; done; true'
    seen = {
        name: stack.exec(name, "sh", "-c", holds).split()
        for name in ("api-server", "scheduler", "mlflow", "spark-worker")
    }
    assert seen == {"api-server": ["airflow"], "scheduler": ["airflow"], "mlflow": ["mlflow"], "spark-worker": []}, seen
    # airflow-init's step is safe to run again: the roles and databases exist, the schema is up to date.
    dirs = ("/opt/airflow/secrets", "/opt/mlflow/secrets", "/opt/postgres/secrets")
    again = stack.compose(
        "run", "--rm", "--no-deps", "airflow-init", "python", "/opt/covidct/docker/init_databases.py", *dirs
    ).stdout
    assert "upgrading its schema if needed" in again and "created" not in again, again


def tags_of(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def test_quick_run_is_tracked_on_the_mlflow_server(stack):
    """What the quick run left on the MLflow server (over HTTP, from the tasks and the Spark driver):
    the DAG run's parent run, the train job's child run with params, metrics and its Spark model
    (written on the cluster, stored in the server's volume), the report, and the gate's decision
    (not promoted: random weights, no official split). Then the registry on the server: the run's
    model registered and made champion by hand, and downloaded back by ``covidct.lifecycle.registry``."""
    run_id = quick_run(stack)
    tasks = stack.tasks(run_id)
    experiment = stack.mlflow_api("GET", "/experiments/get-by-name", params={"experiment_name": EXPERIMENT})
    experiment = experiment["experiment"]
    assert experiment["artifact_location"].startswith("mlflow-artifacts:"), experiment  # the server's proxy

    def search(query: str) -> list[dict]:
        found = stack.mlflow_api(
            "POST", "/runs/search", json={"experiment_ids": [experiment["experiment_id"]], "filter": query,
                                          "max_results": 100},
        )  # fmt: skip
        return found.get("runs", [])

    [parent] = search(f"tags.`covidct.kind` = 'dag_run' and tags.`airflow.run_id` = '{run_id}'")
    parent_id = parent["info"]["run_id"]
    assert tags_of(parent)["airflow.dag_id"] == DAG_ID
    children = search(f"tags.`mlflow.parentRunId` = '{parent_id}'")
    [train] = [c for c in children if tags_of(c).get("covidct.kind") == "train"]
    assert tags_of(train)["airflow.task_id"] == "train_vgg16" and tags_of(train)["airflow.run_id"] == run_id
    params = {p["key"]: p["value"] for p in train["data"].get("params", [])}
    assert params["backbone"] == "VGG16" and params["splits"] == "random70" and params["weights"] == "none"
    metrics = {m["key"]: m["value"] for m in train["data"].get("metrics", [])}
    written = stack.outputs(run_id)["metrics"]  # the job's metrics.json in the runs volume
    for name in ("accuracy", "auc", "f1", "n_train", "n_test"):
        assert metrics[f"random70/{name}"] == pytest.approx(written[name]), name
    assert metrics["timings/total_s"] > 0
    # The report went to the parent run; the gate never promotes random weights (and this run has
    # no official split to compare on): its decision is on the parent run, the promote task skipped.
    tags = tags_of(parent)
    assert tags["covidct.promotion.decision"] == "kept champion", tags
    assert tasks["promote"]["state"] == "skipped", stack.summary(run_id)
    listed = stack.mlflow_api("GET", "/artifacts/list", params={"run_id": parent_id, "path": "report"})
    assert {"report/report.html", "report/report.md"} <= {f["path"] for f in listed.get("files", [])}, listed
    # The report links to each run where a browser on this machine opens the MLflow UI.
    report = stack.exec("scheduler", "sh", "-c", f"cat {stack.outputs(run_id)['dir']}/report/report.md")
    link = f"(http://localhost:{stack.mlflow_port}/#/experiments/{experiment['experiment_id']}/runs/{parent_id})"
    assert link in report, report[-3000:]
    # No champion on this stack yet: no registered model. To the service account, MLflow's login answers
    # 403 (not 404) for a model that does not exist; the pipeline's lookup reads that as "no champion".
    alias = stack.mlflow_request(
        "GET", "/registered-models/alias", params={"name": REGISTERED_MODEL, "alias": "champion"}
    )
    assert alias.status_code == 403, (alias.status_code, alias.text[:500])
    search = stack.mlflow_api("GET", "/registered-models/search", params={"filter": f"name = '{REGISTERED_MODEL}'"})
    assert not search.get("registered_models"), search
    lookup = "from covidct.lifecycle.registry import champion_version as c; print('champion:', c())"
    assert stack.exec("scheduler", "python", "-c", lookup).strip().splitlines()[-1] == "champion: None"
    # The Spark model's files are in the server's volume, nowhere in the scheduler (clients upload).
    stored = stack.exec("mlflow", "find", "/opt/mlflow/artifacts", "-path", "*sparkml*", "-name", "*.parquet")
    assert stored.split(), "no Spark model data in the mlflow-artifacts volume"
    assert stack.exec("scheduler", "find", "/opt/mlflow/artifacts", "-type", "f").split() == []
    stack.figures["mlflow"] = {"experiment_id": experiment["experiment_id"], "parent_run": parent_id,
                               "children": {tags_of(c).get("covidct.kind"): c["info"]["run_id"] for c in children},
                               "decision": tags.get("covidct.promotion.reason")}  # fmt: skip
    stack.save()

    # The registry's path on this stack, which the gate cannot take with random weights: the train
    # job's logged model registered and made champion by hand (covidct.lifecycle.registry, in the scheduler),
    # then covidct.lifecycle.registry.champion() downloads it through the server as a complete model folder.
    script = (
        "import json, sys\n"
        "from covidct.core import paths\nfrom covidct.lifecycle import registry, runs\n"
        "info = runs.read_info(paths.run_dir(sys.argv[1]) / 'vgg16')\n"
        "before = registry.champion(sys.argv[2])\n"
        "version = registry.register(info['models']['random70'], {'covidct.test': 'compose: by hand'})\n"
        "registry.set_champion(version)\n"
        "found = registry.champion(sys.argv[2])\n"
        "files = sorted(str(p.relative_to(found.model_dir)) for p in found.model_dir.rglob('*') if p.is_file())\n"
        "print(json.dumps({'before': before is not None, 'version': version, 'name': found.name,\n"
        "                  'found_version': found.version, 'files': files}))\n"
    )
    out = stack.exec("scheduler", "python", "-c", script, run_id, "/tmp/covidct-champion-test")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["before"] is False and result["name"] == REGISTERED_MODEL, result
    assert result["found_version"] == result["version"], result
    files = result["files"]
    assert any(f.startswith("metadata/part-00000") for f in files), files  # a PipelineModel folder
    # Its stages' data, written by the executors on the worker, came through whole.
    assert any(f.startswith("stages/") and "/data/" in f and f.endswith(".parquet") for f in files), files
    champion = {"name": REGISTERED_MODEL, "alias": "champion"}
    alias = stack.mlflow_api("GET", "/registered-models/alias", params=champion)
    assert alias["model_version"]["version"] == result["version"], alias
    assert alias["model_version"]["run_id"] == train["info"]["run_id"], alias
    # Only the service account (which created the model) and the admin move the champion: another
    # user, added by the admin, reads it but can neither move nor delete the alias.
    reader = ("reader", "reader-" + uuid.uuid4().hex)
    created = stack.mlflow_request("POST", "/users/create", login=stack.mlflow_login("admin"),
                                   json={"username": reader[0], "password": reader[1]})  # fmt: skip
    assert created.status_code == 200, created.text[:500]
    assert (
        stack.mlflow_request(
            "POST", "/users/create", login=reader, json={"username": "x", "password": "y" * 12}
        ).status_code
        == 403
    )
    assert stack.mlflow_api("GET", "/registered-models/alias", params=champion, login=reader) == alias
    moved = stack.mlflow_request("POST", "/registered-models/alias", login=reader, json=champion | {"version": "1"})
    deleted = stack.mlflow_request("DELETE", "/registered-models/alias", login=reader, json=champion)
    assert (moved.status_code, deleted.status_code) == (403, 403), (moved.text[:300], deleted.text[:300])
    assert stack.mlflow_api("GET", "/registered-models/alias", params=champion) == alias  # unchanged


def scoring_outputs(stack: Stack, run_id: str) -> dict:
    """summary.json and predictions.csv of one scoring run (``$COVIDCT_HOME/scores/<run id>/``, in the scheduler)."""
    script = (
        "import csv, json, sys; from covidct.core import paths; d = paths.run_scores_dir(sys.argv[1]); "
        "print(json.dumps({'summary': json.loads((d / 'summary.json').read_text()), "
        "'rows': list(csv.DictReader(open(d / 'predictions.csv'))), "
        "'series': list(csv.DictReader(open(d / 'series.csv')))}))"
    )
    return json.loads(stack.exec("scheduler", "python", "-c", script, run_id).strip().splitlines()[-1])


def test_scoring_dag_scores_the_incoming_folder_with_the_champion(stack):
    """The scoring DAG on the stack: the champion (made by the test above) downloaded through the MLflow
    server, the incoming folder (a host folder, read-only: images and a DICOM export) scored on the Spark
    cluster, the file that is no image and the MR slice listed, not fatal; a DICOM series scored slice by slice
    and as a series, no patient data in any output; a second run scores nothing again (the ledger) and gives
    the same rows."""
    from test_dicom import assert_no_patient_data

    alias = stack.mlflow_api("GET", "/registered-models/alias", params={"name": REGISTERED_MODEL, "alias": "champion"})
    version = alias["model_version"]["version"]
    stack.unpause(SCORING_DAG_ID)
    found = {}
    for attempt in ("first", "second"):
        run_id = stack.trigger({}, dag_id=SCORING_DAG_ID)
        state = stack.wait_run(run_id, dag_id=SCORING_DAG_ID)
        assert state == "success", stack.summary(run_id, SCORING_DAG_ID)
        found[attempt] = scoring_outputs(stack, run_id)
        stack.figures.setdefault("scoring", {})[attempt] = {
            "run_id": run_id, "summary": found[attempt]["summary"],
            "tasks": stack.summary(run_id, SCORING_DAG_ID),
        }  # fmt: skip
        stack.save()
    first, second = found["first"], found["second"]
    assert first["summary"]["folder"] == "/opt/covidct/var/incoming", first["summary"]
    assert first["summary"]["files"] == N_INCOMING + 1 + N_SLICES + 3, first["summary"]
    assert first["summary"]["scored_new"] == N_INCOMING + N_SLICES + 1, first["summary"]
    reasons = {Path(u["path"]).name: u["reason"] for u in first["summary"]["unreadable_files"]}
    assert reasons.keys() == {"notes.txt", "mr.dcm", "broken.dcm"}, reasons
    assert reasons["mr.dcm"].startswith("DICOM modality MR") and "cannot be decoded" in reasons["broken.dcm"], reasons
    rows = first["rows"]
    assert len(rows) == N_INCOMING + N_SLICES + 1 and {r["model_version"] for r in rows} == {version}, rows
    series = {s["slices"]: s for s in first["series"]}
    assert series.keys() == {str(N_SLICES), "1"} and {s["window"] for s in series.values()} == {"L-600_W1500"}
    assert sum(r["series_uid_hash"] == series[str(N_SLICES)]["series_uid_hash"] for r in rows) == N_SLICES
    assert first["summary"]["dicom"]["notice"].startswith("Research use only"), first["summary"]
    assert_no_patient_data(stack.out / "compose-measurements.json", text=json.dumps(found))  # outputs and summaries
    assert {r["model_name"] for r in rows} == {REGISTERED_MODEL} and {r["new"] for r in rows} == {"True"}, rows
    assert all(0.0 <= float(r["probability"]) <= 1.0 and r["label"] in ("COVID", "non-COVID") for r in rows), rows
    # Scored once per model version: the second run takes every row from the ledger.
    assert second["summary"]["scored_new"] == 0, second
    assert second["summary"]["already_scored"] == N_INCOMING + N_SLICES + 1, second
    assert {r["new"] for r in second["rows"]} == {"False"}
    key = ("path", "sha256", "probability", "label", "scored_run")
    assert [tuple(r[k] for k in key) for r in second["rows"]] == [tuple(r[k] for k in key) for r in rows]
    # Both ran on the Spark cluster (an application of the master, executors on the worker).
    apps = [a for a in stack.master()["completedapps"] if "score" in a["name"]]
    assert len(apps) == 2 and all(a["cores"] > 0 for a in apps), stack.master()["completedapps"]
    # The scoring task's links: its scores behind Airflow's login, its Spark application.
    links = stack.links(run_id, "score", SCORING_DAG_ID)
    assert links["Spark application"].startswith(f"http://localhost:{stack.spark_port}/app/?appId=app-"), links
    shown = requests.get(links["Scores"], headers={"Authorization": f"Bearer {stack.token()}"}, timeout=30)
    assert shown.status_code == 200 and "predictions.csv" in shown.text, shown.text[:500]
    csv = requests.get(
        links["Scores"] + "predictions.csv", headers={"Authorization": f"Bearer {stack.token()}"}, timeout=30
    )
    assert csv.status_code == 200 and csv.text.startswith("path,sha256,"), csv.text[:300]


def test_bad_param_is_refused_and_creates_no_run(stack):
    before = {r["dag_run_id"] for r in stack.runs()}
    response = stack.api(
        "POST", f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": {"backbones": ["AlexNet"]}}
    )
    assert response.status_code == 400, response.text
    assert "backbones" in response.json()["detail"]
    assert {r["dag_run_id"] for r in stack.runs()} == before


# ------------------------------------------------------------------------- the UI, in a browser


@pytest.fixture
def browser(stack):
    with chromium() as driver:
        yield driver


def test_trigger_form_in_a_real_browser(stack, browser, dag):
    """In the browser only: log in, open the DAG's trigger form, see every param with its description, choose
    one backbone and one split in the multi-selects, submit, wait for the run; then follow the train task's
    extra links (its Spark application on the master's UI, its MLflow run in the MLflow UI, logged in) and
    the report task's (the report, behind Airflow's login). Screenshots in the stack's output folder."""
    import base64

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    params = dag.params
    wait = WebDriverWait(browser, 60)
    ui = f"http://localhost:{stack.airflow_port}"  # the api-server's base_url host
    log_in(browser, f"{ui}/dags/{DAG_ID}", "admin", ADMIN_PASSWORD, wait)
    form, submit = open_trigger_form(browser, wait)
    browser.save_screenshot(str(stack.out / "trigger-form.png"))
    shown = form.text
    for name in params:
        assert name in shown, f"param {name} missing from the trigger form"
        description = params.get_param(name).description
        assert description and description in shown, f"the description of {name} is not shown"
    for chip in ("VGG19", "Xception", "official", "official-clean"):  # the quick run's choices, by unticking
        form.find_element(By.CSS_SELECTOR, f"[aria-label='Remove {chip}']").click()
    # Seeds 1-2: not the quick run's params, so this run trains (an unchanged run would skip its train tasks),
    # from the quick run's cached features (the same random weights): LR fits, no featurization.
    typed = {"weights": "none", "seeds": "1-2", "expect_covid": str(N_PER_CLASS), "expect_noncovid": str(N_PER_CLASS)}
    for name, value in typed.items():
        type_into(browser, form.find_element(By.CSS_SELECTOR, f"input[name=element_{name}]"), value)
    browser.save_screenshot(str(stack.out / "trigger-form-filled.png"))
    before = {r["dag_run_id"] for r in stack.runs()}
    submit.click()
    deadline = time.monotonic() + 60
    while not (new := [r for r in stack.runs() if r["dag_run_id"] not in before]) and time.monotonic() < deadline:
        time.sleep(1)
    assert len(new) == 1, "submitting the form created no run"
    run = new[0]
    assert run["run_type"] == "manual" and run["triggered_by"] == "ui", run
    assert run["conf"]["backbones"] == ["VGG16"] and run["conf"]["splits"] == ["random70"], run["conf"]
    assert run["conf"]["seeds"] == "1-2" and run["conf"]["expect_covid"] == N_PER_CLASS, run["conf"]
    run_id = run["dag_run_id"]
    assert stack.wait_run(run_id) == "success", stack.summary(run_id)

    def follow(task_id: str, name: str) -> str:
        task_page = f"{ui}/dags/{DAG_ID}/runs/{run_id}/tasks/{task_id}"
        shot = stack.out / f"links-{task_id}.png"
        return follow_extra_link(browser, wait, task_page, name, shot, lambda: stack.links(run_id, task_id))

    href = follow("train_vgg16", "Spark application")
    assert href.startswith(f"http://localhost:{stack.spark_port}/app/?appId=app-"), href
    wait.until(lambda b: "covidct-train-VGG16" in b.find_element(By.TAG_NAME, "body").text)
    browser.save_screenshot(str(stack.out / "spark-application.png"))
    # The MLflow UI asks for a login (basic auth): the browser sends the service account's.
    user, password = stack.mlflow_login()
    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {basic}"}})
    try:
        href = follow("train_vgg16", "MLflow run")
        assert href.startswith(f"http://localhost:{stack.mlflow_port}/#/experiments/"), href
        wait.until(lambda b: "random70/accuracy" in b.find_element(By.TAG_NAME, "body").text)
        browser.save_screenshot(str(stack.out / "mlflow-run.png"))
    finally:
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})
    href = follow("report", "Report")
    assert href.startswith(f"{ui}/covidct/runs/"), href
    assert "VGG16" in wait.until(lambda b: b.find_element(By.TAG_NAME, "table")).text
    browser.save_screenshot(str(stack.out / "report.png"))
    stack.figures["screenshots"] = sorted(str(p) for p in stack.out.glob("*.png"))
    stack.save()


def test_two_workers(stack):
    stack.compose(
        "up", "-d", "--no-recreate", "--wait", "--wait-timeout", "900", "--scale", "spark-worker=2", timeout=1200
    )
    deadline = time.monotonic() + 120
    while stack.master()["aliveworkers"] != 2 and time.monotonic() < deadline:
        time.sleep(2)
    master = stack.master()
    assert master["aliveworkers"] == 2, master["workers"]
    assert len({w["host"] for w in master["workers"] if w["state"] == "ALIVE"}) == 2
    stack.compose("up", "-d", "--no-recreate", "--scale", "spark-worker=1", timeout=600)  # back to one
    assert len(stack.containers("spark-worker")) == 1


# ------------------------------------------------------------------------- faults, mid-job


def fault_conf() -> dict:
    # No feature cache: the job featurizes again, so the Spark application is really working. force: the
    # data and params are the quick run's, which an unforced run would not retrain (retrain on change).
    return QUICK_CONF | {"expect_covid": N_PER_CLASS, "expect_noncovid": N_PER_CLASS, "feature_cache": False,
                         "force": True}  # fmt: skip


def finish_fault(stack: Stack, name: str, run_id: str, started: float, extra: dict) -> None:
    state = stack.wait_run(run_id)
    stack.figures.setdefault("faults", {})[name] = {
        "run_state": state,
        "recovery_s": round(time.monotonic() - started, 1),
        "tasks": stack.summary(run_id),
        **extra,
    }
    stack.save()
    assert state == "success", stack.figures["faults"][name]
    metrics = stack.outputs(run_id)["metrics"]
    assert metrics["n_train"] + metrics["n_test"] == 2 * N_PER_CLASS  # nothing lost


def test_fault_spark_worker_stopped_for_good(stack):
    """Issue 14 on the stack: the only worker stopped mid-job and not started again.

    The driver's watchdog fails the job after ``COVIDCT_EXECUTOR_WAIT_S`` without executors: the
    train task fails (no retry: exit status 2) with the watchdog's line, the run fails, the
    application is not left running on the master and no spark-submit is left in the scheduler.
    Then the worker is started again and the next run is green.
    """
    stack.unpause()  # also when run alone
    run_id = stack.trigger(fault_conf())
    stack.wait_task_running(run_id, "train_vgg16")
    stack.wait_executors_busy()
    stack.wait_tasks_on_executors()  # the executor really works: the watchdog sees it lost
    started = time.monotonic()
    stack.compose("stop", "spark-worker", timeout=120)
    stopped_s = time.monotonic() - started
    # The bound, the driver's shutdown (up to 30 s of grace) and the polling, on a loaded host.
    state = stack.wait_task_done(run_id, "train_vgg16", timeout=EXECUTOR_WAIT_S + 240)
    failed_after_s = round(time.monotonic() - started, 1)
    run_state = stack.wait_run(run_id, timeout=300)
    ti = stack.tasks(run_id)["train_vgg16"]
    master = stack.master()
    processes = stack.exec("scheduler", "ps", "-eo", "args")
    stack.figures.setdefault("faults", {})["spark_worker_stopped"] = {
        "executor_wait_s": EXECUTOR_WAIT_S,
        "compose_stop_s": round(stopped_s, 1),
        "stop_to_failed_task_s": failed_after_s,
        "task_state": state,
        "run_state": run_state,
        "tasks": stack.summary(run_id),
    }
    stack.save()
    log = stack.task_log(run_id, "train_vgg16", ti["try_number"])
    (stack.out / "train_vgg16-worker-stopped.log").write_text(log)
    assert state == "failed" and run_state == "failed", stack.figures["faults"]["spark_worker_stopped"]
    assert ti["try_number"] == 1, "exit status 2 is not retried"
    assert failed_after_s >= EXECUTOR_WAIT_S - 5, "failed before the bound: not the watchdog"
    assert "lost every executor" in log or "granted no executor" in log, log[-3000:]
    assert master["activeapps"] == [], master["activeapps"]
    assert "SparkSubmit" not in processes, processes

    # The worker back: the next run (the test below) must be green.
    stack.compose("start", "spark-worker", timeout=120)
    deadline = time.monotonic() + 180
    while stack.master()["aliveworkers"] < 1 and time.monotonic() < deadline:
        time.sleep(2)
    assert stack.master()["aliveworkers"] == 1, stack.master()["workers"]


def test_faults_mid_job_scheduler_restarted_then_worker_killed_then_postgres_restarted(stack):
    """Three faults in sequence on one run, each while a train job works on the cluster.

    1. The scheduler restarted: the train task's process (and its Spark driver) dies with the
       container; the new scheduler finds the orphaned task (its check every 30 s on this stack)
       and runs it again: a new try, whose job is a new Spark application.
    2. During that retry, the only worker killed, back after 20 s: the job gets executors again.
    3. Once tasks run on the new executors, Postgres restarted.
    The run succeeds with every image: nothing lost. It is also the first run after the worker
    was stopped for good (the test above): the stack recovered from that too.
    """
    stack.unpause()  # also when run alone
    run_id = stack.trigger(fault_conf())
    stack.wait_task_running(run_id, "train_vgg16")
    first_job = active_app_ids(stack.wait_executors_busy())
    started = time.monotonic()
    stack.compose("restart", "scheduler", timeout=300)
    stack.wait_executors_busy(other_than=first_job)
    retried_after_s = round(time.monotonic() - started, 1)
    assert stack.tasks(run_id)["train_vgg16"]["state"] == "running", stack.summary(run_id)

    [worker] = stack.containers("spark-worker")
    killed = time.monotonic()
    subprocess.run(["docker", "kill", worker], check=True, capture_output=True)
    time.sleep(20)  # the job has no executor now; a worker comes back well within the driver's patience
    stack.compose("start", "spark-worker")
    stack.wait_tasks_on_executors()  # the job works again, on the worker that came back
    assert stack.tasks(run_id)["train_vgg16"]["state"] == "running", stack.summary(run_id)
    back_after_s = round(time.monotonic() - killed, 1)

    stack.compose("restart", "postgres", timeout=300)
    finish_fault(stack, "scheduler_restarted_worker_killed_postgres_restarted", run_id, started,
                 {"scheduler_restart_to_new_job_s": retried_after_s, "worker_killed_to_tasks_again_s": back_after_s,
                  "worker_back_after_s": 20})  # fmt: skip
