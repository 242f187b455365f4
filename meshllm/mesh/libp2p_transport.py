"""The built-in ``libp2p`` transport plugin. libp2p itself is imported only when used."""

from __future__ import annotations

from meshllm import hookimpl
from meshllm.mesh.transport import Endpoint, EndpointOptions


class Libp2pTransport:
    name = "libp2p"

    def create_endpoint(self, options: EndpointOptions) -> Endpoint:
        from meshllm.mesh.p2p import Libp2pEndpoint

        return Libp2pEndpoint(options)


@hookimpl(trylast=True)
def meshllm_register_transports(register):  # type: ignore[no-untyped-def]
    register(Libp2pTransport())
