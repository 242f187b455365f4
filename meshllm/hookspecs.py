"""Hook specifications: the extension points of meshllm.

Hooks are synchronous and are called while the plugin manager is being set up or when the host
needs a registry; anything long-running lives in the objects the hooks hand over.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from meshllm.balance import BalancingPolicy
    from meshllm.mesh.transport import Transport
    from meshllm.partitioners import Partitioner

hookspec = pluggy.HookspecMarker("meshllm")


@hookspec
def meshllm_register_partitioners(register: Callable[[Partitioner], None]) -> None:
    """Register layer partitioners: strategies that cut a model's layers into contiguous ranges.

    :param register: call it once per partitioner object. The object needs a ``name`` (lower-case
        identifier, unique across all plugins; a duplicate is an error naming both plugins) and a
        ``partition(request)`` method taking a :class:`meshllm.partitioners.PartitionRequest`
        and returning one :class:`meshllm.model.ranges.LayerRange` per worker used, in pipeline
        order, tiling all layers.

    Called once, when the host builds its partitioner registry (at start-up of a command or
    daemon). The result of the hook itself is ignored.
    """


@hookspec
def meshllm_register_transports(register: Callable[[Transport], None]) -> None:
    """Register transports: the ways peers reach each other and exchange messages.

    :param register: call it once per transport object. The object needs a ``name`` (lower-case
        identifier, unique across all plugins; a duplicate is an error naming both plugins) and
        a ``create_endpoint(options)`` method taking a
        :class:`meshllm.mesh.transport.EndpointOptions` (key seed, mesh secret, listen
        addresses, handshake timeout) and returning an :class:`meshllm.mesh.transport.Endpoint`.
        An endpoint must admit only peers that prove they hold the mesh secret and must never
        carry plaintext over a network.

    Called once, when a daemon starts and builds its transport registry; the daemon then uses
    the transport named by ``[mesh] transport`` in its config. The result is ignored.
    """


@hookspec
def meshllm_register_balancing_policies(register: Callable[[BalancingPolicy], None]) -> None:
    """Register balancing policies: when the leader moves layers away from a slowed-down peer.

    :param register: call it once per policy object. The object needs a ``name`` (lower-case
        identifier, unique across all plugins) and a ``decide(observation)`` method taking a
        :class:`meshllm.balance.Observation` (the plan's stages with each one's baseline and
        recent per-step compute time, and how long the plan has been live) and returning a
        :class:`meshllm.balance.Decision` (which peers to treat as how many times slower, and
        why) to ask for a re-plan, or None to keep the plan. The leader re-plans with ``lp``
        under those slowdowns and switches only if the new plan's predicted gain clears
        ``[balance] min_gain``; requests in flight are replayed on the new plan, so a
        policy can never change an answer, only when layers move.

    Called once when the daemon builds its policy registry; ``decide`` is then called by the
    leader four times a second while a plan serving with that policy (``[balance] policy``,
    or ``meshllm serve --balance``) is live. It must be quick and must not block.
    """
