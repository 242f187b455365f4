import inspect

import pytest

from meshllm import hookimpl, hookspecs
from meshllm.errors import PluginError
from meshllm.model.ranges import LayerRange
from meshllm.partitioners import PartitionRequest
from meshllm.plugins import DEFAULT_PLUGINS, PartitionerRegistry, get_plugin_manager


class FirstLayerAlone:
    name = "first-alone"

    def partition(self, request):
        return [LayerRange(0, 1), LayerRange(1, request.num_layers)]


class Broken:
    name = "broken"

    def partition(self, request):
        return [LayerRange(0, 1)]


class TestPlugin:
    @hookimpl
    def meshllm_register_partitioners(self, register):
        register(FirstLayerAlone())
        register(Broken())


@pytest.fixture
def pm():
    pm = get_plugin_manager(load_entry_points=False)
    plugin = TestPlugin()
    pm.register(plugin, name="test-plugin")
    try:
        yield pm
    finally:
        pm.unregister(plugin)


def test_builtins_are_registered_like_plugins():
    pm = get_plugin_manager(load_entry_points=False)
    assert set(DEFAULT_PLUGINS) <= {name for name, _ in pm.list_name_plugin()}
    assert "even" in PartitionerRegistry(pm).names()


def test_even_partitioner_through_the_registry():
    reg = PartitionerRegistry(get_plugin_manager(load_entry_points=False))
    ranges = reg.partition("even", PartitionRequest(num_layers=30, num_workers=4))
    assert [str(r) for r in ranges] == ["0-8", "8-16", "16-23", "23-30"]


def test_third_party_partitioner_is_used_and_validated(pm):
    reg = PartitionerRegistry(pm)
    assert reg.partition("first-alone", PartitionRequest(30, 2)) == [
        LayerRange(0, 1),
        LayerRange(1, 30),
    ]
    with pytest.raises(PluginError, match="'broken' returned invalid ranges"):
        reg.partition("broken", PartitionRequest(30, 2))
    with pytest.raises(PluginError, match="unknown partitioner 'nope'"):
        reg.get("nope")


def test_duplicate_and_bad_names_are_rejected():
    class Dup:
        @hookimpl
        def meshllm_register_partitioners(self, register):
            register(FirstLayerAlone())
            register(FirstLayerAlone())

    class BadName:
        @hookimpl
        def meshllm_register_partitioners(self, register):
            obj = FirstLayerAlone()
            obj.name = "Bad Name!"
            register(obj)

    for plugin, message in ((Dup(), "registered twice"), (BadName(), "bad name")):
        pm = get_plugin_manager(load_entry_points=False)
        pm.register(plugin, name="p")
        try:
            with pytest.raises(PluginError, match=message):
                PartitionerRegistry(pm)
        finally:
            pm.unregister(plugin)


def test_every_hook_is_documented_and_tested():
    specs = [
        n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("meshllm_")
    ]
    assert specs, "no hook specs found"
    source = inspect.getsource(inspect.getmodule(test_every_hook_is_documented_and_tested))
    for name in specs:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert len(doc) > 80 and "Called" in doc, f"{name} lacks a full docstring"
        assert f"def {name}" in source, f"{name} has no test plugin implementing it"


class LoggingMemoryTransport:
    """A third-party transport wrapping the in-memory one."""

    name = "logging-memory"

    def __init__(self):
        from meshllm.mesh.memory import MemoryTransport

        self.inner = MemoryTransport()
        self.created = 0

    def create_endpoint(self, options):
        self.created += 1
        return self.inner.create_endpoint(options)


class TransportPlugin:
    def __init__(self):
        self.transport = LoggingMemoryTransport()

    @hookimpl
    def meshllm_register_transports(self, register):
        register(self.transport)


