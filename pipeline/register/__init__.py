"""Register: the MLflow model registry and the night's MLflow run."""
