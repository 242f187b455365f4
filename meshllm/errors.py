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


class Refused(MeshError):
    """A query (or another request to the mesh) this peer does not carry out, and why.

    ``code`` names the reason the same way everywhere: the control socket sends it as the
    error's code, the HTTP API turns it into a status (see :mod:`meshllm.api.errors`).
    """

    code = "failed"


class BadRequest(Refused):
    """A request whose arguments are not what the operation takes."""

    code = "bad_request"


class TooLarge(Refused):
    """A request over one of this peer's ``[limits]`` (the message names it)."""

    code = "too_large"


class Busy(Refused):
    """This peer already coordinates as many queries as it allows: try again, or elsewhere."""

    code = "busy"


class NotServing(Refused):
    """No model is served, or the mesh cannot serve it now (the message says why)."""

    code = "not_serving"


class NotReady(Refused):
    """The plan is still loading (the message names the first stage not ready)."""

    code = "not_ready"


class QueryFailed(Refused):
    """A query that started and could not be finished (the message says why)."""

    code = "query_failed"


class PromptTooLong(TooLarge):
    """A prompt (plus the tokens to generate) does not fit the model's context."""


class PluginError(MeshError):
    """A plugin registered something invalid (bad or duplicate name, wrong type)."""
