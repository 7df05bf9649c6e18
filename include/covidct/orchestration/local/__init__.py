"""The local stack: ``make run`` (``runner``), ``make ui`` and ``make mlflow-ui`` (``launchers``), on the
embedded defaults (``environment``); ``diagnosis`` says what a failed task's cause was and what to do."""
