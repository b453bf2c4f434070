#!/usr/bin/env bash
# The README's test command: set up (idempotent) and run the whole test suite on CPU.
#   bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
export WANDB_MODE=disabled
echo "tests: OMP_NUM_THREADS=$OMP_NUM_THREADS"
.venv/bin/python -m pytest -p no:cacheprovider "$@"
