"""cgroup v1 files: CPU quotas, memory limits and what a memory cgroup has seen.

The testbed's emulated phones each live in a ``cpu`` and a ``memory`` cgroup (see
:mod:`meshllm.netbed`); these are the reads and writes of those directories.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from pathlib import Path

from meshllm.testbed_profile import CFS_PERIOD_US, MIN_CPU, MIN_QUOTA_US, TestbedError


def find_mount(controller: str) -> Path | None:
    """Where the cgroup v1 *controller* is mounted (maybe co-mounted with others)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "cgroup" and controller in fields[3].split(","):
            return Path(fields[1].replace("\\040", " "))
    return None


def own_cgroup(controller: str) -> Path | None:
    """This process's cgroup v1 directory for *controller*, or None where it has none."""
    mount = find_mount(controller)
    if mount is None:
        return None
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controller in controllers.split(","):
                return mount / path.lstrip("/")
    except (OSError, ValueError):
        pass
    return None


def find_cpu_mount() -> Path | None:
    """Where the cgroup v1 ``cpu`` controller is mounted (maybe co-mounted with cpuacct)."""
    return find_mount("cpu")


def host_cpus() -> int:
    return len(os.sched_getaffinity(0))


def set_memory_limit(cg: Path, memory_mb: int) -> int:
    """Cap memory cgroup *cg* at *memory_mb* MiB, swap included (0: no cap); returns the
    limit in bytes, -1 for none."""
    limit = memory_mb * (1 << 20) if memory_mb > 0 else -1
    try:
        # A phone has no swap to spill into: the kernel kills the peer instead, as Android's
        # low-memory killer would. (memsw counts memory + swap; it must stay >= the memory
        # limit, so it is raised first and lowered last. It exists only with swap accounting.)
        memsw = cg / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            memsw.write_text("-1")
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        if memsw.exists():
            memsw.write_text(str(limit))
        (cg / "memory.swappiness").write_text("0")
    except OSError as exc:
        raise TestbedError(f"cannot set the memory limit of {cg}: {exc.strerror}") from None
    return limit


def keyed_number(path: Path, key: str) -> int | None:
    """The number after *key* on its line of a ``key value`` kernel file (a cgroup's
    memory.stat, /proc/self/status: ``key`` includes its colon there), or None."""
    try:
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0] == key:
                return int(fields[1])
    except (OSError, ValueError):
        pass
    return None


def memory_usage(cg: Path | None) -> dict[str, int | None]:
    """What memory cgroup *cg* says: its limit, its peak usage and the OOM kills in it
    (None each where there is no memory cgroup, or it is gone)."""

    def number(name: str) -> int | None:
        if cg is None:
            return None
        try:
            return int((cg / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    kills = None if cg is None else keyed_number(cg / "memory.oom_control", "oom_kill")
    anon = None if cg is None else keyed_number(cg / "memory.stat", "total_rss")
    limit = number("memory.limit_in_bytes")
    return {
        # The kernel's "no limit" is the largest page-aligned 63-bit value.
        "memory_limit_bytes": None if limit is None or limit >= 1 << 62 else limit,
        "memory_peak_bytes": number("memory.max_usage_in_bytes"),
        "memory_bytes": number("memory.usage_in_bytes"),
        # Anonymous memory now: what the cap cannot reclaim (the peak and usage above also
        # count page cache, which fills up to the cap and is dropped as needed).
        "memory_anon_bytes": anon,
        "oom_kills": kills,
    }


def set_cpu_quota(cg: Path, cpu: float) -> int:
    """Give cpu cgroup *cg* *cpu* cores from now on (also while it runs); returns the quota in
    µs per period, -1 for none (``cpu`` at least the host's core count)."""
    if not cpu >= MIN_CPU:
        raise TestbedError(f"cpu must be at least {MIN_CPU:g} core, not {cpu!r}")
    quota = -1 if cpu >= host_cpus() else max(MIN_QUOTA_US, round(cpu * CFS_PERIOD_US))
    try:
        # Period first: a quota is only valid relative to the period it is set against.
        (cg / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
        (cg / "cpu.cfs_quota_us").write_text(str(quota))
    except OSError as exc:
        raise TestbedError(f"cannot set the CPU quota of {cg}: {exc.strerror}") from None
    return quota


def pids(cg: Path) -> set[int]:
    try:
        return {int(x) for x in (cg / "cgroup.procs").read_text().split()}
    except OSError:
        return set()


def alive(pid: int) -> bool:
    """Running, or a zombie not yet reaped (reaping it here if it is our child)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return Path(f"/proc/{pid}").exists()


def remove(cg: Path, deadline: float) -> str | None:
    """rmdir *cg*; while it is busy (a process that joined it late, one not yet reaped), kill
    what is in it and retry until *deadline*. Returns what went wrong, if anything."""
    while True:
        try:
            cg.rmdir()
            return None
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                return f"cannot remove cgroup {cg}: {exc.strerror}"
        for pid in pids(cg):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            alive(pid)  # reaps it if it is our child
        time.sleep(0.02)