def test_transports_registry_has_builtins_and_third_party():
    from meshllm.mesh.identity import MeshSecret
    from meshllm.mesh.transport import EndpointOptions
    from meshllm.plugins import TransportRegistry

    pm = get_plugin_manager(load_entry_points=False)
    plugin = TransportPlugin()
    pm.register(plugin, name="transport-plugin")
    try:
        reg = TransportRegistry(pm)
        assert {"memory", "logging-memory"} <= set(reg.names())
        assert reg.owner("logging-memory") == "transport-plugin"
        opts = EndpointOptions(key_seed=b"k" * 32, secret=MeshSecret(b"s" * 32), listen=())
        ep = reg.get("logging-memory").create_endpoint(opts)
        assert ep.peer_id and plugin.transport.created == 1
        with pytest.raises(PluginError, match="unknown transport 'carrier-pigeon'"):
            reg.get("carrier-pigeon")
    finally:
        pm.unregister(plugin)


class AlwaysRebalance:
    """A third-party policy: re-plan as soon as any stage is measured at all."""

    name = "eager"

    def decide(self, observation):
        from meshllm.balance import Decision

        measured = [s for s in observation.stages if s.steps]
        return Decision({measured[0].peer: 2.0}, "eager") if measured else None


class PolicyPlugin:
    @hookimpl
    def meshllm_register_balancing_policies(self, register):
        register(AlwaysRebalance())


def test_balancing_policies_registry_has_builtins_and_third_party():
    from meshllm.balance import Observation, StageObservation
    from meshllm.plugins import BalancingPolicyRegistry

    pm = get_plugin_manager(load_entry_points=False)
    plugin = PolicyPlugin()
    pm.register(plugin, name="policy-plugin")
    try:
        reg = BalancingPolicyRegistry(pm)
        assert {"threshold", "none", "eager"} <= set(reg.names())
        assert reg.owner("eager") == "policy-plugin"
        obs = Observation(
            epoch=1,
            age_s=5.0,
            slowdown_threshold=1.5,
            min_steps=1,
            stages=(StageObservation("a", 0, 4, 3, 0.01, 0.01),),
        )
        assert reg.get("eager").decide(obs).factors == {"a": 2.0}
        assert reg.get("none").decide(obs) is None
    finally:
        pm.unregister(plugin)


def test_every_hook_has_a_section_in_the_plugin_guide():
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[2] / "docs" / "plugins.md").read_text()
    specs = [
        n for n, _ in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("meshllm_")
    ]
    for name in specs:
        assert f"### `{name}(register)`" in guide, f"{name} is missing from docs/plugins.md"
        section = guide.split(f"### `{name}(register)`", 1)[1].split("\n### ", 1)[0]
        for part in ("**Purpose:**", "**Parameters:**", "**Result:**", "**When called:**"):
            assert part in section, f"{name}: docs/plugins.md lacks {part}"


def test_the_guides_partitioner_example_works():
    import re
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[2] / "docs" / "plugins.md").read_text()
    code = re.search(r"## Write your own partitioner\n\n```python\n(.*?)```", guide, re.S)
    namespace: dict = {}
    exec(compile(code.group(1), "docs/plugins.md", "exec"), namespace)  # the guide's own code
    pm = get_plugin_manager(load_entry_points=False)

    class Plugin:
        meshllm_register_partitioners = staticmethod(namespace["meshllm_register_partitioners"])

    plugin = Plugin()
    pm.register(plugin, name="guide-example")
    try:
        ranges = PartitionerRegistry(pm).partition("first-heavy", PartitionRequest(30, 4))
        assert [len(r) for r in ranges] == [12, 6, 6, 6]
    finally:
        pm.unregister(plugin)


def test_plugins_command_lists_builtins_and_what_they_register():
    import json

    from click.testing import CliRunner

    from meshllm.cli import cli

    out = CliRunner().invoke(cli, ["plugins", "--json"])
    assert out.exit_code == 0, out.output
    info = json.loads(out.output)
    names = {p["name"]: p for p in info["plugins"]}
    assert names["meshllm.balance"]["kind"] == "built-in"
    assert names["meshllm.balance"]["hooks"] == ["meshllm_register_balancing_policies"]
    assert info["partitioners"]["lp"] == "meshllm.partitioners"
    assert set(info["balancing_policies"]) >= {"threshold", "none"}
    assert "libp2p" in info["transports"]
    table = CliRunner().invoke(cli, ["plugins"]).output
    assert "balancing policies: none (meshllm.balance)" in table
