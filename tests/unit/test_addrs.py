"""A daemon listening on every interface advertises addresses others can dial."""

from __future__ import annotations

from meshllm.mesh.addrs import expand_wildcards, local_ipv4s


def test_local_addresses_include_loopback_last():
    ips = local_ipv4s()
    assert "127.0.0.1" in ips and "0.0.0.0" not in ips
    assert all(not ip.startswith("127.") for ip in ips[: ips.index("127.0.0.1")])


def test_wildcard_listen_addresses_become_one_per_local_address():
    addrs = ["/ip4/0.0.0.0/tcp/4001/p2p/Qm", "/ip4/10.0.0.5/tcp/4002/p2p/Qm"]
    out = expand_wildcards(addrs, ips=["192.168.1.7", "127.0.0.1"])
    assert out == [
        "/ip4/192.168.1.7/tcp/4001/p2p/Qm",
        "/ip4/127.0.0.1/tcp/4001/p2p/Qm",
        "/ip4/10.0.0.5/tcp/4002/p2p/Qm",
    ]
    assert expand_wildcards(["/ip4/0.0.0.0/tcp/1"]) != []  # with this machine's addresses
