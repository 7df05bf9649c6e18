"""The project's two DAGs, parsed from ``dags/`` as the dag-processor parses them.

Tests that only read a DAG share the session's parse (``conftest.dagbag`` / ``conftest.dag``).
A test that runs one with ``dag.test()`` parses its own with :func:`fresh`: ``dag.test()`` keeps a
run's conf values in the DAG's params, which would leak into every later reader of a shared DAG.
"""

from __future__ import annotations

from pathlib import Path

DAGS = Path(__file__).resolve().parents[2] / "dags"
DAG_ID = "covid_ct_transfer_learning"
SCORING_DAG_ID = "covid_ct_scoring"


def parse():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def fresh(dag_id: str = DAG_ID):
    """A DAG of its own, for ``dag.test()``."""
    bag = parse()
    assert bag.import_errors == {}, bag.import_errors
    return bag.dags[dag_id]
