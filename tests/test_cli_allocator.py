"""The benchmark harness's CPU allocation settings (fastlm.bench.alloc): glibc keeps freed memory, so a
tensor allocated again after a free does not fault its pages in again; the opt-out leaves glibc alone;
``fastlm bench`` applies them before torch is imported, and the product's commands never do. Each case
runs in a fresh interpreter (the settings precede torch)."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="the malloc settings are glibc's (Linux); elsewhere the harness leaves malloc alone")

PROBE = r"""
from fastlm.bench.alloc import set_allocator_defaults
set_allocator_defaults()
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


# The settings as a command leaves them: `fastlm bench` sets them (THP_MEM_ALLOC_ENABLE only while torch
# is not imported yet, so this also checks the import order); the product's commands leave them unset.
COMMAND = r"""
import os, sys
import fastlm.cli
status = fastlm.cli.main(sys.argv[1:])
print("SETTINGS", status, os.environ.get("THP_MEM_ALLOC_ENABLE"), os.environ.get("FASTLM_MALLOC_KEEP"))
"""


def run_command(*argv):
    settings = ("GLIBC_TUNABLES", "FASTLM_MALLOC_KEEP", "THP_MEM_ALLOC_ENABLE")
    env = {k: v for k, v in os.environ.items() if k not in settings}
    out = subprocess.run([sys.executable, "-c", COMMAND, *argv], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split("SETTINGS ")[-1].split()


def test_fastlm_bench_sets_them_before_torch():
    assert run_command("bench", "--list", "--tiny", "opcount") == ["0", "1", "1"]


def test_product_commands_leave_malloc_alone():
    assert run_command("info") == ["0", "None", "None"]
