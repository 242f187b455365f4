"""Peers this home knows about (``peers.json``): bootstrap addresses and learned members.

Kept so that a restarted daemon finds its mesh again without a new join.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PEERS_FILE = "peers.json"


def load_peers(home: Path) -> dict[str, list[str]]:
    """Known addresses keyed by peer id ('' for bootstrap addresses of unknown id)."""
    try:
        raw = json.loads((home / PEERS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    return {
        str(k): [a for a in v if isinstance(a, str)] for k, v in raw.items() if isinstance(v, list)
    }


def save_peers(home: Path, peers: dict[str, list[str]]) -> None:
    tmp = home / (PEERS_FILE + ".tmp")
    tmp.write_text(json.dumps(peers, indent=2, sort_keys=True))
    os.replace(tmp, home / PEERS_FILE)


def add_bootstrap(home: Path, addrs: list[str]) -> None:
    peers = load_peers(home)
    boot = peers.setdefault("", [])
    for a in addrs:
        if a not in boot:
            boot.append(a)
    save_peers(home, peers)


def bootstrap_addrs(home: Path) -> list[str]:
    """Every address worth dialling at start: newest bootstrap first, then learned members."""
    peers = load_peers(home)
    out = list(reversed(peers.get("", [])))
    for pid, addrs in peers.items():
        if pid:
            out.extend(a for a in addrs if a not in out)
    return out
