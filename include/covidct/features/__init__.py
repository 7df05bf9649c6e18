"""Images to feature vectors: the backbone table, ``DeepImageFeaturizer`` and the feature cache."""
