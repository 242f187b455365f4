"""Testbed profiles: the device classes of emulated phones, read from a TOML file.

``meshllm testbed up --profile FILE`` takes one (``configs/testbed/phones.toml`` is shipped)::

    [class.budget]
    cpu = 0.25            # cores
    bandwidth_mbit = 20   # each way
    memory_mb = 384       # the phone's memory, a cap: the peer's [peer] memory_limit_mb
    stages = true         # optional; false: [peer] stages = false (a laptop that holds files)

    [[peer]]              # one per device, in start (and pipeline) order
    class = "budget"
    name = "budget-1"     # optional

Plain data and its checks; :mod:`meshllm.netbed` builds the namespaces and cgroups from it.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshllm.errors import MeshError

MAX_PEERS = 64  # as `testbed up --peers`; a /24 would allow 253
# 4 ms rather than the kernel's default 100 ms: a quota is enforced per period, so a throttled
# peer runs flat out until its quota is spent and then stalls for the rest of the period. With
# 100 ms a 0.25-core peer would run 25 ms and stall 75 ms; with 10 ms a short decode step (a
# couple of ms) after an idle spell would still run at full speed, so in a pipeline, where
# each peer idles while the others compute, a "slow" phone would not look slow at all
# (measured: planner predictions 40-50% off at 10 ms). At 4 ms a burst is at most 1 ms at a
# quarter core, and every step of a millisecond or more sees a slower device. The kernel
# refuses quotas under 1 ms, so 4 ms is the shortest period that still allows 0.25 core.
CFS_PERIOD_US = 4_000
MIN_QUOTA_US = 1_000  # the kernel refuses CFS quotas below 1 ms
MIN_CPU = MIN_QUOTA_US / CFS_PERIOD_US  # hence at least 0.25 core at a 4 ms period


class TestbedError(MeshError):
    """A testbed that cannot be built, run or removed, with the reason."""


class TestbedProfileError(TestbedError):
    """A testbed profile file that cannot be used, with the file and key at fault."""


# --- profiles -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceClass:
    """A kind of device: its CPU share, link rate and the memory the planner may count on."""

    name: str
    cpu: float  # cores: the cgroup's CFS quota is cpu * period
    bandwidth_mbit: float  # Mbit/s, each way
    memory_mb: int  # the peer's [peer] memory_limit_mb (0: what the host reports)
    stages: bool = True  # the peer's [peer] stages: False runs no layers, only serves files


@dataclass(frozen=True)
class ProfilePeer:
    name: str
    device_class: DeviceClass


@dataclass(frozen=True)
class TestbedProfile:
    source: str
    classes: tuple[DeviceClass, ...]
    peers: tuple[ProfilePeer, ...]  # in start (and pipeline) order


_CLASS_KEYS = ("bandwidth_mbit", "cpu", "memory_mb")
_CLASS_OPTIONAL = ("stages",)
_PEER_KEYS = ("class", "name")
_TOP_KEYS = ("class", "peer")


def _check_keys(table: dict[str, Any], known: Sequence[str], where: str) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise TestbedProfileError(
            f"{where}: unknown key {unknown[0]!r} (known: {', '.join(known)})"
        )


def _number(value: Any, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise TestbedProfileError(f"{where}: expected a number, got {value!r}")
    if not low <= value <= high:
        raise TestbedProfileError(f"{where}: must be between {low:g} and {high:g}, not {value!r}")
    return float(value)


def _integer(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TestbedProfileError(f"{where}: expected an integer, got {value!r}")
    if not low <= value <= high:
        raise TestbedProfileError(f"{where}: must be between {low} and {high}, not {value!r}")
    return value


def _parse_class(name: str, table: Any) -> DeviceClass:
    where = f"class.{name}"
    if not isinstance(table, dict):
        raise TestbedProfileError(f"{where}: expected a table ([class.{name}])")
    _check_keys(table, (*_CLASS_KEYS, *_CLASS_OPTIONAL), where)
    missing = [k for k in _CLASS_KEYS if k not in table]
    if missing:
        raise TestbedProfileError(f"{where}: missing key {missing[0]!r}")
    stages = table.get("stages", True)
    if not isinstance(stages, bool):
        raise TestbedProfileError(f"{where}.stages: expected true or false, got {stages!r}")
    return DeviceClass(
        name=name,
        cpu=_number(table["cpu"], f"{where}.cpu", MIN_CPU, 1024),
        bandwidth_mbit=_number(table["bandwidth_mbit"], f"{where}.bandwidth_mbit", 0.1, 100_000),
        memory_mb=_integer(table["memory_mb"], f"{where}.memory_mb", 0, 1 << 24),
        stages=stages,
    )


def parse_profile(text: str, source: str = "profile") -> TestbedProfile:
    """Decode a profile's TOML; every error names the file and the key at fault."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TestbedProfileError(f"{source}: not valid TOML: {exc}") from None
    try:
        _check_keys(raw, _TOP_KEYS, "top level")
        classes_raw = raw.get("class")
        if not isinstance(classes_raw, dict) or not classes_raw:
            raise TestbedProfileError("no device classes: define at least one [class.NAME] table")
        classes = {name: _parse_class(name, table) for name, table in classes_raw.items()}
        peers_raw = raw.get("peer")
        if not isinstance(peers_raw, list) or not peers_raw:
            raise TestbedProfileError("no peers: add one [[peer]] table per device, in start order")
        if len(peers_raw) > MAX_PEERS:
            raise TestbedProfileError(f"{len(peers_raw)} peers: at most {MAX_PEERS}")
        peers = []
        for i, table in enumerate(peers_raw):
            where = f"peer[{i}]"
            if not isinstance(table, dict):
                raise TestbedProfileError(f"{where}: expected a [[peer]] table")
            _check_keys(table, _PEER_KEYS, where)
            cls = table.get("class")
            if not isinstance(cls, str):
                raise TestbedProfileError(
                    f'{where}: needs class = "NAME" (one of {", ".join(classes)})'
                )
            if cls not in classes:
                raise TestbedProfileError(
                    f"{where}.class: unknown class {cls!r} (defined: {', '.join(classes)})"
                )
            name = table.get("name", f"peer-{i}")
            if not isinstance(name, str) or not name.strip():
                raise TestbedProfileError(
                    f"{where}.name: expected a non-empty string, got {name!r}"
                )
            peers.append(ProfilePeer(name, classes[cls]))
    except TestbedProfileError as exc:
        raise TestbedProfileError(f"{source}: {exc}") from None
    return TestbedProfile(source, tuple(classes.values()), tuple(peers))


def load_profile(path: Path) -> TestbedProfile:
    try:
        text = path.read_text()
    except OSError as exc:
        raise TestbedProfileError(f"cannot read profile {path}: {exc.strerror}") from None
    return parse_profile(text, str(path))
