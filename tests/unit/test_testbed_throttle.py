"""`testbed throttle`: one emulated phone's CPU quota, changed while the testbed runs.

No root needed: the testbed is a record (testbed.json) whose cgroups are plain directories
under tmp_path, as tests/unit/test_netbed.py does for set_cpu_quota; root is monkeypatched
where the code checks it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from meshllm import cgroups, netbed, testbed, testbed_profile
from meshllm.cli import main
from meshllm.testbed_profile import CFS_PERIOD_US
from tests.integration.mesh_helpers import cli

PROFILE = """
[class.phone]
cpu = 1.0
bandwidth_mbit = 400
memory_mb = 2048

[class.budget]
cpu = 0.25
bandwidth_mbit = 20
memory_mb = 384

[[peer]]
class = "phone"

[[peer]]
class = "phone"
name = "pixel"

[[peer]]
class = "budget"
"""


@pytest.fixture
def phones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A recorded 3-phone testbed with fake cgroup directories; as root, on a 2-core host."""
    root = tmp_path / "tb"
    root.mkdir()
    source = tmp_path / "phones.toml"
    source.write_text(PROFILE)
    prof = testbed_profile.load_profile(source)
    net = netbed.plan(root, prof, cpu_mount=tmp_path / "cg", memory_mount=tmp_path / "mem")
    monkeypatch.setattr(cgroups, "host_cpus", lambda: 2)
    for p in net.peers:
        Path(p.cgroup).mkdir(parents=True)
        netbed.set_cpu_quota(p, p.cpu)  # as `up` leaves them
    # pid 0 never names a running daemon: nothing here is ever signalled.
    peers = [
        testbed.TestbedPeer(
            p.index, str(root / f"peer-{p.index}"), 0, p.device_class, p.netns, p.address
        )
        for p in net.peers
    ]
    testbed.save_state(
        root, peers, network=net.to_json(), profile=testbed.profile_record(source, prof)
    )
    monkeypatch.setattr(testbed.os, "geteuid", lambda: 0)
    return root


def _quota(root: Path, index: int) -> str:
    net = testbed.load_network(root)
    assert net is not None
    return (Path(net.peers[index].cgroup) / "cpu.cfs_quota_us").read_text()


def test_throttle_sets_the_quota_and_records_it(phones):
    done = testbed.throttle(phones, 1, 0.25)
    assert done["index"] == 1 and done["name"] == "pixel" and done["class"] == "phone"
    assert done["previous_cpu"] == 1.0 and done["cpu"] == 0.25
    assert done["quota_us"] == 1000 and done["period_us"] == CFS_PERIOD_US
    assert _quota(phones, 1) == "1000"
    net = testbed.load_network(phones)
    assert net is not None
    assert [p.cpu for p in net.peers] == [1.0, 0.25, 0.25]
    # Everything else of the record is kept: the peers, the profile, the rest of the network.
    assert len(testbed.load_state(phones)) == 3
    assert testbed.load_raw(phones)["profile"]["peers"][1]["name"] == "pixel"
    assert net.peers[1].netns.endswith("-p1") and net.peers[1].bandwidth_mbit == 400


@pytest.mark.parametrize("cpu", [None, 0.0, 2.0, 8.0])
def test_none_zero_or_all_cores_remove_the_quota(phones, cpu):
    done = testbed.throttle(phones, 2, cpu)
    assert done["cpu"] is None and done["quota_us"] == -1 and done["previous_cpu"] == 0.25
    assert _quota(phones, 2) == "-1"
    # and back: a later throttle starts from "no quota"
    again = testbed.throttle(phones, 2, 0.5)
    assert again["previous_cpu"] is None and again["cpu"] == 0.5 and _quota(phones, 2) == "2000"


@pytest.mark.parametrize(("peer", "index"), [(0, 0), ("0", 0), ("peer-2", 2), ("pixel", 1)])
def test_a_peer_is_named_by_index_label_or_profile_name(phones, peer, index):
    assert testbed.throttle(phones, peer, 0.5)["index"] == index


@pytest.mark.parametrize("peer", [3, -1, "peer-7", "nokia", ""])
def test_an_unknown_peer_is_refused_listing_the_known_ones(phones, peer):
    with pytest.raises(testbed.TestbedError) as err:
        testbed.throttle(phones, peer, 0.5)
    assert f"unknown peer {peer!r}: give an index 0-2" in str(err.value)
    assert "peer-0, pixel, peer-2" in str(err.value)


