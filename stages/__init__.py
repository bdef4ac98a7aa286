"""The pipeline: `python -m stages STAGE TASK` (see __main__.py); shared code in core/, one package per task."""
