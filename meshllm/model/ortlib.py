"""ONNX Runtime, imported the first time a segment needs it.

Importing it costs about 30 MiB of resident memory: a daemon that is idle, or that only serves
segment files, never pays it (see docs/concepts.md, "What a peer's memory holds").
"""

from __future__ import annotations

import functools
from types import ModuleType


@functools.cache
def ort() -> ModuleType:
    import onnxruntime

    # Its warnings (unused initializers, node placement) are not actionable for a user.
    onnxruntime.set_default_logger_severity(3)
    return onnxruntime
