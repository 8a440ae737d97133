"""The ``fastlm`` command's CPU allocation settings (fastlm.cli.set_allocator_defaults): glibc keeps
freed memory, so a tensor allocated again after a free does not fault its pages in again; and the
opt-out leaves glibc alone. Each case runs in a fresh interpreter (the settings precede torch)."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="the malloc settings are glibc's (Linux); elsewhere the command leaves malloc alone")

PROBE = r"""
import fastlm.cli as cli
cli.set_allocator_defaults()
import os, resource, torch

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def cycle():  # 64 MiB: glibc would mmap it
    t = torch.empty(2 ** 24); t.fill_(1.0); ptr = t.data_ptr(); del t
    return ptr

# Warm up until the block comes back at the same address twice: the heap may take a few cycles to
# reach its steady size (a 2 MiB-aligned block can land past small allocations made in between).
last, warm = cycle(), 1
while warm < 10:
    ptr = cycle(); warm += 1
    if ptr == last:
        break
    last = ptr
before = faults()
for _ in range(4):
    cycle()
print(faults() - before, os.environ.get("FASTLM_MALLOC_KEEP"), os.environ.get("GLIBC_TUNABLES"))
"""


def run_probe(**env_overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FASTLM_MALLOC_KEEP")}
    env.update(env_overrides)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    faults, keep, tunables = out.stdout.split()
    return int(faults), keep, tunables


def test_freed_memory_is_reused_without_page_faults():
    faults, keep, tunables = run_probe()
    assert keep == "1" and "glibc.malloc.mmap_max=0" in tunables  # children (benchmark workers) too
    assert faults <= 8, f"reallocating a freed 64 MiB tensor 4 times faulted {faults} pages in again"


def test_opt_out_leaves_malloc_alone():
    faults, keep, tunables = run_probe(FASTLM_MALLOC_KEEP="0")
    assert keep == "0" and tunables == "None"
    assert faults > 8, "without the setting glibc unmaps the chunk on free; the probe should see faults"
