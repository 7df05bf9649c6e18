"""Using saved models: predicting on new files and explaining predictions (class activation maps)."""
