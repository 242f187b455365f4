#!/usr/bin/env bash
# Set up and run the whole test suite: lint and format check, then pytest (the real SmolLM2
# is converted once and cached under .cache/, keyed by the hash of its source).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
.venv/bin/ruff check meshllm tests tools plugins
.venv/bin/ruff format --check meshllm tests tools plugins  # `ruff format` fixes it
.venv/bin/python -m pytest "$@"
