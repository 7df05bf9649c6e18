"""Fitting and evaluating: the train job, metrics and statistics, the ensemble, the run-folder layout."""
