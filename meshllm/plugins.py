"""The plugin manager and the registries built from its hooks."""

from __future__ import annotations

import importlib
import re

import pluggy

from meshllm import hookspecs
from meshllm.errors import PluginError
from meshllm.model.ranges import LayerRange, validate_ranges
from meshllm.partitioners import Partitioner, PartitionRequest

# Built-ins are registered exactly like third-party plugins.
DEFAULT_PLUGINS: tuple[str, ...] = ("meshllm.partitioners",)
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


class PartitionerRegistry:
    """Partitioners by name, validated in one place."""

    def __init__(self, pm: pluggy.PluginManager):
        self._items: dict[str, Partitioner] = {}
        self._owners: dict[str, str] = {}
        for impl in pm.hook.meshllm_register_partitioners.get_hookimpls():
            owner = impl.plugin_name

            def register(obj: Partitioner, _owner: str = owner) -> None:
                self._add(obj, _owner)

            impl.function(register=register)

    def _add(self, obj: Partitioner, owner: str) -> None:
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise PluginError(f"plugin {owner} registered a partitioner with bad name {name!r}")
        if not callable(getattr(obj, "partition", None)):
            raise PluginError(f"partitioner {name!r} from {owner} has no partition() method")
        if name in self._items:
            raise PluginError(
                f"partitioner {name!r} registered twice: by {self._owners[name]} and by {owner}"
            )
        self._items[name] = obj
        self._owners[name] = owner

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> Partitioner:
        try:
            return self._items[name]
        except KeyError:
            raise PluginError(
                f"unknown partitioner {name!r}; available: {', '.join(self.names())}"
            ) from None

    def partition(self, name: str, request: PartitionRequest) -> list[LayerRange]:
        """Run partitioner *name* and check its answer tiles the model's layers."""
        ranges = self.get(name).partition(request)
        try:
            return validate_ranges(ranges, request.num_layers)
        except Exception as exc:
            raise PluginError(f"partitioner {name!r} returned invalid ranges: {exc}") from None
