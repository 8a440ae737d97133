"""Registers, spill stack and shared memory of every fastlm Triton kernel, compiled exactly as the JIT
compiles it at launch, for sm_80 / sm_86 / sm_89 / sm_90 at the real families' launch shapes.

How: the backend's own entry points (the same calls the fused modules and the engine make) run on
16-byte-aligned CPU tensors with a stand-in active Triton driver whose target is the wanted arch. The
JIT therefore specialises exactly as it would on that GPU (divisibility by 16 of pointers and integer
arguments, integers equal to 1, the constexprs, num_warps, num_stages and the grid all come from the
launcher), compiles to cubin with Triton's own ptxas, and hands the cubin to the driver's load_binary:
the stand-in reads its resource usage there (cuobjdump --dump-resource-usage) instead of loading it,
and records the launch instead of running it. Nothing is launched and no GPU is needed; the kernels'
outputs are never written (torch.empty buffers), so only index tensors hold real values.

Limits per block (a kernel over one fails at its first launch on that arch):
  * shared memory: the opt-in maximum per block, cudaDevAttrMaxSharedMemoryPerBlockOptin, which is what
    Triton checks before a launch (triton/compiler/compiler.py, max_shared_mem): 163 KB = 166912 B on
    sm_80 and 227 KB = 232448 B on sm_90 (the values torch._inductor keys A100 and H100 on,
    torch/_inductor/autoheuristic/autoheuristic_utils.py), 99 KB = 101376 B on sm_86 and sm_89 (CUDA
    C++ Programming Guide, "Technical Specifications per Compute Capability");
  * registers: 65536 a block, 255 a thread; ptxas caps a kernel to its .maxntid, so excess shows up
    as spills (stack), which are also refused here (local memory is DRAM: a decode kernel that spills
    moves its accumulators through HBM).

Usage: ``python -m fastlm.kernels.resources [--arch 80,90] [--family helium] [--phase decode]
[--dtype bfloat16] [--json PATH] [--all] [--intensity]``. Exit status 1 when anything does not fit.
Runs with TRITON_INTERPRET unset (the interpreter compiles nothing).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch

# name -> (what runs on it, max dynamic shared memory a block can opt into, bytes); see the docstring
ARCHS = {
    80: ("A100", 166912),
    86: ("A10, RTX 30", 101376),
    89: ("L4, L40S, RTX 40", 101376),
    90: ("H100, H200", 232448),
}
REGS_PER_BLOCK = 65536
REGS_PER_THREAD = 255
# H100 SXM roofline (NVIDIA's datasheet): 3.35 TB/s HBM3, 989 dense bf16 tensor TFLOP/s, 67 fp32 TFLOP/s
# (33.5 T FMA/s); exp2 on the MUFU units, 16 a clock an SM x 132 SMs x 1.83 GHz.
H100_HBM_BYTES = 3.35e12
H100_BF16_FLOPS = 989e12
H100_FP32_FMAS = 33.5e12
H100_EX2S = 16 * 132 * 1.83e9


@dataclass(frozen=True)
class FamilyShape:
    """The launch-relevant sizes of one published checkpoint (its config.json)."""
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int
    interleaved: bool
    qkv_head_major: bool  # Persimmon's [H, 3, D] fused QKV
    qk_norm: str  # none | per_head (StableLM-2-12B) | shared (Persimmon, with bias)
    norm: str  # rms | layer
    rms_weight_in_fp32: bool
    mlp: str  # swiglu | relu2
    intermediate: int


FAMILIES = (
    FamilyShape("AFM-4.5B", 2560, 20, 4, 128, 128, False, False, "none", "rms", False, "relu2", 18432),
    FamilyShape("StableLM-2-1.6B", 2048, 32, 32, 64, 16, False, False, "none", "layer", False, "swiglu", 5632),
    FamilyShape("StableLM-3B-4E1T", 2560, 32, 32, 80, 20, False, False, "none", "layer", False, "swiglu", 6912),
    FamilyShape("StableLM-2-12B", 5120, 32, 8, 160, 40, False, False, "per_head", "layer", False, "swiglu", 13824),
    FamilyShape("Persimmon-8B", 4096, 64, 64, 64, 32, False, True, "shared", "layer", False, "relu2", 16384),
    FamilyShape("Helium-1-2B", 2560, 20, 20, 128, 128, True, False, "none", "rms", True, "swiglu", 7040),
)
BATCHES = (1, 8)
# Contexts 128 to 32k. Distinct specialisations are what matter: a context changes the compiled kernel
# only through the integers it reaches (token counts, strides: divisible by 16 or not, equal to 1 or
# not; the cache length itself is never specialised), so 128, one length that is not a multiple of 16
# and 32k cover every case at a fraction of the cost.
CONTEXTS = (128, 1000, 32768)
MAX_PREFILL_TOKENS = 32768  # B * S of one prefill (B=8 prefills stop at 4096 tokens a sequence)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ------------------------------------------------------------------------------------ stand-in driver
@dataclass
class Binary:
    """One compiled kernel (one specialisation on one arch) and its resource usage."""
    kernel: str
    arch: int
    num_warps: int
    num_stages: int
    constants: dict
    registers: int
    stack: int  # bytes of stack frame a thread (spills live there)
    local: int
    static_shared: int
    dynamic_shared: int
    launches: list = field(default_factory=list)  # workload labels
    grids: set = field(default_factory=set)

    @property
    def shared(self) -> int:
        return self.static_shared + self.dynamic_shared

    @property
    def shared_limit(self) -> int:
        return ARCHS[self.arch][1]

    def problems(self) -> list[str]:
        out = []
        if self.stack or self.local:
            out.append(f"spills: {self.stack} B stack, {self.local} B local a thread")
        if self.shared > self.shared_limit:
            out.append(f"shared memory {self.shared} B > {self.shared_limit} B a block on sm_{self.arch}")
        regs_alloc = -(-self.registers // 8) * 8  # allocated in units of 8 a thread
        if self.registers > REGS_PER_THREAD or regs_alloc * 32 * self.num_warps > REGS_PER_BLOCK:
            out.append(f"{self.registers} registers x {32 * self.num_warps} threads > {REGS_PER_BLOCK} a block")
        return out


_RESOURCE_CACHE: dict[bytes, tuple[int, int, int, int]] = {}  # by the cubin's sha256


def cubin_usage(cubin: bytes) -> tuple[int, int, int, int]:
    """(registers, stack, local, static shared) of a one-kernel cubin, from cuobjdump."""
    key = hashlib.sha256(cubin).digest()
    if key in _RESOURCE_CACHE:
        return _RESOURCE_CACHE[key]
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out.split("Function", 1)[-1]))
    if "REG" not in fields:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    usage = tuple(int(fields.get(k, 0)) for k in ("REG", "STACK", "LOCAL", "SHARED"))
    _RESOURCE_CACHE[key] = usage
    return usage


class _Recorder:
    """State of one measuring session: the current workload label and every Binary loaded."""

    def __init__(self):
        self.label = ""
        self.binaries: list[Binary] = []
        self.pending = None  # (src, metadata) of the kernel whose launcher was just created


class _Launcher:
    """Stands in for the CUDA launcher: records the launch on the Binary load_binary returned."""

    def __init__(self, src, metadata, recorder: _Recorder):
        recorder.pending = (src, metadata)
        self.recorder = recorder

    def __call__(self, gx, gy, gz, stream, function, *rest):
        function.launches.append(self.recorder.label)
        function.grids.add((gx, gy, gz))


class _Utils:
    def __init__(self, arch: int, recorder: _Recorder):
        self.arch, self.recorder = arch, recorder

    def get_device_properties(self, device):
        # No limit here: Triton would raise OutOfResources at load; the table reports against ARCHS instead.
        return {"max_shared_mem": 1 << 30, "multiprocessor_count": 132, "max_num_regs": REGS_PER_BLOCK,
                "warpSize": 32, "sm_clock_rate": 0, "mem_clock_rate": 0, "mem_bus_width": 0}

    def load_binary(self, name, cubin, shared, device):
        src, metadata = self.recorder.pending
        regs, stack, local, static = cubin_usage(cubin)
        consts = {p.name: v for p in src.fn.params for k, v in src.constants.items() if k == (p.num,)}
        b = Binary(name, self.arch, metadata.num_warps, metadata.num_stages,
                   {k: (str(v) if not isinstance(v, (bool, int, float)) else v) for k, v in consts.items()},
                   regs, stack, local, static, shared)
        self.recorder.binaries.append(b)
        return b, b, regs, 0, 1024  # (module, function, ...): a module that is not None marks it loaded

    def unload_module(self, module):
        pass


class StandInDriver:
    """An active Triton driver for ``arch`` with no GPU behind it (see the module docstring)."""

    def __init__(self, arch: int, recorder: _Recorder):
        from triton.backends.compiler import GPUTarget

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _Utils(arch, recorder)
        self.launcher_cls = lambda src, metadata: _Launcher(src, metadata, recorder)

    def get_current_device(self):
        return self.arch  # the JIT keys its kernel caches on the device: one cache per arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def is_active(self):
        return True

    def map_python_to_cpp_type(self, ty):
        return ty

    def get_benchmarker(self):
        raise RuntimeError("the stand-in driver cannot time kernels")


@contextlib.contextmanager
def stand_in(arch: int, recorder: _Recorder):
    """Within: Triton compiles for ``arch`` and launches nothing; fastlm's kernels accept CPU tensors."""
    from triton.runtime import driver

    from . import _utils

    if _utils.INTERPRET:
        raise RuntimeError("fastlm.kernels.resources needs compiled kernels: run it with TRITON_INTERPRET unset")
    old_cpu, old_driver = _utils.CPU_LAUNCHES[0], driver._active  # None until a driver was first asked for
    driver.set_active(StandInDriver(arch, recorder))
    _utils.CPU_LAUNCHES[0] = True
    try:
        yield
    finally:
        _utils.CPU_LAUNCHES[0] = old_cpu
        driver._active = old_driver  # reset_active() would probe for a GPU driver (none here)


