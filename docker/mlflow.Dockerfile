# MLflow's stock server image plus the PostgreSQL driver its --backend-store-uri needs (psycopg2).
# Baked in rather than pip-installed at start, so the server starts without network access.
ARG MLFLOW_IMAGE_TAG=v3.17.2
FROM ghcr.io/mlflow/mlflow:${MLFLOW_IMAGE_TAG}
RUN pip install --no-cache-dir "psycopg2-binary>=2.9,<3"
