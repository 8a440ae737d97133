"""Machine description and measured memory-copy bandwidth for the summary."""
from __future__ import annotations

import os
import platform
import subprocess

import torch

from fastlm.bench.timing import TimingPolicy, measure


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or platform.machine()


ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16",
             "amx_int8")


def cpu_isa() -> list[str]:
    """The vector ISA extensions of /proc/cpuinfo's flags that decide which CPU kernels run (x86 names)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [name for name in ISA_FLAGS if name in flags]
    except OSError:
        pass
    return []


def describe(device: torch.device) -> dict:
    import transformers

    import fastlm

    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_isa": cpu_isa(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fastlm": fastlm.__version__,
        "device": str(device),
        # c10's THP_MEM_ALLOC_ENABLE (`fastlm bench` sets it; see fastlm.bench.alloc): large CPU tensors on
        # huge pages, i.e. far fewer page faults, for every provider alike
        "thp_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0") == "1",
        # glibc keeps freed memory for reuse (fastlm.bench.alloc): no page faults per tensor
        "malloc_keep": os.environ.get("FASTLM_MALLOC_KEEP") == "1",
    }
    try:
        info["loadavg"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
    return info


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 256 * 2**20, policy: TimingPolicy | None = None) -> float:
    """GB/s of ``dst.copy_(src)`` on a large buffer, counting read + write (2 * nbytes per copy),
    the same accounting as the kernels' "bytes moved"."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    stats = measure(lambda: dst.copy_(src), device,
                    policy or TimingPolicy(warmup=2, min_reps=5, max_reps=20, budget_s=0.5, min_batch_s=0.0))
    return 2 * n * 4 / (stats.median_us * 1e-6) / 1e9


def read_bandwidth_gbs(device: torch.device, nbytes: int = 256 * 2**20, policy: TimingPolicy | None = None) -> float:
    """GB/s of reading a large buffer once (``sum`` over fp32, read bytes only): what streaming the weights
    at decode can reach (the decode rows' fraction of it)."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    stats = measure(lambda: src.sum(), device,
                    policy or TimingPolicy(warmup=2, min_reps=5, max_reps=20, budget_s=0.5, min_batch_s=0.0))
    return n * 4 / (stats.median_us * 1e-6) / 1e9