# ---------------------------------------------------------------------------------------- workloads
def _empty(*shape, dtype):
    return torch.empty(shape, dtype=dtype)


def _family_calls(fam: FamilyShape, batch: int, phase: str, context: int, dtype: torch.dtype) -> Iterator:
    """(label, thunk) for every Triton launch of one layer (+ final norm) of ``fam`` in one phase: the
    backend entry points the fused modules and the engine call (fastlm.kernels' _ENTRY_POINTS)."""
    from . import activations, decode_attention, norm, qkv_rope, quant_linear

    tokens = 1 if phase == "decode" else context
    t_max = context
    H, Hkv, D, R = fam.heads, fam.kv_heads, fam.head_dim, fam.rotary_dim
    tag = f"{fam.name} B{batch} {phase} ctx{context} {str(dtype)[6:]}"
    x = _empty(batch, tokens, fam.hidden, dtype=dtype)
    res = _empty(batch, tokens, fam.hidden, dtype=dtype)
    w = _empty(fam.hidden, dtype=dtype)
    for residual in (res, None):
        kind = "add+norm" if residual is not None else "norm"
        if fam.norm == "rms":
            yield f"{tag} {kind}", lambda r=residual: norm.add_rms_norm(x, r, w, 1e-5, fam.rms_weight_in_fp32)
        else:
            yield f"{tag} {kind}", lambda r=residual: norm.add_layer_norm(x, r, w, w, 1e-5)

    qkv = _empty(batch, tokens, (H + 2 * Hkv) * D, dtype=dtype)
    table_cos, table_sin = _empty(t_max, R, dtype=dtype), _empty(t_max, R, dtype=dtype)
    if phase == "decode":  # the engine's RopeTables.decode: a gather at each row's position
        positions = torch.full((batch,), t_max - 1, dtype=torch.int64)
        cos, sin = table_cos[positions].unsqueeze(1), table_sin[positions].unsqueeze(1)
        cache_pos = positions.unsqueeze(1)
    else:
        cos, sin = table_cos[:tokens].unsqueeze(0), table_sin[:tokens].unsqueeze(0)
        cache_pos = torch.arange(tokens).unsqueeze(0).expand(batch, tokens)
    if fam.qk_norm == "per_head":
        norms = (_empty(H, D, dtype=dtype), None, _empty(Hkv, D, dtype=dtype), None)
    elif fam.qk_norm == "shared":
        norms = tuple(_empty(D, dtype=dtype) for _ in range(4))
    else:
        norms = (None, None, None, None)
    static = (H, Hkv, D, R, fam.interleaved, fam.qkv_head_major, 1e-5)
    k_cache = _empty(batch, Hkv, t_max, D, dtype=dtype)
    v_cache = _empty(batch, Hkv, t_max, D, dtype=dtype)
    yield f"{tag} qkv_rope_cache", lambda: qkv_rope.qkv_rope_cache(qkv, cos, sin, *norms, k_cache, v_cache,
                                                                     cache_pos, *static)
    yield f"{tag} qkv_rope", lambda: qkv_rope.qkv_rope(qkv, cos, sin, *norms, *static)

    yield from activations.resource_launches(fam, tag, batch, tokens, lambda *shape: _empty(*shape, dtype=dtype))

    # Weight-only int8 (per channel) and int4 projections: the fused QKV (x -> qkv) and the MLP's down
    # projection (with the residual folded in). A decode step's launch does not depend on the context.
    if phase == "prefill" or context == CONTEXTS[0]:
        down_in = _empty(batch, tokens, fam.intermediate, dtype=dtype)
        for bits in (8, 4):
            for name, a, n_out, r in (("qkv", x, qkv.shape[-1], None), ("down", down_in, fam.hidden, res)):
                k_in = a.shape[-1]
                group = k_in if bits == 8 else 32  # fastlm.ops.quantized's DEFAULT_GROUP_SIZE (ops sit above)
                packed = (k_in, torch.int8) if bits == 8 else (k_in // 2, torch.uint8)
                qw = torch.empty(n_out, packed[0], dtype=packed[1])
                sc = torch.empty(n_out, k_in // group, dtype=torch.float32)
                yield (f"{tag} quant_linear int{bits} {name}",
                       lambda a=a, qw=qw, sc=sc, r=r, bits=bits, group=group:
                       quant_linear.quant_linear(a, qw, sc, None, r, bits, group))

    if phase == "decode":  # the engine: q.squeeze(2) of the epilogue's [B, H, 1, D], lengths = pos + 1
        q = _empty(batch, H, 1, D, dtype=dtype).squeeze(2)
        lengths = torch.full((batch,), t_max, dtype=torch.int64)
        yield f"{tag} decode_attention", lambda: decode_attention.decode_attention(q, k_cache, v_cache, lengths,
                                                                                   D ** -0.5)


def workloads(families=FAMILIES, phases=("prefill", "decode"), dtypes=DTYPES) -> Iterator[tuple[str, Callable]]:
    for fam in families:
        for dtype in dtypes:
            for batch in BATCHES:
                for phase in phases:
                    for context in CONTEXTS:
                        if phase == "prefill" and batch * context > MAX_PREFILL_TOKENS:
                            continue
                        yield from _family_calls(fam, batch, phase, context, dtype)


def triton_kernels() -> list[str]:
    """Every @triton.jit kernel (``_*_kernel``) in fastlm.kernels: what the table must cover."""
    from triton.runtime.jit import JITFunction

    from . import activations, decode_attention, norm, qkv_rope, quant_linear

    modules = (activations, decode_attention, norm, qkv_rope, quant_linear)
    return sorted(name for mod in modules for name, obj in vars(mod).items()
                  if isinstance(obj, JITFunction) and name.endswith("_kernel"))


def _run_arch(arch: int, family_names: tuple, phases: tuple, dtype_names: tuple) -> list[Binary]:
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION")  # Triton 3.9's notice of a future default
    fams = tuple(f for f in FAMILIES if f.name in family_names)
    dtypes = tuple(getattr(torch, d) for d in dtype_names)
    rec = _Recorder()
    with stand_in(arch, rec):
        for label, call in workloads(fams, phases, dtypes):
            rec.label = label
            call()
    return rec.binaries


def run_table(archs=tuple(ARCHS), families=FAMILIES, phases=("prefill", "decode"), dtypes=DTYPES,
              jobs: int | None = None) -> list[Binary]:
    """Compile every launch of ``workloads`` for each arch; one Binary per distinct specialisation.
    ``jobs`` worker processes (default: one per arch, at most one per CPU) compile the archs in parallel."""
    args = (tuple(f.name for f in families), tuple(phases), tuple(str(d)[6:] for d in dtypes))
    jobs = jobs or min(len(archs), os.cpu_count() or 1)
    if jobs <= 1:
        return [b for arch in archs for b in _run_arch(arch, *args)]
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_run_arch, archs, *([a] * len(archs) for a in args)))
    return [b for part in parts for b in part]


