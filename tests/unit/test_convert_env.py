"""The model builder runs without sight of this checkout's git history.

The onnxruntime-genai builder stamps each graph with the commit of the git checkout its own
files sit in. With the virtual environment inside this repository that was our HEAD, so the
same source converted to a different model.onnx (and model hash) after every commit.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from meshllm.model.convert import builder_env

REPO = Path(__file__).resolve().parents[2]


def _head(env: dict[str, str] | None, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_the_builder_cannot_read_the_checkouts_commit(tmp_path):
    # A checkout of our own (the test must not depend on how this one was obtained).
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "f").write_text("x")
    subprocess.run(["git", "-C", str(tmp_path), "add", "f"], check=True)
    subprocess.run(
        [
            "git",
            "-C",
            str(tmp_path),
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            "x",
        ],
        check=True,
    )
    venv_lib = tmp_path / ".venv" / "lib"  # where the builder's own lookup starts
    venv_lib.mkdir(parents=True)
    assert _head(None, venv_lib).returncode == 0  # what the builder saw before
    assert _head(builder_env(), venv_lib).returncode != 0
    assert _head(builder_env(), REPO).returncode != 0
