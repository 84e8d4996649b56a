#!/usr/bin/env bash
# Installs into .venv/ if needed, then runs the demo: `overnight demo` with any arguments given.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/install.sh"
cd "$root"
exec .venv/bin/overnight demo "$@"
