"""The hook implementation: registers the ``libp2p-zlib`` transport with meshllm."""

from __future__ import annotations

from collections.abc import Callable

from meshllm import hookimpl
from meshllm.mesh.transport import Transport
from meshllm_zlib_transport.endpoint import ZlibTransport


@hookimpl
def meshllm_register_transports(register: Callable[[Transport], None]) -> None:
    register(ZlibTransport())
