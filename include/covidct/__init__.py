"""covidct: deep transfer learning for COVID-19 detection in chest CT, on Spark + Keras.

The modules, one concept each:

- ``backbone``   the table of ImageNet CNN backbones and where their weights come from
- ``image``      decoding image bytes by content into backbone-ready arrays
- ``featurizer`` ``DeepImageFeaturizer``, a ``pyspark.ml`` Transformer running Keras in Spark workers
- ``dataset``    reading an upstream-shaped dataset folder into a Spark DataFrame
- ``split``      the ``random70`` and ``official`` train/test splits
- ``train``      featurize + fit logistic regression + evaluate, written atomically
- ``cli``        the ``covidct`` command line
"""

__version__ = "0.1.0"
