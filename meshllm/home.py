"""Where a peer keeps its state: ``$MESHLLM_HOME``, default ``~/.meshllm``."""

from __future__ import annotations

import os
from pathlib import Path


def peer_home(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The peer's home directory (not created)."""
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get("MESHLLM_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".meshllm"


def models_dir(home: Path) -> Path:
    return home / "models"