# -------------------------------------------------------------------------------------- intensity
def _loop_body(ptx: str) -> str:
    """The PTX of the kernel's innermost hot loop: the backward-branch region (label ... bra label) that
    holds the most mma / fma instructions (one iteration: one BLOCK_T tile)."""
    lines = ptx.splitlines()
    labels = {}
    best, best_score = "", -1
    for i, line in enumerate(lines):
        m = re.match(r"^(\$L__\w+):", line.strip())
        if m:
            labels[m.group(1)] = i
        b = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)
        if b and b.group(1) in labels:
            region = "\n".join(lines[labels[b.group(1)]:i + 1])
            score = len(re.findall(r"\b(?:mma\.sync|fma\.rn\.f32)", region))
            if score > best_score:
                best, best_score = region, score
    return best


def decode_intensity(fam_name: str = "Helium-1-2B", dtype: torch.dtype = torch.bfloat16, arch: int = 90) -> dict:
    """Tensor-core / FMA / exp2 work per KV byte of the decode split kernel's loop, read off its PTX at
    the real specialisation (one program's loop body: PTX is per thread, times 32 * num_warps)."""
    from . import decode_attention as dk

    fam = next(f for f in FAMILIES if f.name == fam_name)
    rec = _Recorder()
    with stand_in(arch, rec):
        rec.label = fam_name
        for _, call in _family_calls(fam, 1, "decode", 4096, dtype):
            call()
    split = next(b for b in rec.binaries if b.kernel == "_decode_split_kernel")
    fn = dk._decode_split_kernel
    ptx = next(ck.asm["ptx"] for ck in fn.device_caches[arch][0].values() if ck.function is split)
    body = _loop_body(ptx)
    mma = len(re.findall(r"^\s*mma\.sync\.aligned\.m16n8k16", body, re.M))
    fma = len(re.findall(r"^\s*fma\.rn\.f32", body, re.M))
    ex2 = len(re.findall(r"^\s*ex2\.approx", body, re.M))
    threads = 32 * split.num_warps
    mma_count = mma * split.num_warps  # mma.sync is a warp-wide instruction
    block_t, block_d = split.constants["BLOCK_T"], fam.head_dim
    kv_bytes = 2 * block_t * block_d * dtype.itemsize
    tensor_flop = mma_count * 2 * 16 * 8 * 16
    return dict(family=fam_name, dtype=str(dtype)[6:], arch=arch, BLOCK_T=block_t, BLOCK_G=split.constants["BLOCK_G"],
                mma_per_tile=mma_count, fma_per_tile=fma * threads, ex2_per_tile=ex2 * threads,
                kv_bytes_per_tile=kv_bytes,
                tensor_flop_per_kv_byte=tensor_flop / kv_bytes, fma_per_kv_byte=fma * threads / kv_bytes,
                ex2_per_kv_byte=ex2 * threads / kv_bytes,
                h100_ridge_bf16_flop_per_byte=H100_BF16_FLOPS / H100_HBM_BYTES,
                h100_ridge_fp32_fma_per_byte=H100_FP32_FMAS / H100_HBM_BYTES,
                h100_ridge_ex2_per_byte=H100_EX2S / H100_HBM_BYTES)


