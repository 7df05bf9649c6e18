# One image for the whole docker-compose stack: Airflow 3.3.2 (api-server, scheduler,
# dag-processor, triggerer), the Spark standalone master and workers, the MLflow tracking
# server, and the covidct package. The Spark driver runs inside the scheduler container and
# the executors inside the workers, so both have the same Python, Java, PySpark, TensorFlow
# and covidct.
#
#   docker build -t covid-ct-pipelines:0.1.0 .      (or: docker compose build)
#   docker build --build-arg PYTHON_IMAGE=registry.example.org/python:3.11-slim-bookworm ...
#
# No `# syntax=` line on purpose: it makes BuildKit fetch a frontend image from Docker Hub,
# which fails on air-gapped sites. PYTHON_IMAGE lets such a site use its own registry's copy.
#
# Based on python:3.11-slim (Debian bookworm, which has OpenJDK 17) plus our exact pins
# (pyproject.toml + constraints.txt), not on apache/airflow: that image ships ~80 providers
# pinned by Airflow's own constraints, which our constraints.txt would partly override.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# Java 17 for Spark 4; tini as PID 1 (signals, zombie reaping); curl for the healthchecks;
# procps (ps) for Spark's launch scripts. The man1 folder: openjdk's postinst needs it on slim.
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless tini curl procps \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv && pip install --upgrade "pip>=24"

WORKDIR /opt/covidct
# An air-gapped site's PyPI mirror: --build-arg PIP_INDEX_URL=https://pypi.example.org/simple
ARG PIP_INDEX_URL=https://pypi.org/simple
# The dependencies first: this slow layer is rebuilt only when the pins change.
COPY pyproject.toml constraints.txt ./
COPY docker/requirements.txt docker/requirements.txt
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt -r docker/requirements.txt \
    && rm /tmp/requirements.txt

# Then the project, in its repository layout: the DAG finds the job at ../jobs/ from dags/.
COPY README.md ./
COPY include/ include/
COPY jobs/ jobs/
COPY dags/ dags/
COPY docker/ docker/
RUN pip install -c constraints.txt /opt/covidct \
    && rm -rf build include/*.egg-info \
    && pip check

# A non-root user (uid 50000, group 0, as in the official Airflow image). The folders that
# named volumes mount over are created here, owned by it, so new volumes inherit that owner; the
# secrets' folders are its alone. MLflow clients read their login from ~/.mlflow/credentials: a link
# into the airflow-secrets volume (the service account's, in the Airflow services; absent elsewhere).
ARG AIRFLOW_UID=50000
RUN useradd --uid "${AIRFLOW_UID}" --gid 0 --home-dir /home/airflow --create-home --shell /bin/bash airflow \
    && mkdir -p /opt/airflow/logs /opt/airflow/secrets /opt/mlflow/secrets /opt/postgres/secrets \
        /opt/covidct/var/data /opt/covidct/var/runs /opt/covidct/var/feature-cache /opt/covidct/var/scores \
        /opt/covidct/var/incoming /opt/covidct/weights \
        /opt/spark/work /opt/spark/logs /opt/mlflow/artifacts \
    && chown -R airflow:0 /opt/airflow /opt/covidct/var /opt/covidct/weights /opt/spark /opt/mlflow /opt/postgres \
    && chmod 700 /opt/airflow/secrets /opt/mlflow/secrets /opt/postgres/secrets \
    && install -d -o airflow -g 0 -m 700 /home/airflow/.mlflow \
    && ln -s /opt/airflow/secrets/mlflow_credentials /home/airflow/.mlflow/credentials

# Runtime settings shared by every service (docker-compose.yml repeats the ones it relies on).
# No secrets here: init-secrets creates them at run time (docker/init_secrets.py).
ENV AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/covidct/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    COVIDCT_HOME=/opt/covidct/var \
    COVIDCT_WEIGHTS_DIR=/opt/covidct/weights \
    SPARK_HOME=/opt/venv/lib/python3.11/site-packages/pyspark \
    SPARK_CONF_DIR=/opt/covidct/docker/spark \
    SPARK_WORKER_DIR=/opt/spark/work \
    SPARK_LOG_DIR=/opt/spark/logs \
    PYSPARK_PYTHON=/opt/venv/bin/python \
    PYSPARK_DRIVER_PYTHON=/opt/venv/bin/python

USER airflow
WORKDIR /opt/airflow
# api-server / Spark master UI, Spark master RPC, Spark worker UI, scheduler health check, MLflow.
EXPOSE 8080 7077 8081 8974 5000
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["airflow", "version"]
