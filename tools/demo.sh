#!/usr/bin/env bash
# The main job on the bundled default model: a local mesh of 3 peers (separate daemon processes
# talking libp2p over loopback) serves SmolLM2-135M-Instruct and answers a prompt. The model is
# imported on one peer only; the others receive just their own layers over the mesh.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
MESH=${MESHLLM_DEMO_DIR:-$PWD/.cache/demo-mesh}
PROMPT=${1:-Explain in two sentences why the sky is blue.}
meshllm() { .venv/bin/meshllm "$@"; }

meshllm testbed down --dir "$MESH" >/dev/null 2>&1 || true
trap 'meshllm testbed down --dir "$MESH" >/dev/null' EXIT
echo "== starting 3 peers in $MESH" >&2
meshllm testbed up --peers 3 --dir "$MESH"
echo "== importing the model on peer-0 only" >&2
meshllm --home "$MESH/peer-0" model import
echo "== serving it across the mesh (asked of peer-1)" >&2
meshllm --home "$MESH/peer-1" serve smollm2-135m-instruct-int4
echo "== asking peer-2" >&2
meshllm --home "$MESH/peer-2" query "$PROMPT"
meshllm testbed status --dir "$MESH"
