"""An idle daemon does not load what only a stage, a leader's solver or a coordinator needs.

Each of these costs resident memory on a phone that may never use it (measured with
``tools/peer_memory.py``): ONNX Runtime about 50 MiB, onnx about 20, jinja2 and tokenizers about
14, HiGHS about 9.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("onnxruntime", "onnx", "tokenizers", "jinja2", "highspy", "torch", "transformers")

_PROBE = """
import json, sys
import meshllm.cli, meshllm.daemon
from meshllm.pipeline.service import ServingService
from meshllm.plugins import get_plugin_manager
get_plugin_manager()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in %r)))
"""


def test_daemon_modules_leave_heavy_libraries_unloaded() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE % (HEAVY,)], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_a_stage_loads_onnx_runtime_when_it_first_needs_it() -> None:
    code = (
        "import sys; from meshllm.model.ortlib import ort; "
        "before = 'onnxruntime' in sys.modules; ort(); "
        "print(before, 'onnxruntime' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
