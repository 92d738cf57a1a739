#!/usr/bin/env bash
# Build and install llama-cpp-python (stock llama.cpp, vendored in it) into .venv from its
# hash-pinned source distribution: requirements-llamacpp-build.lock (the build backend), then
# requirements-llamacpp.lock.  About 7 minutes on two cores the first time; afterwards it
# returns at once.  CPU build for any x86-64 with AVX2 (GGML_NATIVE=OFF): a native build also
# turns on AMX kernels, which crash where the kernel does not grant AMX tiles to the process.
#
#   BONSAI_VENV=DIR  install into DIR instead of .venv
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${BONSAI_VENV:-.venv}
bash scripts/setup.sh
want=$(grep -o '^llama-cpp-python==[^ ]*' requirements-llamacpp.lock | cut -d= -f3)
have=$("$venv/bin/python" -c 'from importlib.metadata import version; print(version("llama-cpp-python"))' 2>/dev/null || true)
if [ "$have" = "$want" ] && "$venv/bin/python" -c 'import llama_cpp' 2>/dev/null; then
  exit 0
fi
echo "setup-llamacpp: building llama-cpp-python $want from source (a few minutes)"
"$venv/bin/python" -m pip install --quiet --require-hashes --no-deps -r requirements-llamacpp-build.lock
CMAKE_ARGS="-DGGML_NATIVE=OFF ${CMAKE_ARGS:-}" "$venv/bin/python" -m pip install --quiet --require-hashes \
  --no-deps --no-build-isolation --no-cache-dir -r requirements-llamacpp.lock
"$venv/bin/python" -c 'import llama_cpp'
