"""Addresses other devices can dial: a daemon listening on every interface (``0.0.0.0``)
must advertise its real addresses, or join tokens and heartbeats would carry an address no
one can reach."""

from __future__ import annotations

import fcntl
import socket
import struct

_SIOCGIFADDR = 0x8915  # Linux: the IPv4 address of an interface


def local_ipv4s() -> list[str]:
    """This device's IPv4 addresses in interface order, loopback last: another device dialing
    a loopback address would reach itself."""
    found: list[str] = []
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        names = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            try:
                req = struct.pack("256s", name.encode()[:15])
                ip = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)[20:24])
            except OSError:
                continue  # no IPv4 address on this interface
            if ip not in found:
                found.append(ip)
    found.sort(key=lambda ip: ip.startswith("127."))
    return found or ["127.0.0.1"]


def expand_wildcards(addrs: list[str], ips: list[str] | None = None) -> list[str]:
    """Each ``/ip4/0.0.0.0/...`` multiaddr as one address per local IPv4 address."""
    out: list[str] = []
    for addr in addrs:
        if not addr.startswith("/ip4/0.0.0.0/"):
            out.append(addr)
            continue
        rest = addr[len("/ip4/0.0.0.0/") :]
        out.extend(f"/ip4/{ip}/{rest}" for ip in (ips if ips is not None else local_ipv4s()))
    return list(dict.fromkeys(out))
