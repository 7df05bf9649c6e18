"""covidct: deep transfer learning for COVID-19 detection in chest CT, on Spark + Keras.

The modules, one concept each:

- ``fetch``      downloading (or copying) the dataset: retries, safe extraction, atomic publish
- ``manifest``   one row per image: sha256, size, format by content, mode, official split
- ``validate``   the Great Expectations gate on the manifest and split lists
- ``backbone``   the table of ImageNet CNN backbones and where their weights come from
- ``image``      decoding image bytes by content into backbone-ready arrays
- ``featurizer`` ``DeepImageFeaturizer``, a ``pyspark.ml`` Transformer running Keras in Spark workers
- ``dataset``    reading an upstream-shaped dataset folder into a Spark DataFrame
- ``split``      the ``random70`` and ``official`` train/test splits
- ``cache``      the incremental feature cache (Parquet keyed by image sha256 + weights + pooling)
- ``evaluate``   held-out metrics with pyspark.ml's evaluators
- ``train``      featurize + fit logistic regression + evaluate, written atomically
- ``predict``    classifying new images with a saved model (unreadable files listed, the rest scored)
- ``scoring``    scoring new scans with the champion, each image once per model version (a ledger)
- ``explain``    class activation maps (CAM, Grad-CAM) of a saved model's predictions, in Spark workers
- ``report``     comparing backbones (``stats``: bootstrap CIs, McNemar; ``plots``: figures;
                 ``gallery``: the best model's most confident test images of each outcome, with maps)
- ``pipeline``   what the Airflow DAG's tasks do; ``operators``: its spark-submit operator
- ``tracking``   MLflow: where runs go, one parent run per DAG run, a child run per job
- ``registry``   the registered model ``covid-ct``, its ``champion`` alias and Airflow asset
- ``promotion``  the promotion gate (paired bootstrap of the AUC difference on the official split)
- ``pyfunc``     the saved ensemble as an MLflow pyfunc model
- ``policy``     the operator's allowlist for trigger params (data sources, weights files)
- ``bounds``     how long each task and a run may take; ``alerts``: failed/overdue run alerts
- ``executors``  the driver's watchdog: fail fast when the cluster grants no executors
- ``localstack`` ``make run`` / ``make ui`` on embedded defaults
- ``session``, ``paths``, ``atomic``, ``locks``, ``errors``: plumbing
- ``cli``        the ``covidct`` command line
"""

__version__ = "0.1.0"