@pytest.mark.parametrize("cpu", [0.1, 0.249])
def test_a_quota_under_the_kernel_minimum_is_refused(phones, cpu):
    with pytest.raises(testbed.TestbedError, match=r"at least 0\.25 core .* or none / 0"):
        testbed.throttle(phones, 0, cpu)
    assert _quota(phones, 0) == "4000"  # unchanged


@pytest.mark.parametrize("cpu", [-1.0, float("nan"), float("inf")])
def test_a_cpu_that_is_no_number_of_cores_is_refused(phones, cpu):
    with pytest.raises(testbed.TestbedError, match="cpu must be a number of cores"):
        testbed.throttle(phones, 0, cpu)


def test_without_root_it_refuses_and_changes_nothing(phones, monkeypatch):
    monkeypatch.setattr(testbed.os, "geteuid", lambda: 1000)
    with pytest.raises(testbed.TestbedError, match=r"run it as root \(sudo\)"):
        testbed.throttle(phones, 0, 0.5)
    assert _quota(phones, 0) == "4000"
    net = testbed.load_network(phones)
    assert net is not None and net.peers[0].cpu == 1.0


def test_a_cgroup_that_is_gone_is_a_clear_error(phones):
    net = testbed.load_network(phones)
    assert net is not None
    for f in Path(net.peers[0].cgroup).iterdir():
        f.unlink()
    Path(net.peers[0].cgroup).rmdir()
    with pytest.raises(testbed.TestbedError, match="cannot set the CPU quota"):
        testbed.throttle(phones, 0, 0.5)


def test_a_loopback_testbed_cannot_be_throttled(tmp_path):
    root = tmp_path / "tb"
    root.mkdir()
    testbed.save_state(root, [testbed.TestbedPeer(0, str(root / "peer-0"), 0)])
    with pytest.raises(testbed.TestbedError, match="throttle needs a testbed started with "):
        testbed.throttle(root, 0, 0.5)
    res = cli(None, "testbed", "throttle", "0", "0.5", "--dir", str(root), check=False)
    assert res.returncode == 1 and "throttle needs a testbed started with --profile" in res.stderr
    assert "Traceback" not in res.stderr


def test_no_testbed_at_all_is_a_clear_error(tmp_path):
    with pytest.raises(testbed.TestbedError, match="no testbed in"):
        testbed.throttle(tmp_path, 0, 0.5)


def _run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The real entry point in this process, so the monkeypatched root and cgroups apply."""
    monkeypatch.setattr(sys, "argv", ["meshllm", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_cli_throttles_and_status_shows_the_new_cpu(phones, monkeypatch, capsys):
    code, out, _ = _run_cli(
        monkeypatch, capsys, "testbed", "throttle", "pixel", "0.25", "--dir", str(phones)
    )
    assert code == 0
    assert out.strip() == (
        "peer-1 (pixel, phone): cpu 1 core -> 0.25 core (quota 1000 µs per 4000 µs)"
    )
    code, out, _ = _run_cli(
        monkeypatch, capsys, "testbed", "throttle", "2", "none", "--dir", str(phones)
    )
    assert code == 0 and out.strip() == "peer-2 (peer-2, budget): cpu 0.25 core -> no quota"
    # status reads the record (the daemons are not running here: each row says so)
    code, out, _ = _run_cli(monkeypatch, capsys, "testbed", "status", "--dir", str(phones))
    rows = out.splitlines()
    assert code == 0 and "CPU" in rows[0]
    assert [r.split()[3] for r in rows[1:]] == ["1", "0.25", "none"]
    code, out, _ = _run_cli(
        monkeypatch, capsys, "testbed", "status", "--json", "--dir", str(phones)
    )
    assert [e["cpu"] for e in json.loads(out)] == [1.0, 0.25, None]


@pytest.mark.parametrize(
    ("cpu", "message"),
    [
        ("fast", "'fast' is not a number of cores (e.g. 0.25) or none"),
        ("0.1", "cpu must be at least 0.25 core"),
    ],
)
def test_the_cli_refuses_a_bad_cpu(phones, monkeypatch, capsys, cpu, message):
    code, _, err = _run_cli(
        monkeypatch, capsys, "testbed", "throttle", "0", cpu, "--dir", str(phones)
    )
    assert code != 0 and message in err and "Traceback" not in err
    assert _quota(phones, 0) == "4000"