# ------------------------------------------------------------------------------------------- report
def summarise(binaries: list[Binary]) -> list[dict]:
    """One row per (kernel, arch): specialisations, worst registers / stack / shared, status."""
    rows = {}
    for b in binaries:
        r = rows.setdefault((b.kernel, b.arch), dict(kernel=b.kernel, arch=b.arch, specialisations=0, launches=0,
                                                     max_registers=0, max_stack=0, max_shared=0,
                                                     shared_limit=b.shared_limit, problems=[]))
        r["specialisations"] += 1
        r["launches"] += len(b.launches)
        r["max_registers"] = max(r["max_registers"], b.registers)
        r["max_stack"] = max(r["max_stack"], b.stack + b.local)
        r["max_shared"] = max(r["max_shared"], b.shared)
        r["problems"] += [f"{p} ({b.launches[0] if b.launches else '?'})" for p in b.problems()]
    return [rows[k] for k in sorted(rows)]


def format_table(binaries: list[Binary], every: bool = False) -> str:
    lines = ["| kernel | arch | specialisations | launches | max regs | max spill stack B | max shared B | "
             "limit B | status |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summarise(binaries):
        status = "ok" if not r["problems"] else f"FAIL: {r['problems'][0]}"
        lines.append(f"| {r['kernel']} | sm_{r['arch']} | {r['specialisations']} | {r['launches']} | "
                     f"{r['max_registers']} | {r['max_stack']} | {r['max_shared']} | {r['shared_limit']} | {status} |")
    if every:
        lines += ["", "| kernel | arch | warps | stages | regs | stack | shared | constexprs | first launch |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for b in sorted(binaries, key=lambda b: (b.kernel, b.arch)):
            consts = ", ".join(f"{k}={v}" for k, v in b.constants.items())
            lines.append(f"| {b.kernel} | sm_{b.arch} | {b.num_warps} | {b.num_stages} | {b.registers} | {b.stack} | "
                         f"{b.shared} | {consts} | {b.launches[0] if b.launches else ''} |")
    return "\n".join(lines)


def _to_json(binaries: list[Binary]) -> list[dict]:
    out = []
    for b in binaries:
        d = asdict(b)
        d["grids"] = sorted(b.grids)
        d["launches"] = len(b.launches)
        d["labels"] = sorted(set(b.launches))
        d["shared"], d["shared_limit"], d["problems"] = b.shared, b.shared_limit, b.problems()
        out.append(d)
    return out


def _pick(options, spec: str | None, key: Callable, exact: bool = False) -> tuple:
    if not spec:
        return tuple(options)
    wanted = [s.strip().lower() for s in spec.split(",") if s.strip()]
    chosen = tuple(o for o in options if any(w == key(o).lower() if exact else w in key(o).lower() for w in wanted))
    if not chosen:
        raise ValueError(f"nothing matches {spec!r}; expected some of {[key(o) for o in options]}")
    return chosen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastlm.kernels.resources", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", help="comma-separated SM versions (default: 80,86,89,90)")
    p.add_argument("--family", help="comma-separated substrings of the family names (default: all)")
    p.add_argument("--phase", help="prefill, decode or both (default)")
    p.add_argument("--dtype", help="comma-separated: bfloat16,float16,float32 (default: all)")
    p.add_argument("--json", help="write every specialisation's record here")
    p.add_argument("--jobs", type=int, help="worker processes (default: one per arch, at most one per CPU; 1: "
                                             "in this process, where changes made to the kernels' modules hold)")
    p.add_argument("--all", action="store_true", help="also print one line per specialisation")
    p.add_argument("--intensity", action="store_true",
                   help="print decode attention's MMA / FMA / exp2 count per KV byte (sm_90 PTX) and exit")
    args = p.parse_args(argv)
    from . import _utils

    if _utils.INTERPRET:
        print("fastlm.kernels.resources: the kernels were built for the Triton interpreter, which compiles "
              "nothing: run it with TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION")  # Triton 3.9's notice of a future default
    if args.intensity:
        for dtype in (torch.bfloat16, torch.float32):
            print(json.dumps(decode_intensity(dtype=dtype), indent=2))
        return 0
    try:
        archs = _pick(ARCHS, args.arch, lambda a: str(a), exact=True)
        fams = _pick(FAMILIES, args.family, lambda f: f.name)
        phases = _pick(("prefill", "decode"), args.phase, lambda s: s, exact=True)
        dtypes = _pick(DTYPES, args.dtype, lambda d: str(d)[6:], exact=True)
    except ValueError as exc:
        p.error(str(exc))  # one line, exit status 2
    t0 = time.perf_counter()
    binaries = run_table(archs, fams, phases, dtypes, jobs=args.jobs)
    print(format_table(binaries, every=args.all))
    bad = [b for b in binaries if b.problems()]
    launches = sum(len(b.launches) for b in binaries)
    kernels = sorted({b.kernel for b in binaries})
    print(f"\n{len(binaries)} compiled kernels ({len(kernels)} Triton kernels x {len(archs)} archs, "
          f"{launches} launches over {len(fams)} families x B{list(BATCHES)} x {list(phases)} x contexts "
          f"{list(CONTEXTS)} x {[str(d)[6:] for d in dtypes]}) in {time.perf_counter() - t0:.0f}s: "
          f"{len(bad)} do not fit")
    for b in bad:
        print(f"  {b.kernel} sm_{b.arch}: {'; '.join(b.problems())} (e.g. {b.launches[0]})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(kernels=triton_kernels(), archs=list(archs), families=[f.name for f in fams],
                           binaries=_to_json(binaries)), f, indent=1, default=str)
    return 1 if bad else 0


if __name__ == "__main__":
    from fastlm.kernels.resources import main as _main  # the package's module: what spawned workers pickle

    sys.exit(_main())
