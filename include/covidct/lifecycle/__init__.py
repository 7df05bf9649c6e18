"""What lives across runs: MLflow tracking, the registry and its champion, promotion, retrain-on-change, scoring."""
