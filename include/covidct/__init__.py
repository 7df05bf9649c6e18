"""covidct: deep transfer learning for COVID-19 detection in chest CT, on Spark + Keras.

Layers, top to bottom; a layer imports only the layers below it (``lint-imports`` checks it:
``[tool.importlinter]`` in pyproject.toml; docs/architecture.md):

- ``cli``            the ``covidct`` command line
- ``orchestration``  Airflow: the DAGs' tasks, the spark-submit operators, the trigger-param policy,
                     time bounds, alerts, and the local stack (``make run`` / ``make ui``)
- ``lifecycle``      what lives across runs: MLflow tracking, the registry and its champion,
                     promotion, retrain-on-change, scoring new scans
- ``reporting``      the comparison report: rows, intervals, figures, the gallery of maps
- ``inference``      using a saved model: predicting on new files, explaining predictions (CAM)
- ``modelling``      the train job, metrics and statistics, the ensemble, the run-folder layout
- ``features``       images to feature vectors: backbones, ``DeepImageFeaturizer``, the feature cache
- ``data``           the dataset: fetching, the manifest, decoding images, splits, the validation gate
- ``core``           plumbing: errors, paths, atomic publish, locks, versions, the Spark session

``covidct.featurizer`` and ``covidct.pyfunc`` keep the names saved models and the study's code use.
"""

__version__ = "0.1.0"
