#!/usr/bin/env bash
# The nightly job: the tests marked `nightly` -- full from-scratch rebuilds of the shipped checkpoints (the mini
# policy, ~13 min on one core; the Qwen-shaped stand-in family, ~8 min), compared with what is shipped. Every
# CI run checks a bit-exact prefix of the same builds instead (tests/test_build_prefix.py, ~1.5 min).
#   bash scripts/nightly.sh [extra pytest args]
# After a nightly run that passed, `python -m sphere.testing.build_prefix --write` re-records the prefix
# digests if a change to a build was intended (new shipped weights: rebuild and ship them first).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SPHERE_VENV:-.venv}
export SPHERE_VENV="$VENV"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
export WANDB_MODE=disabled SPHERE_FAIL_ON_SKIP=${SPHERE_FAIL_ON_SKIP:-1}
echo "nightly: OMP_NUM_THREADS=$OMP_NUM_THREADS venv=$VENV"
"$VENV/bin/python" -m pytest -p no:cacheprovider --nightly -m nightly "$@"
