#!/usr/bin/env bash
# Regenerate requirements.lock (the exact set CI tests and the README installs) from pyproject.toml's ranges with
# pip-tools, in a throwaway venv of its own (pip-tools wants a newer pip than the project needs).
#   scripts/lock.sh                                  keep every pin that still fits; add or drop what changed
#   scripts/lock.sh --upgrade                        the newest releases within the ranges (then run .ci/run)
#   scripts/lock.sh --upgrade-package transformers   one package (and what it needs)
# torch is written without its local build label (+cpu): the lock fixes the version and the index picks the build
# (here: the CPU wheel on this machine's disk; on a GPU machine: PyPI's CUDA build; on another CPU-only machine add
# --extra-index-url https://download.pytorch.org/whl/cpu to the install command to skip the CUDA download).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { echo "scripts/lock.sh: needs Python 3.11 (requires-python); set PYTHON=/path/to/python3.11" >&2; exit 2; }
TOOL="${TMPDIR:-/tmp}/pruning-lab-pip-tools"
if [ ! -x "$TOOL/bin/pip-compile" ]; then
  "$PYTHON" -m venv "$TOOL"
  "$TOOL/bin/pip" install --disable-pip-version-check -q 'pip-tools>=7.7,<8'
fi
# every extra but "all", which names the project itself (pip-compile would lock it as a path on this machine)
EXTRAS=$("$PYTHON" -c 'import tomllib; x = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
print(" ".join(f"--extra={e}" for e in x if e != "all"))')
# shellcheck disable=SC2086
CUSTOM_COMPILE_COMMAND=scripts/lock.sh "$TOOL/bin/pip-compile" --quiet --allow-unsafe $EXTRAS --strip-extras --no-emit-index-url --no-emit-find-links \
  --output-file=requirements.lock "$@" pyproject.toml
sed -i -E 's/^(torch==[^+ ]+)\+[A-Za-z0-9.]+/\1/' requirements.lock
