"""The phone testbed's pure parts: profiles, names and addresses, refusals, config edits.

Nothing here needs root or touches the host's network; tests/integration/test_testbed_phones.py
builds a real one."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from meshllm import cgroups, netbed, testbed, testbed_profile
from meshllm.commands.peer import init_home
from meshllm.config import load_config
from tests.integration.mesh_helpers import cli

REPO = Path(__file__).resolve().parents[2]
PHONES = REPO / "configs" / "testbed" / "phones.toml"

GOOD = """
[class.fast]
cpu = 1
bandwidth_mbit = 400
memory_mb = 1024

[class.slow]
cpu = 0.25
bandwidth_mbit = 20.5
memory_mb = 384

[[peer]]
class = "fast"

[[peer]]
class = "slow"
name = "old-phone"
"""


def test_the_shipped_phones_profile_parses():
    prof = testbed_profile.load_profile(PHONES)
    assert [p.device_class.name for p in prof.peers] == [
        "flagship",
        "midrange",
        "midrange",
        "budget",
    ]
    classes = {c.name: c for c in prof.classes}
    assert classes["flagship"] == testbed_profile.DeviceClass("flagship", 1.0, 400.0, 1024)
    assert classes["midrange"].cpu == 0.5
    assert classes["budget"] == testbed_profile.DeviceClass("budget", 0.25, 20.0, 384)
    assert [p.name for p in prof.peers] == ["peer-0", "peer-1", "peer-2", "peer-3"]


def test_a_profile_decodes_into_typed_values():
    prof = testbed_profile.parse_profile(GOOD, "good.toml")
    fast, slow = (p.device_class for p in prof.peers)
    assert isinstance(fast.cpu, float) and fast.cpu == 1.0
    assert slow.bandwidth_mbit == 20.5 and slow.memory_mb == 384
    assert prof.peers[1].name == "old-phone"
    assert fast.stages and slow.stages  # run layers unless a class says otherwise
    files = testbed_profile.parse_profile(
        GOOD.replace("memory_mb = 1024", "memory_mb = 0\nstages = false")
    )
    assert not files.peers[0].device_class.stages


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("memory_mb = 1024", "memory_mb = 1024\nram = 3"), "class.fast: unknown key 'ram'"),
        (('class = "fast"', 'class = "fast"\nspeed = 1'), "peer[0]: unknown key 'speed'"),
        (("[class.fast]", "colour = 1\n[class.fast]"), "top level: unknown key 'colour'"),
        (('class = "fast"', 'class = "turbo"'), "peer[0].class: unknown class 'turbo'"),
        (('class = "fast"', "class = 3"), 'peer[0]: needs class = "NAME"'),
        (("cpu = 0.25", 'cpu = "fast"'), "class.slow.cpu: expected a number, got 'fast'"),
        (("cpu = 0.25", "cpu = 0.05"), "class.slow.cpu: must be between 0.25 and 1024"),
        (("cpu = 0.25", "cpu = true"), "class.slow.cpu: expected a number"),
        (("cpu = 0.25", "cpu = nan"), "class.slow.cpu: expected a number"),
        (("bandwidth_mbit = 400", "bandwidth_mbit = 0"), "class.fast.bandwidth_mbit: must be"),
        (("bandwidth_mbit = 400", "bandwidth_mbit = -5"), "class.fast.bandwidth_mbit: must be"),
        (("memory_mb = 384", "memory_mb = 1.5"), "class.slow.memory_mb: expected an integer"),
        (("memory_mb = 384", "memory_mb = -1"), "class.slow.memory_mb: must be between 0"),
        (("memory_mb = 384\n", ""), "class.slow: missing key 'memory_mb'"),
        (("memory_mb = 384", "memory_mb = 384\nstages = 0"), "class.slow.stages: expected true"),
        (('name = "old-phone"', 'name = ""'), "peer[1].name: expected a non-empty string"),
        (("[class.fast]", "[class.fast"), "not valid TOML"),
    ],
)
def test_bad_profiles_are_refused_naming_file_and_key(edit, message):
    old, new = edit
    assert old in GOOD
    with pytest.raises(testbed_profile.TestbedProfileError) as err:
        testbed_profile.parse_profile(GOOD.replace(old, new, 1), "bad.toml")
    assert str(err.value).startswith("bad.toml: ")
    assert message in str(err.value)


def test_a_profile_needs_classes_and_peers(tmp_path):
    bad = testbed_profile.TestbedProfileError
    with pytest.raises(bad, match=r"define at least one \[class.NAME\]"):
        testbed_profile.parse_profile('[[peer]]\nclass = "x"\n')
    with pytest.raises(testbed_profile.TestbedProfileError, match="no peers"):
        testbed_profile.parse_profile(GOOD.split("[[peer]]")[0])
    with pytest.raises(testbed_profile.TestbedProfileError, match="at most 64"):
        testbed_profile.parse_profile(GOOD + '[[peer]]\nclass = "slow"\n' * 63)
    with pytest.raises(testbed_profile.TestbedProfileError, match="cannot read profile"):
        testbed_profile.load_profile(tmp_path / "missing.toml")


def _big_profile(n: int = testbed_profile.MAX_PEERS) -> testbed_profile.TestbedProfile:
    text = GOOD.split("[[peer]]")[0] + '[[peer]]\nclass = "fast"\n' * n
    return testbed_profile.parse_profile(text)


def test_names_fit_linux_limits_and_addresses_share_one_private_subnet(tmp_path):
    net = netbed.plan(tmp_path / "tb", _big_profile(), cpu_mount=Path("/cg/cpu"))
    subnet = ipaddress.ip_network(net.subnet)
    assert subnet.is_private and subnet.prefixlen == 24
    assert len(net.bridge) <= 15
    for p in net.peers:
        assert len(p.veth_peer) <= 15 and len(p.veth_hub) <= 15
        assert p.veth_hub.startswith(net.prefix) and p.netns.startswith(net.prefix)
        assert ipaddress.ip_address(p.address) in subnet
        assert p.listen == f"/ip4/{p.address}/tcp/0"
        assert p.cgroup == f"/cg/cpu/meshllm-testbed/{net.prefix}/p{p.index}"
    assert len({p.address for p in net.peers}) == len(net.peers)
    assert len({p.netns for p in net.peers} | {net.hub_netns}) == len(net.peers) + 1
    assert len({p.veth_hub for p in net.peers} | {net.bridge}) == len(net.peers) + 1
    assert net.peers[0].address.endswith(".1")


def test_names_are_stable_per_directory_and_distinct_between_directories(tmp_path):
    prof = _big_profile(3)
    a = netbed.plan(tmp_path / "a", prof, cpu_mount=Path("/cg"))
    assert netbed.plan(tmp_path / "a", prof, cpu_mount=Path("/cg")) == a
    # The same directory, spelled differently, is the same testbed.
    assert netbed.plan(tmp_path / "x" / ".." / "a", prof, cpu_mount=Path("/cg")) == a
    b = netbed.plan(tmp_path / "b", prof, cpu_mount=Path("/cg"))
    assert a.prefix != b.prefix and a.cgroup_dir != b.cgroup_dir
    assert not _names(a) & _names(b)


def _names(net: netbed.Netbed) -> set[str]:
    return {net.hub_netns, net.bridge, *(x for p in net.peers for x in (p.netns, p.veth_hub))}


def test_the_plan_round_trips_through_the_state_file(tmp_path):
    net = netbed.plan(tmp_path, _big_profile(2), cpu_mount=Path("/cg"))
    assert netbed.Netbed.from_json(net.to_json()) == net


def test_without_root_it_refuses_saying_why_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(netbed.os, "geteuid", lambda: 1000)
    root = tmp_path / "tb"
    with pytest.raises(testbed.TestbedError) as err:
        testbed.up(root, profile=PHONES)
    msg = str(err.value)
    assert "must run as root" in msg and "sudo" in msg and "leave out --profile" in msg
    assert not root.exists()


def test_missing_tools_and_cgroup_v1_are_named(monkeypatch):
    monkeypatch.setattr(netbed.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netbed, "find_tool", lambda name: None if name == "tc" else "/sbin/" + name)
    monkeypatch.setattr(cgroups, "find_mount", lambda controller: None)
    with pytest.raises(testbed.TestbedError) as err:
        netbed.check_host()
    msg = str(err.value)
    assert "`tc` not found: install iproute2" in msg and "`ip`" not in msg
    assert "no cgroup v1 `cpu` controller" in msg and "must run as root" not in msg
    assert "no cgroup v1 `memory` controller" in msg


def test_peers_and_a_conflicting_profile_are_an_error(tmp_path):
    with pytest.raises(testbed.TestbedError, match="--peers 2 conflicts with the profile"):
        testbed.up(tmp_path / "tb", 2, profile=PHONES)
    res = cli(
        None,
        "testbed",
        "up",
        "--dir",
        str(tmp_path / "tb"),
        "--peers",
        "2",
        "--profile",
        str(PHONES),
        check=False,
    )
    assert res.returncode == 1 and "conflicts with the profile" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "tb").exists()


def test_peer_config_gets_namespace_address_and_class_memory(tmp_path):
    home = tmp_path / "p"
    init_home(home, name="p", token=None)
    for memory in (384, 1024):  # a second run (a re-used home) rewrites, never duplicates
        testbed.set_peer_config(home, listen="/ip4/10.213.7.2/tcp/0", memory_limit_mb=memory)
        cfg = load_config(home / "config.toml")
        assert cfg.peer.listen == ("/ip4/10.213.7.2/tcp/0",)
        assert cfg.peer.memory_limit_mb == memory and cfg.peer.name == "p"
    text = (home / "config.toml").read_text()
    assert text.count("memory_limit_mb") == 1 and text.startswith("# meshllm peer configuration")


def test_config_keys_of_another_section_are_set_in_place(tmp_path):
    home = tmp_path / "p"
    init_home(home, name="p", token=None)
    for name in ("libp2p-zlib", "memory"):  # a re-used home: replaced, never duplicated
        testbed.set_config_keys(home, "mesh", {"transport": f'"{name}"'})
        assert load_config(home / "config.toml").mesh.transport == name
    text = (home / "config.toml").read_text()
    assert text.count("transport =") == 1 and load_config(home / "config.toml").peer.name == "p"


def test_an_unknown_transport_is_refused_before_any_peer_starts(tmp_path):
    from meshllm.errors import PluginError

    with pytest.raises(PluginError, match="unknown transport 'carrier-pigeon'; available: "):
        testbed.up(tmp_path / "tb", 2, transport="carrier-pigeon")
    assert not (tmp_path / "tb").exists()


def test_cpu_quota_is_cores_times_a_4ms_period(tmp_path, monkeypatch):
    monkeypatch.setattr(cgroups, "host_cpus", lambda: 2)
    cg = tmp_path / "cg"
    cg.mkdir()
    peer = netbed.plan(tmp_path, _big_profile(1), cpu_mount=tmp_path).peers[0]
    peer = netbed.NetPeer(**{**peer.__dict__, "cgroup": str(cg)})
    for cpu, quota in ((0.25, 1000), (0.5, 2000), (1.0, 4000), (1.5, 6000), (2.0, -1)):
        assert netbed.set_cpu_quota(peer, cpu) == quota
        assert (cg / "cpu.cfs_quota_us").read_text() == str(quota)
        assert (cg / "cpu.cfs_period_us").read_text() == "4000"
    with pytest.raises(testbed.TestbedError, match=r"at least 0\.25 core"):
        netbed.set_cpu_quota(peer, 0.05)


def test_memory_limit_is_the_class_memory_with_no_swap_and_usage_reads_back(tmp_path):
    cg = tmp_path / "mem"
    cg.mkdir()
    for name in ("memory.memsw.limit_in_bytes", "memory.limit_in_bytes", "memory.swappiness"):
        (cg / name).write_text("9223372036854771712")
    peer = netbed.plan(tmp_path, _big_profile(1), memory_mount=tmp_path).peers[0]
    peer = netbed.NetPeer(**{**peer.__dict__, "memory_cgroup": str(cg)})
    assert netbed.set_memory_limit(peer, 640) == 640 << 20
    assert (cg / "memory.limit_in_bytes").read_text() == str(640 << 20)
    assert (cg / "memory.memsw.limit_in_bytes").read_text() == str(640 << 20)  # no swap
    assert (cg / "memory.swappiness").read_text() == "0"
    (cg / "memory.max_usage_in_bytes").write_text("123456\n")
    (cg / "memory.usage_in_bytes").write_text("1000\n")
    (cg / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (cg / "memory.stat").write_text("cache 4096\nrss 512\ntotal_cache 4096\ntotal_rss 800\n")
    assert netbed.memory_usage(peer) == {
        "memory_limit_bytes": 640 << 20,
        "memory_peak_bytes": 123456,
        "memory_bytes": 1000,
        "memory_anon_bytes": 800,
        "oom_kills": 2,
    }
    # 0 MiB: what the host has, no cap (the kernel's "unlimited" reads back as None).
    assert netbed.set_memory_limit(peer, 0) == -1
    (cg / "memory.limit_in_bytes").write_text("9223372036854771712")
    assert netbed.memory_usage(peer)["memory_limit_bytes"] is None
    # A testbed recorded before peers had memory cgroups: nothing to read, no error.
    old = netbed.NetPeer(**{**peer.__dict__, "memory_cgroup": ""})
    assert set(netbed.memory_usage(old).values()) == {None}
    assert netbed.peer_command(old, ["x"])[4:6] == [old.cgroup, old.cgroup]


def test_down_of_a_phone_testbed_needs_root_and_keeps_the_record(tmp_path, monkeypatch):
    root = tmp_path / "tb"
    root.mkdir()
    net = netbed.plan(root, _big_profile(2), cpu_mount=Path("/cg"))
    testbed.save_state(root, [], network=net.to_json())
    assert testbed.load_network(root) == net
    monkeypatch.setattr(netbed.os, "geteuid", lambda: 1000)
    with pytest.raises(testbed.TestbedError, match="must run as root"):
        testbed.down(root)
    assert testbed.load_network(root) == net  # nothing forgotten: `sudo ... down` still cleans


def test_netns_command_prefers_nsenter_which_keeps_sys_fs_cgroup(monkeypatch):
    monkeypatch.setattr(netbed, "find_tool", lambda name: f"/usr/bin/{name}")
    assert netbed.netns_command("mltab-p0", ["x", "-y"]) == [
        "/usr/bin/nsenter",
        "--net=/var/run/netns/mltab-p0",
        "--",
        "x",
        "-y",
    ]
    monkeypatch.setattr(
        netbed, "find_tool", lambda name: None if name == "nsenter" else f"/b/{name}"
    )
    assert netbed.netns_command("mltab-p0", ["x"]) == ["/b/ip", "netns", "exec", "mltab-p0", "x"]


def test_peer_command_joins_the_cgroup_first_and_stays_one_process(tmp_path, monkeypatch):
    """The wrapper's shell part, without root: a plain file stands in for cgroup.procs."""
    import subprocess

    monkeypatch.setattr(netbed, "netns_command", lambda _ns, argv: list(argv))
    peer = netbed.plan(tmp_path, _big_profile(1), cpu_mount=tmp_path).peers[0]
    (tmp_path / "mem").mkdir()
    peer = netbed.NetPeer(
        **{**peer.__dict__, "cgroup": str(tmp_path), "memory_cgroup": str(tmp_path / "mem")}
    )
    argv = netbed.peer_command(
        peer, ["/bin/sh", "-c", "echo $$; cat cgroup.procs; cat mem/cgroup.procs"]
    )
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=10)
    # The command runs as the very process started (so `down` signals the daemon itself), and
    # that pid was in both cgroups before the command's first instruction.
    assert out.split() == [str(proc.pid)] * 3
