"""meshllm: one language model served by a mesh of small trusted devices."""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("meshllm")

__all__ = ["__version__", "hookimpl"]
