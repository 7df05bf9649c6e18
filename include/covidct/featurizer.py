"""The study's import line, kept: ``from covidct.featurizer import DeepImageFeaturizer``.

``DeepImageFeaturizer`` lives in ``covidct.features.featurizer``. This name also loads the
``PipelineModel``s saved before the package had layers: their metadata names the stage
``covidct.featurizer.DeepImageFeaturizer``, and ``PipelineModel.load`` imports that path.
"""

from covidct.features.featurizer import DeepImageFeaturizer

__all__ = ["DeepImageFeaturizer"]
