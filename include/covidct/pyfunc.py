"""The saved ensemble as an MLflow pyfunc model (how the registry holds an ensemble champion).

Logged by ``covidct.tracking.log_ensemble`` with the ensemble folder as the artifact
``ensemble``; ``covidct.registry.champion`` hands that folder to ``covidct.predict``.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.pyfunc import PythonModel


class EnsembleModel(PythonModel):
    """``predict`` takes a DataFrame with a ``path`` column (image files or folders) and returns
    ``path, probability, prediction`` per image (``covidct.predict`` on the ensemble folder)."""

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from covidct.predict import predict

        folder = Path(context.artifacts["ensemble"])
        rows = []
        for path in list(pd.DataFrame(model_input)["path"]):
            rows += [{k: r[k] for k in ("path", "probability", "prediction")} for r in predict(folder, path)]
        return pd.DataFrame(rows)
