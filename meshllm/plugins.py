"""The plugin manager and the registries built from its hooks."""

from __future__ import annotations

import importlib
import re
from typing import Generic, TypeVar

import pluggy

from meshllm import hookspecs
from meshllm.errors import PluginError
from meshllm.mesh.transport import Transport
from meshllm.model.ranges import LayerRange, validate_ranges
from meshllm.partitioners import Assignment, Partitioner, PartitionRequest

# Built-ins are registered exactly like third-party plugins.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "meshllm.partitioners",
    "meshllm.balance",
    "meshllm.mesh.memory",
    "meshllm.mesh.libp2p_transport",
)
T = TypeVar("T")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def get_plugin_manager(*, load_entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh plugin manager with the built-ins and the ``meshllm`` entry points loaded."""
    pm = pluggy.PluginManager("meshllm")
    pm.add_hookspecs(hookspecs)
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    if load_entry_points:
        pm.load_setuptools_entrypoints("meshllm")
    pm.check_pending()
    return pm


class Registry(Generic[T]):
    """Named objects registered through one ``meshllm_register_*`` hook, validated in one place.

    Names must be unique across all plugins; an object must have every method in *methods*.
    """

    def __init__(self, pm: pluggy.PluginManager, hook: str, kind: str, methods: tuple[str, ...]):
        self.kind = kind
        self._methods = methods
        self._items: dict[str, T] = {}
        self._owners: dict[str, str] = {}
        for impl in getattr(pm.hook, hook).get_hookimpls():
            owner = impl.plugin_name

            def register(obj: T, _owner: str = owner) -> None:
                self._add(obj, _owner)

            impl.function(register=register)

    def _add(self, obj: T, owner: str) -> None:
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise PluginError(f"plugin {owner} registered a {self.kind} with bad name {name!r}")
        for method in self._methods:
            if not callable(getattr(obj, method, None)):
                raise PluginError(f"{self.kind} {name!r} from {owner} has no {method}() method")
        if name in self._items:
            raise PluginError(
                f"{self.kind} {name!r} registered twice: by {self._owners[name]} and by {owner}"
            )
        self._items[name] = obj
        self._owners[name] = owner

    def names(self) -> list[str]:
        return sorted(self._items)

    def owner(self, name: str) -> str:
        return self._owners[name]

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise PluginError(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}"
            ) from None


class PartitionerRegistry(Registry[Partitioner]):
    def __init__(self, pm: pluggy.PluginManager):
        super().__init__(pm, "meshllm_register_partitioners", "partitioner", ("partition",))

    def assign(self, name: str, request: PartitionRequest) -> Assignment:
        """Run partitioner *name*: one range (or None: left out) per worker, checked.

        A partitioner may return fewer entries than workers (the rest are left out). The
        ranges it does return must tile the model's layers in worker order.
        """
        raw = list(self.get(name).partition(request))
        if len(raw) > request.num_workers:
            raise PluginError(
                f"partitioner {name!r} returned {len(raw)} ranges for {request.num_workers} workers"
            )
        raw += [None] * (request.num_workers - len(raw))
        try:
            validate_ranges([r for r in raw if r is not None], request.num_layers)
        except Exception as exc:
            raise PluginError(f"partitioner {name!r} returned invalid ranges: {exc}") from None
        return raw

    def partition(self, name: str, request: PartitionRequest) -> list[LayerRange]:
        """The ranges of the workers used, in pipeline order."""
        return [r for r in self.assign(name, request) if r is not None]


class TransportRegistry(Registry[Transport]):
    def __init__(self, pm: pluggy.PluginManager):
        super().__init__(pm, "meshllm_register_transports", "transport", ("create_endpoint",))


class BalancingPolicyRegistry(Registry["BalancingPolicy"]):
    def __init__(self, pm: pluggy.PluginManager):
        super().__init__(pm, "meshllm_register_balancing_policies", "balancing policy", ("decide",))


def describe_plugins(pm: pluggy.PluginManager) -> dict[str, object]:
    """What is loaded: each plugin (built-in or from the ``meshllm`` entry-point group) with
    the hooks it implements, and every registered partitioner, transport and policy."""
    entry = {pm.get_name(plugin) for plugin, _dist in pm.list_plugin_distinfo()}
    plugins = []
    for name, plugin in pm.list_name_plugin():
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        kind = (
            "built-in"
            if name in DEFAULT_PLUGINS
            else ("entry point" if name in entry else "registered")
        )
        plugins.append({"name": name, "kind": kind, "hooks": hooks})
    registries = {
        "partitioners": PartitionerRegistry(pm),
        "transports": TransportRegistry(pm),
        "balancing_policies": BalancingPolicyRegistry(pm),
    }
    return {
        "plugins": plugins,
        **{key: {n: reg.owner(n) for n in reg.names()} for key, reg in registries.items()},
    }
