"""spark-submit entry point of the transfer-learning job (one backbone, one or more splits).

    spark-submit jobs/transfer_learning.py --data DIR --backbone VGG16 --split official,random70 --out DIR

Takes the same arguments as ``covidct train`` (see ``covidct train --help``); the
cluster comes from spark-submit (``--master``), i.e. from Airflow's ``spark_default``
connection, never from this file.

Its arguments come from DAG trigger params, so they are checked again here (``confined``):
``--weights`` must match the param schema's pattern and lie inside a folder the operator
allows (``covidct.orchestration.policy``). ``covidct train``, run by the operator, is not restricted.
"""

import sys

from covidct.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], confined=True))
