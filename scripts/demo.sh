#!/usr/bin/env bash
# Set up (first time only) and run the demo: train a tiny LLaMA on Python's own docs,
# prune it to 50% with Bonsai, compare it with its parent.  Extra arguments go to `bonsai demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/bonsai demo "$@"
