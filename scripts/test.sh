#!/usr/bin/env bash
# Set up (first time only) and run the tests.  Default: the fast suite (under 10 minutes on
# two CPU cores).  --all adds the slow tests (the demo end to end, benchmarks' smoke runs),
# as CI does.  Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
marker=(-m "not slow")
args=()
for arg in "$@"; do
  if [ "$arg" = "--all" ]; then marker=(); else args+=("$arg"); fi
done
exec .venv/bin/python -m pytest "${marker[@]}" ${args[@]+"${args[@]}"}
