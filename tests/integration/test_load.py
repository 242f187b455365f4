"""Overload on a real 4-peer mesh: every query ends clearly, no daemon dies, memory stays put.

Runs tools/load_test.py (the same code as the benchmark, in its own process, as a user would)
with 50 concurrent queries of 8 tokens against the int4 SmolLM2 imported by the fixture, and
checks its exit status and its JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshllm.model.store import ImportedModel

pytestmark = pytest.mark.real_model

REPO = Path(__file__).resolve().parents[2]
QUERIES = 50


def test_fifty_concurrent_queries_end_clearly(
    smollm_models: dict[str, ImportedModel], tmp_path: Path
) -> None:
    model = smollm_models["int4"]
    out = tmp_path / "load_test.json"
    cmd = [
        sys.executable,
        str(REPO / "tools" / "load_test.py"),
        "--queries",
        str(QUERIES),
        "--max-tokens",
        "8",
        "--peers",
        "4",
        "--precision",
        "int4",
        "--home",
        str(model.path.parent.parent),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())

    assert r["failures"] == {}, r["failures"]
    assert r["completed"] + sum(r["errors"].values()) == QUERIES
    # Overload is refused, not absorbed: but the mesh must still have done real work.
    assert r["completed"] > 0 and r["tokens"] > 0
    for message in r["errors"]:
        # A clear error is the daemon's own error object: a code, then a message.
        code, _, text = message.partition(": ")
        assert code and text, message
    assert len(r["peers"]) == 4
    for p in r["peers"]:
        assert p["alive"], p
        before, after = p["rss_before_mib"], p["rss_after_mib"]
        assert before and after, p
        # Loose on purpose: allocator noise is fine, growth with the load is not.
        assert after <= before * 1.5 + 64, p
