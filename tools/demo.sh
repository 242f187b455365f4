#!/usr/bin/env bash
# The main job on the bundled default model: import SmolLM2-135M-Instruct and answer a prompt
# through a chain of 3 segments, each holding a third of the layers.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
export MESHLLM_HOME=${MESHLLM_HOME:-$PWD/.cache/demo-home}
.venv/bin/meshllm model import
.venv/bin/meshllm generate --segments 3 "${1:-Explain in two sentences why the sky is blue.}"
