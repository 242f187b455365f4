"""A program that runs a testbed and is stopped with SIGTERM (as `timeout` stops it) takes the
testbed's daemons down with it."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from meshllm import testbed

# A daemon of ours still running (a zombie's command line is empty: it does not count).
_alive = testbed.is_our_daemon

REPO = Path(__file__).resolve().parents[2]

# What the tools under tools/ do: a testbed up inside try, down in finally.
PROGRAM = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from meshllm import testbed

    testbed.exit_on_sigterm()
    root = Path(sys.argv[1])
    testbed.up(root, 2)
    try:
        print("up", flush=True)
        time.sleep(120)
    finally:
        testbed.down(root)
    """
)


def test_sigterm_takes_the_testbed_down(tmp_path):
    root = tmp_path / "tb"
    proc = subprocess.Popen(
        [sys.executable, "-c", PROGRAM, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "up"
        pids = [p.pid for p in testbed.load_state(root)]
        assert len(pids) == 2 and all(_alive(pid) for pid in pids)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in pids), "daemons outlived the program"
    finally:
        if proc.poll() is None:
            proc.kill()
        testbed.down(root)
