#!/usr/bin/env bash
# The nightly job: the tests marked `nightly` -- full from-scratch rebuilds of the shipped checkpoints (the mini
# policy, ~13 min on one core; the Qwen-shaped stand-in family, ~8 min), compared with what is shipped. Every
# CI run checks a bit-exact prefix of the same builds instead (tests/test_build_prefix.py, ~1.5 min).
#   bash scripts/nightly.sh [extra pytest args]
# It is the README's test command (scripts/test.sh: set-up, offline single-threaded environment, skip gate)
# restricted to those tests. After a nightly run that passed, `python -m sphere.testing.build_prefix --write`
# re-records the prefix digests if a change to a build was intended (new shipped weights: rebuild and ship
# them first).
set -euo pipefail
exec bash "$(dirname "$0")/test.sh" --nightly -m nightly "$@"
