#!/usr/bin/env bash
# Installs into .venv/ if needed, then lints, type-checks and runs every test (unit and integration).
# Integration tests need PostgreSQL at 127.0.0.1:5432 (OVERNIGHT_TEST_POSTGRES_URL to change);
# with OVERNIGHT_REQUIRE_POSTGRES=1 (CI) a missing server fails the run instead of skipping.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/install.sh"
cd "$root"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/pyright
bash scripts/check_compose.sh   # docker-compose config -q (installs Debian's docker-compose when missing)
if [ "${CI:-}" = "true" ]; then
  # The competent demo base model that the integration tests share: built once per run (about 8
  # minutes on 2 cores) into the cache the `base_model_dir` fixture reads, printing its skills.
  .venv/bin/python -m pipeline.demo_world.base_model "${OVERNIGHT_TEST_CACHE:-.overnight/test-cache}/base-model"
fi
exec .venv/bin/python -m pytest tests "$@"  # unit, store and integration (plain `pytest`: unit and store)
