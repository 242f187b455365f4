"""Weights onto transparent huge pages: which regions qualify, and a real collapse."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest

from meshllm.model import hugepages

MiB = 1 << 20


def test_smaps_parsing_keeps_anonymous_regions(tmp_path: Path) -> None:
    smaps = tmp_path / "smaps"
    smaps.write_text(
        "55d0a0000000-55d0a2000000 rw-p 00000000 00:00 0                          [heap]\n"
        "Size:              32768 kB\nRss:               32000 kB\nAnonHugePages:         0 kB\n"
        "7f0000000000-7f0004000000 rw-p 00000000 00:00 0 \n"
        "Size:              65536 kB\nRss:               65536 kB\nAnonHugePages:     4096 kB\n"
        "7f0010000000-7f0014000000 r--p 00000000 08:01 123456                     /lib/x.so\n"
        "Size:              65536 kB\nRss:               65536 kB\nAnonHugePages:         0 kB\n"
        "7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]\n"
        "Size:                132 kB\nRss:                 40 kB\nAnonHugePages:         0 kB\n"
    )
    assert hugepages.anonymous_regions(str(smaps)) == [
        (0x55D0A0000000, 0x55D0A2000000, 32000 << 10, 0),
        (0x7F0000000000, 0x7F0004000000, 65536 << 10, 4096 << 10),
    ]


def test_large_resident_small_page_regions_qualify_aligned_to_huge_pages() -> None:
    huge = hugepages.HUGE
    base = 1000 * huge
    weights = (base + 100 * huge + 4096, base + 120 * huge + 8192, 20 * huge, 0)
    done = (base, base + 16 * huge, 16 * huge, 16 * huge)  # on huge pages already
    small = (base + 200 * huge, base + 202 * huge, 2 * huge, 0)
    sparse = (base + 300 * huge, base + 340 * huge, 10 * huge, 0)  # mostly not resident
    got = hugepages.candidates([done, weights, small, sparse])
    # The partial huge pages at either end of a region are left alone.
    assert got == [(base + 101 * huge, base + 120 * huge)]


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unavailable"
    return text.split("[", 1)[1].split("]", 1)[0]


def _kernel() -> tuple[int, int]:
    release = os.uname().release.split(".")
    try:
        return int(release[0]), int(release[1].split("-")[0])
    except (IndexError, ValueError):
        return (0, 0)


def thp_collapse_expected() -> bool:
    """Transparent huge pages on (always or madvise) and MADV_COLLAPSE in the kernel."""
    return _thp_mode() in ("always", "madvise") and _kernel() >= (6, 1)


def _huge_kb_of(addr: int) -> int:
    current = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not line.endswith(":") and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            current = start <= addr < end
        elif current and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_resident_memory_is_collapsed_when_the_kernel_can() -> None:
    region = mmap.mmap(-1, 48 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.write(b"\1" * (48 * MiB))  # resident, like freshly loaded weights
    collapsed = [hugepages.after_load()]
    addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
    try:
        if thp_collapse_expected():
            assert collapsed[0] >= 32 * MiB
            assert _huge_kb_of(addr) >= 32 * 1024
        else:
            # No transparent huge pages here, or a kernel without MADV_COLLAPSE (khugepaged
            # may still do it later): whatever is reported, the memory works as before.
            assert collapsed[0] >= 0
        assert region[:4] == b"\1\1\1\1"
    finally:
        del addr
        region.close()


def test_switched_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLLM_HUGE_PAGES", "0")
    region = mmap.mmap(-1, 24 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.write(b"\1" * (24 * MiB))
    try:
        assert hugepages.after_load() == 0
    finally:
        region.close()
