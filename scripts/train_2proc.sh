#!/usr/bin/env bash
# Shows the training stage running as 2 processes on CPU under `accelerate launch` (gloo): builds the
# tiny model into a temp dir, writes a small job file, runs `python -m pipeline.train` in each
# process and prints the result JSON (the last line on stdout; logs go to stderr).
#   bash scripts/train_2proc.sh [OUT_DIR]    # OUT_DIR keeps the adapter and metrics (default: a temp dir, removed)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-$root/.venv/bin/python}
work=$(mktemp -d "${TMPDIR:-/tmp}/overnight-train-2proc.XXXXXX")
trap 'rm -rf "$work"' EXIT
out=${1:-$work/out}

"$python" -m pipeline.demo_world.tiny_model "$work/tiny-model" >&2
"$python" - "$work/job.yaml" "$work/tiny-model" "$out" <<'PY'
import json, sys

job_path, model, out = sys.argv[1:]
prompts = [
    {"messages": [{"role": "user", "content": f"Hi, my order #{1000 + 37 * i} is late. What now?"}]}
    for i in range(32)
]
job = {
    "base_model": model,
    "out_dir": out,
    # 4 prompts x 4 completions = 16 completions per step: 8 per process.
    "train": {
        "max_steps": 6,
        "prompts_per_step": 4,
        "num_generations": 4,
        "max_completion_tokens": 8,
        "temperature": 0.3,
        "learning_rate": 0.005,
        "kl_budget": 5.0,
    },
    "graders": [{"type": "regex", "pattern": r"\d", "name": "digit", "weight": 1.0}],
    "prompts": prompts,
}
with open(job_path, "w", encoding="utf-8") as file:
    json.dump(job, file, indent=2)
PY

# `accelerate launch --cpu` always takes accelerate's single-process launcher (its multi-CPU path goes
# through `mpirun`, which is not installed here), so `--num_processes 2 --cpu` would run ONE process.
# `--multi_gpu` takes the torchrun launcher instead; with CUDA hidden, every process creates its
# accelerate state with cpu=True (pipeline.train.recipe.process_state) and the group is MULTI_CPU over gloo.
export CUDA_VISIBLE_DEVICES="" ACCELERATE_USE_CPU=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$python" -m accelerate.commands.launch \
  --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
  --main_process_port 0 \
  -m pipeline.train "$work/job.yaml"
