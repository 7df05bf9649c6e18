"""spark-submit entry point of the scoring job: a folder of new scans, scored with the champion.

    spark-submit jobs/score.py --images DIR --model DIR --model-name covid-ct --model-version 3 --out DIR

Takes the same arguments as ``covidct score`` (see ``covidct score --help``); the cluster comes
from spark-submit (``--master``), i.e. from Airflow's ``spark_default`` connection.

``--images`` comes from the scoring DAG's ``folder`` trigger param, so it is checked again here
(``confined``): it must match the param schema's pattern and lie inside a folder the operator
allows (``$COVIDCT_INCOMING_DIR``, ``$COVIDCT_ALLOWED_SCORING_DIRS``; ``covidct.orchestration.policy``).
"""

import sys

from covidct.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]], confined=True))
