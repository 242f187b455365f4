"""The example plugins (plugins/) in a running mesh: real daemons, real libp2p, the real SmolLM2.

The plugins are installed packages (tools/setup.sh), found by every daemon through the
``meshllm`` entry-point group like any third-party plugin. Two meshes of 3 peers, one per
configuration: every peer on the ``libp2p-zlib`` transport, and a plan made by the ``speed``
partitioner. Either way greedy answers must be the monolithic model's, token for token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from meshllm_speed_partitioner import SpeedPartitioner

from meshllm import testbed
from meshllm.config import CONFIG_FILE, load_config
from meshllm.device import probe_ranges
from meshllm.model.manifest import Manifest
from meshllm.pipeline.profiling import (
    end_bytes_of,
    median_layer_bytes,
    partition_request,
    probe_dir,
)
from meshllm.plan.profile import Profile
from tests.integration.mesh_helpers import (
    cli,
    cli_status,
    link_model,
    monolithic,
    query,
    restart,
    status,
)

pytestmark = pytest.mark.real_model
PROMPT = "Name three colours of the rainbow."
CAPPED_MIB = 320  # one peer's memory: less its daemon's own (~180 MiB) about 7 of the 30 layers


@pytest.fixture(scope="module")
def expected(smollm_models) -> list[int]:
    return monolithic(smollm_models["int4"], PROMPT)


@pytest.fixture(scope="class")
def zlib_mesh(smollm_models, tmp_path_factory):
    model = smollm_models["int4"]
    root = tmp_path_factory.mktemp("zlibmesh")
    peers = testbed.up(root, 3, transport="libp2p-zlib")
    homes = [Path(p.home) for p in peers]
    try:
        link_model(model, homes[0])  # advertised within seconds; serve retries meanwhile
        # Even split, so every peer runs a stage; the leader still profiles every peer for
        # the balancer, so link probes travel compressed too.
        cli(
            homes[-1], "serve", model.name, "--partitioner", "even", "--timeout", "280", timeout=300
        )
        yield homes
    finally:
        testbed.down(root)


class TestZlibTransport:
    """Class-scoped meshes: this one stops before the next starts (2 cores)."""

    def test_zlib_mesh_answers_like_the_whole_model(self, zlib_mesh, expected) -> None:
        for home in zlib_mesh:
            assert load_config(home / CONFIG_FILE).mesh.transport == "libp2p-zlib"
            assert query(home, PROMPT)["token_ids"] == expected, home.name

    def test_traffic_went_through_the_compressor(self, zlib_mesh) -> None:
        totals = {"sent_raw": 0, "sent_wire": 0}
        for home in zlib_mesh:
            st = cli_status(home)  # the CLI's own `status --json`
            assert st["transport"] == "libp2p-zlib"
            stats = st["transport_stats"]
            assert stats["compression"] == "zlib" and stats["streams"] > 0
            # Every peer runs a stage: it received activations (or tokens) and sent some on.
            assert stats["received_raw"] > 0 and stats["sent_raw"] > 0
            for key in totals:
                totals[key] += stats[key]
            print(f"\n{home.name}: {stats}")
        # The source sent the others their segments (megabytes) through it; probes of zeros
        # and int4 weights compress, float32 activations hardly: in all, fewer wire bytes.
        assert totals["sent_raw"] > 10 << 20
        assert totals["sent_wire"] < totals["sent_raw"]


@pytest.fixture(scope="class")
def speed_mesh(smollm_models, tmp_path_factory):
    model = smollm_models["int4"]
    root = tmp_path_factory.mktemp("speedmesh")
    peers = testbed.up(root, 3)
    homes = [Path(p.home) for p in peers]
    try:
        link_model(model, homes[0])
        # One peer offers little memory: the plan must give it fewer layers than its speed
        # alone would, and share the rest out by speed.
        testbed.set_config_keys(homes[1], "peer", {"memory_limit_mb": str(CAPPED_MIB)})
        restart(root, peers, 1)
        testbed.wait_for_mesh(homes, timeout=30)
        # --balance none: the plan stays the plugin's (the balancer re-plans with lp).
        out = cli(
            homes[2],
            "serve",
            model.name,
            "--partitioner",
            "speed",
            "--balance",
            "none",
            "--timeout",
            "280",
            "--json",
            timeout=300,
        )
        yield {"model": model, "homes": homes, "serve": json.loads(out.stdout)}
    finally:
        testbed.down(root)


class TestSpeedPartitioner:
    def test_plan_comes_from_the_plugin(self, speed_mesh) -> None:
        homes, model = speed_mesh["homes"], speed_mesh["model"]
        st = cli_status(homes[0])
        plan = st["serving"]["plan"]
        assert plan == speed_mesh["serve"]["plan"] and plan["partitioner"] == "speed"
        # The leader's request, rebuilt from every peer's profile as status shows it and the same
        # model files: the plugin, asked again, gives exactly the plan's ranges.
        profiles = {pid: Profile.from_obj(obj) for pid, obj in st["serving"]["profiles"].items()}
        workers = sorted(profiles)
        assert len(workers) == 3
        manifest = Manifest.read(model.path)
        ranges = probe_ranges(manifest.architecture.num_layers, median_layer_bytes(manifest))
        sha = manifest.model_sha256
        ends = end_bytes_of(
            manifest, {k: probe_dir(homes[0], sha, a, b) for k, (a, b) in ranges.items()}
        )
        config = load_config(homes[0] / CONFIG_FILE)
        request = partition_request(workers, profiles, manifest, ends, config)
        again = SpeedPartitioner().partition(request)
        assert [
            [w, r.start, r.stop] for w, r in zip(workers, again, strict=True) if r is not None
        ] == plan["stages"]
        # And the memory cap shaped it: the capped peer holds fewer layers than an even third.
        capped = status(homes[1])["self"]["id"]
        (stage,) = [s for s in plan["stages"] if s[0] == capped]
        assert profiles[capped].memory_bytes == CAPPED_MIB << 20
        print(
            f"\nspeed plan {plan['stages']}, layer ms",
            {w[:12]: round(p.layer_s * 1e3, 3) for w, p in profiles.items()},
        )
        assert stage[2] - stage[1] < 10

    def test_speed_mesh_answers_like_the_whole_model(self, speed_mesh, expected) -> None:
        for home in speed_mesh["homes"]:
            assert query(home, PROMPT)["token_ids"] == expected, home.name
