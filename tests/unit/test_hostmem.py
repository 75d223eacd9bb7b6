"""distalex/runtime/hostmem.py: with freed memory kept, a loop that allocates and frees large
tensors (as every training step does) stops page-faulting after a few rounds; without,
every round faults all its pages in anew.  mallopt is process-wide, so each case runs in
its own interpreter."""

import json
import platform
import subprocess
import sys

import pytest

from helpers import ROOT

SCRIPT = """
import json, resource, sys, torch
if sys.argv[1] == "keep":
    from distalex.runtime.hostmem import keep_freed_memory
    assert keep_freed_memory()
faults = []
for _ in range(12):  # a 'step': 128 MiB in three tensors above glibc's mmap threshold, small ones between
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(40 << 18)
    small = [torch.ones(1000) for _ in range(100)]
    b = a * 2
    c = torch.ones(48 << 18)
    del a, small, b, c
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""
PAGES = 128 * 2**20 // 4096  # pages a round writes


def faults(mode: str) -> list:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_freed_memory_is_reused_without_page_faults():
    default, kept = faults("default"), faults("keep")
    assert all(f >= PAGES // 2 for f in default), default  # every round: fresh pages
    # Kept: the same memory again.  Most rounds fault nothing; now and then one faults part of
    # a block in again (seen: one round in four runs faulted a quarter of a round's pages,
    # on a busy machine), so the test counts the last six rounds together: less than one
    # round's pages in six rounds, where returning the memory faults at least three rounds' worth.
    assert sum(kept[-6:]) < PAGES, kept
    assert sorted(kept[-6:])[3] < PAGES // 100, kept  # and most of those rounds fault (almost) nothing
