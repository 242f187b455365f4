"""A meshllm transport plugin: libp2p with every stream compressed by zlib (``libp2p-zlib``).

Select it with ``[mesh] transport = "libp2p-zlib"`` on every peer of the mesh.
"""

from __future__ import annotations

from meshllm_zlib_transport.endpoint import ZlibEndpoint, ZlibTransport
from meshllm_zlib_transport.stream import CompressedStream, Counters

__all__ = ["CompressedStream", "Counters", "ZlibEndpoint", "ZlibTransport"]
