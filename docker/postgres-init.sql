-- Runs once, when the postgres container starts on an empty data volume: one database per component,
-- owned by POSTGRES_USER (the superuser the image creates), who connects to all three.
CREATE DATABASE overnight;
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
