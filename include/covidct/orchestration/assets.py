"""The Airflow Assets the DAGs share.

``CHAMPION_ASSET``: the registered model's champion (``covidct.lifecycle.registry``). The
transfer-learning DAG's ``promote`` task emits an event for it when it promotes a new champion
(its ``extra``: name, version, model, kind, official AUC, run folder); DAGs scheduled on it
(``covid_ct_scoring``) run on each new champion.
"""

from __future__ import annotations

from airflow.sdk import Asset

CHAMPION_ASSET = Asset(name="covid_ct_champion", uri="covidct://registry/covid-ct/champion", group="model")
