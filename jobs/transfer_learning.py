"""spark-submit entry point of the transfer-learning job (one backbone, one or more splits).

    spark-submit jobs/transfer_learning.py --data DIR --backbone VGG16 --split official,random70 --out DIR

Takes the same arguments as ``covidct train`` (see ``covidct train --help``); the
cluster comes from spark-submit (``--master``), i.e. from Airflow's ``spark_default``
connection, never from this file.
"""

import sys

from covidct.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
