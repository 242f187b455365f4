"""Error types. Every error meshllm raises on purpose derives from :class:`MeshError`.

The CLI prints a ``MeshError`` as one clear line and exits non-zero; anything else is a bug.
"""

from __future__ import annotations


class MeshError(Exception):
    """Root of every error meshllm raises deliberately."""


class ModelNotFound(MeshError):
    """No imported model has the requested name."""


class UnsupportedSource(MeshError):
    """A model source that cannot be imported (missing, wrong format, unsupported architecture)."""


class ConversionFailed(MeshError):
    """The external model builder failed."""


class BadRanges(MeshError):
    """Layer ranges that do not tile the model: gaps, overlaps, empty or out of bounds."""


class PartitionError(MeshError):
    """The graph cannot be cut as asked (unexpected structure)."""


class PromptTooLong(MeshError):
    """A prompt (plus the tokens to generate) does not fit the model's context."""


class PluginError(MeshError):
    """A plugin registered something invalid (bad or duplicate name, wrong type)."""
