"""Kept for the ensembles registered before the package had layers: MLflow pickled their
``python_model`` as ``covidct.pyfunc.EnsembleModel``. It lives in ``covidct.lifecycle.pyfunc``."""

from covidct.lifecycle.pyfunc import EnsembleModel

__all__ = ["EnsembleModel"]
