#!/usr/bin/env bash
# Resolve requirements.lock: every package the project, its tests and its build need, transitive
# ones included, each at one exact version with the hashes of its files (uv's `pip compile`).
#
#   scripts/lock.sh            re-resolve, keeping every pin that still satisfies pyproject.toml
#                              (after adding or changing a dependency there)
#   scripts/lock.sh --upgrade  take the newest releases the ranges in pyproject.toml allow
#
# Either way the result is a deliberate commit: rerun the goldens (BONSAI_UPDATE_GOLDEN=1
# ./scripts/test.sh tests/test_golden.py, then read the diff) and the benchmarks it can move.
set -euo pipefail
cd "$(dirname "$0")/.."

uv_version=0.13.9
# the CPU build of torch that lies on this machine kind's disk (find-links /opt/wheels); PyPI's
# torch of the same version is a multi-GB CUDA build
torch_pin="torch==2.13.0+cpu"
wheels=/opt/wheels

tools="${TMPDIR:-/tmp}/bonsai-lock-tools-$uv_version"
if [ ! -x "$tools/bin/uv" ]; then
  python3.11 -m venv "$tools"
  "$tools/bin/python" -m pip install --quiet "uv==$uv_version"
fi
# what building the package needs ([build-system] requires), so that setup.sh builds it
# with locked tools, and pip itself
build=$(python3.11 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
printf '%s\n%s\npip\n' "$torch_pin" "$build" | "$tools/bin/uv" pip compile pyproject.toml - \
  --extra dev --universal --python-version 3.11 --generate-hashes \
  --find-links "$wheels" --emit-find-links \
  --custom-compile-command "scripts/lock.sh" \
  --output-file requirements.lock --quiet "$@"
echo "lock: requirements.lock resolved ($(grep -c "^[a-zA-Z]" requirements.lock) packages); review and commit it with the goldens it moves"
