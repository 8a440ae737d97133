"""Prefill-sized ``linear`` on CPU: 16-bit on CPUs without native 16-bit dot products, on weights widened
to fp32 (csrc/cpu/widened_gemm.h, csrc/cpu/linear.cpp), and its run-time choice (csrc/cpu/cpu_features.h);
the fp32 GEMMs (linear's own and the widened panels') on oneDNN or on ATen's addmm.

Both 16-bit paths run on every CPU when forced (``fastlm._C.set_cpu_gemm16("widen" | "aten")``), and
both fp32 libraries (``fastlm._C.set_cpu_gemm32("onednn" | "aten")``), so all are tested here whatever
this CPU has; ``auto`` must take one of them by the CPU's features. Parity: the low-precision rule
against the fp64 reference (tests/_tolerance.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
import torch

from fastlm.ops._registry import backend_status, has_impl, impl
from fastlm.ops.projection import linear_ref
from fastlm.ops.quantized import dequantize_weight, quant_linear_ref, quantize_weight
from _tolerance import assert_close_to_ref, atol_for

_OK, _WHY = backend_status("cpp", "cpu")
if not _OK or not has_impl("linear", "cpp", "cpu"):
    pytest.skip(f"the cpp backend is unavailable: {_WHY}", allow_module_level=True)

from fastlm import _C  # noqa: E402  (built: the backend is available)

LINEAR = impl("linear", "cpp", "cpu")
ATOL = {torch.bfloat16: 1e-3, torch.float16: 3e-4}
DTYPES16 = [torch.bfloat16, torch.float16]
MODES = ["widen", "aten"]
# the fp32 GEMM library `auto` takes here (csrc/cpu/cpu_features.h: oneDNN where torch has it, on x86)
AUTO_GEMM32 = "onednn" if os.uname().machine in ("x86_64", "AMD64") and torch.backends.mkldnn.is_available() else "aten"


def _restoring(set_mode_fn):
    """A fixture body: yields ``set_mode(mode)``, which calls ``set_mode_fn``; restores the previous modes after."""
    prev = []

    def set_mode(mode):
        prev.append(set_mode_fn(mode))

    yield set_mode
    for p in reversed(prev):
        set_mode_fn(p)


@pytest.fixture
def gemm16_mode():
    """``gemm16_mode(mode)`` sets the 16-bit GEMM mode for one test."""
    yield from _restoring(_C.set_cpu_gemm16)


@pytest.fixture
def gemm32_mode():
    """``gemm32_mode(mode)`` sets the fp32 GEMM library for one test."""
    yield from _restoring(_C.set_cpu_gemm32)


def _check_linear(x, w, b, r, name):
    args = (x, w, b, r)
    ref64 = linear_ref(*(None if t is None else t.double() for t in args))
    out = LINEAR(*args)
    assert out.dtype == x.dtype and out.shape == ref64.shape and out.is_contiguous()
    assert_close_to_ref(out, ref64, linear_ref(*args), ATOL[x.dtype] * x.shape[-1] ** 0.5, name=name)
    return out


def _operands(M, N, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / max(K, 1) ** 0.5).to(dtype)
    return x, w, torch.randn(N, generator=g).to(dtype), torch.randn(M, N, generator=g).to(dtype)


# (M, (N, K)): M = 7 and 8 stream the weight (the decode kernel), 9 and up multiply widened panels; N with
# a panel tail (720, 1043), N below one panel (5), an odd K (129, 3000). 513 rows with small weights only
# (the fp64 reference of 513 x 720 x 3000 is slow for CI; 100 rows cover that weight).
SHAPES = [(M, nk) for M in (7, 16, 17, 100) for nk in ((720, 3000), (5, 3000), (1043, 129))] + \
    [(513, (5, 3000)), (513, (1043, 129))]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES16)
@pytest.mark.parametrize("M,nk", SHAPES)
def test_linear16_prefill(gemm16_mode, mode, dtype, M, nk):
    gemm16_mode(mode)
    N, K = nk
    x, w, b, r = _operands(M, N, K, dtype, M + N)
    for bias, res in ((None, None), (b, None), (None, r), (b, r)):
        _check_linear(x, w, bias, res, f"linear {mode} {dtype} M={M} N={N} K={K} bias={bias is not None} "
                      f"residual={res is not None}")


GEMM32_MODES = ["onednn", "aten"]
# fp32 beyond the streaming kernel's 16 rows: odd N and K, one output column, a long K
SHAPES32 = [(17, (720, 3000)), (100, (1043, 129)), (100, (1, 80)), (513, (5, 3000)), (64, (77, 20000))]


def _check_linear32(x, w, b, r, name):
    args = (x, w, b, r)
    ref64 = linear_ref(*(None if t is None else t.double() for t in args))
    out = LINEAR(*args)
    assert out.dtype == torch.float32 and out.shape == ref64.shape and out.is_contiguous()
    assert_close_to_ref(out, ref64, linear_ref(*args), atol_for("linear", torch.float32, ref64), name=name)
    return out


@pytest.mark.parametrize("mode", GEMM32_MODES)
@pytest.mark.parametrize("M,nk", SHAPES32)
def test_linear32_prefill(gemm32_mode, mode, M, nk):
    gemm32_mode(mode)
    N, K = nk
    x, w, b, r = _operands(M, N, K, torch.float32, M + N)
    for bias, res in ((None, None), (b, None), (None, r), (b, r)):
        _check_linear32(x, w, bias, res, f"linear fp32 {mode} M={M} N={N} K={K} bias={bias is not None} "
                        f"residual={res is not None}")


@pytest.mark.parametrize("mode", GEMM32_MODES)
def test_linear32_layouts(gemm32_mode, mode):
    # strided x rows, a row view of a fused weight, a transposed weight (oneDNN's op is not given one: addmm),
    # a strided bias and a broadcast-free residual view, batched x
    gemm32_mode(mode)
    g = torch.Generator().manual_seed(3)
    K, N = 96, 40
    x = torch.randn(3, 20, K + 24, generator=g)[..., :K]
    fused = torch.randn(3 * N, K, generator=g)
    weights = {"row view": fused[N:2 * N], "transposed": torch.randn(K, N, generator=g).t()}
    b = torch.randn(2 * N, generator=g)[::2]
    r = torch.randn(3, 20, 2 * N, generator=g)[..., N:]
    for label, w in weights.items():
        for bias, res in ((None, None), (b, r)):
            _check_linear32(x, w, bias, res, f"linear fp32 {mode} {label} weight")


@pytest.fixture
def panel_gemm():
    """``panel_gemm(mode)`` sets the widened panels' GEMM for one test."""
    yield from _restoring(_C.set_cpu_panel_gemm)


# the widened panels' GEMM `auto` takes here (csrc/cpu/cpu_features.h): the packed AVX2 + FMA kernel on
# AVX2 builds (csrc/cpu/packed_gemm.h), else the fp32 library; `packed` has the kernel on AVX-512 builds too
AUTO_PANELS = "packed" if _C.cpu_isa() == "avx2" else AUTO_GEMM32
HAS_PACKED = _C.cpu_isa() in ("avx2", "avx512")
# (panel mode, fp32 library): the packed kernel, and each library when the panels go to it
PANEL_MODES = [("packed", "onednn"), ("library", "onednn"), ("library", "aten")]
# panels of one and several 16-row blocks with a tail (N 1043 = 65 blocks + 3 rows; 5 rows: one partial
# block), K one k block with a tail of the 8-column transpose (129), K split into k blocks (3000: 6 of 500),
# x with a tail of the 6-row micro-kernel (100 = 16 * 6 + 4) and more than one 192-row chunk (513)
PANEL_SHAPES = ((100, (1043, 129)), (513, (5, 3000)), (9, (40, 1000)), (200, (33, 2051)))


@pytest.mark.parametrize("mode,library", PANEL_MODES)
@pytest.mark.parametrize("dtype", DTYPES16)
def test_widened_panels_on_each_gemm(gemm16_mode, gemm32_mode, panel_gemm, mode, library, dtype):
    # the widened 16-bit GEMM multiplies its fp32 panels on the packed kernel or on the same library as
    # fp32 linear; both agree with the fp64 reference
    gemm16_mode("widen")
    gemm32_mode(library)
    panel_gemm(mode)
    for M, (N, K) in PANEL_SHAPES:
        x, w, b, r = _operands(M, N, K, dtype, 7)
        for bias, res in ((None, None), (b, r)):
            _check_linear(x, w, bias, res, f"widened linear {dtype} on {mode}/{library} M={M} N={N} K={K}")


@pytest.mark.parametrize("mode,library", PANEL_MODES)
@pytest.mark.parametrize("bits,group", [(8, 32), (4, 64)])
def test_quantized_panels_on_each_gemm(gemm32_mode, panel_gemm, mode, library, bits, group):
    # quant_linear beyond decode sizes widens its panels (q * scale) into the same GEMMs: against the
    # dequantize-then-fp64 composition, within the low-precision rule of the fp32-dequantized reference
    gemm32_mode(library)
    panel_gemm(mode)
    quant = impl("quant_linear", "cpp", "cpu")
    for M, (N, K) in ((100, (1043, 128)), (37, (40, 3008))):
        x, w, b, r = _operands(M, N, K, torch.float32, 11)
        qw, s = quantize_weight(w, bits, group)
        for dtype in (torch.float32, torch.bfloat16):
            args = (x.to(dtype), qw, s, b.to(dtype), r.to(dtype))
            out = quant(*args, bits, group)
            ref64 = args[0].double() @ dequantize_weight(qw, s, bits, group, torch.float64).t() + args[3].double() \
                + args[4].double()
            atol = atol_for("linear", torch.float32, ref64) if dtype == torch.float32 else ATOL[dtype] * K ** 0.5
            assert_close_to_ref(out, ref64, quant_linear_ref(*args, bits=bits, group_size=group), atol,
                                name=f"quant_linear int{bits} {dtype} {mode}/{library} M={M} N={N} K={K}")


def test_panel_gemm_choice_and_bad_values(gemm32_mode, panel_gemm):
    panel_gemm("auto")
    assert _C.cpu_panel_gemm() == AUTO_PANELS
    panel_gemm("library")
    gemm32_mode("aten")
    assert _C.cpu_panel_gemm() == "aten"
    panel_gemm("packed")
    assert _C.cpu_panel_gemm() == ("packed" if HAS_PACKED else "aten")
    with pytest.raises(ValueError, match="widened panels' GEMM mode must be auto, packed or library, got 'blis'"):
        _C.set_cpu_panel_gemm("blis")


def test_gemm32_library_and_bad_values(gemm32_mode):
    gemm32_mode("aten")
    assert _C.cpu_gemm32_library() == "aten"
    gemm32_mode("auto")
    assert _C.cpu_gemm32_library() == AUTO_GEMM32
    with pytest.raises(ValueError, match="fp32 GEMM mode must be auto, onednn or aten, got 'mkl'"):
        _C.set_cpu_gemm32("mkl")


@pytest.mark.parametrize("dtype", DTYPES16)
def test_linear16_widened_x_slices(gemm16_mode, dtype):
    # K = 20000: x slices of at most 16 MiB in fp32 are 209 rows, so 300 rows are two slices of 160 and
    # 140: the second slice's x, residual and output rows start at row 160
    gemm16_mode("widen")
    M, N, K = 300, 40, 20000
    x, w, b, r = _operands(M, N, K, dtype, 1)
    _check_linear(x.view(2, M // 2, K), w, b, r.view(2, M // 2, N), "linear two x slices")


@pytest.mark.parametrize("grad_mode", ["inference_mode", "no_grad"])
def test_widened_gemm_in_worker_threads(gemm16_mode, grad_mode):
    # the panels' GEMMs run in at::parallel_for's worker threads, which do not inherit the caller's
    # InferenceMode: an inference-mode caller (fastlm's engine) must work as any other, for the 16-bit
    # linear and the quantized one (which shares the widened GEMM), with more than one panel per thread
    gemm16_mode("widen")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, w, _, r = _operands(64, 3000, 256, torch.bfloat16, 6)
        qw, s = quantize_weight(w.float(), 8, 256)
        quant = impl("quant_linear", "cpp", "cpu")
        with torch.inference_mode() if grad_mode == "inference_mode" else torch.no_grad():
            for xx, ww, rr in ((x, w, r), (x.clone(), w.clone(), r.clone())):  # inference tensors the second time
                _check_linear(xx, ww, None, rr, f"linear under {grad_mode}")
                out = quant(xx, qw, s, None, rr, 8, 256)
                torch.testing.assert_close(out, quant_linear_ref(xx, qw, s, None, rr, bits=8, group_size=256),
                                           rtol=1e-2, atol=1e-2)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES16)
def test_linear16_layouts(gemm16_mode, mode, dtype):
    gemm16_mode(mode)
    g = torch.Generator().manual_seed(2)
    K, N = 96, 40
    x_rows = torch.randn(3, 20, K + 24, generator=g).to(dtype)[..., :K]  # strided rows (a slice of a wider x)
    x_t = torch.randn(K, 60, generator=g).to(dtype).t()                # no row stride at all: copied
    fused = (torch.randn(3 * N, K, generator=g) / 10).to(dtype)
    w_view = fused[N:2 * N]                                            # a row view into fused [q | k | v]
    w_t = (torch.randn(K, N, generator=g) / 10).to(dtype).t()          # columns contiguous: copied
    r_strided = torch.randn(3, 20, N + 8, generator=g).to(dtype)[..., :N]
    b_strided = torch.randn(2 * N, generator=g).to(dtype)[::2]
    for x in (x_rows, x_t):
        for w in (w_view, w_t):
            r = r_strided if x.dim() == 3 else r_strided.reshape(60, N)
            _check_linear(x, w, b_strided, r, f"linear {mode} layout x{tuple(x.stride())} w{tuple(w.stride())}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES16)
@pytest.mark.parametrize("mnk", [(0, 8, 32), (20, 0, 32), (20, 8, 0)])
def test_linear16_zero_sizes(gemm16_mode, mode, dtype, mnk):
    gemm16_mode(mode)
    M, N, K = mnk
    x, w, b, r = _operands(M, N, K, dtype, 3)
    for bias, res in ((None, None), (b, None), (b, r)):
        out = LINEAR(x, w, bias, res)
        assert out.shape == (M, N) and out.dtype == dtype
        torch.testing.assert_close(out, linear_ref(x, w, bias, res), rtol=0, atol=0)  # K = 0: bias + residual


@pytest.mark.parametrize("dtype", DTYPES16)
def test_auto_is_one_of_the_paths(gemm16_mode, dtype):
    x, w, b, _ = _operands(33, 70, 200, dtype, 4)
    outs = {}
    for mode in ("aten", "widen", "auto"):
        gemm16_mode(mode)
        outs[mode] = _check_linear(x, w, b, None, f"linear mode {mode}")
    widened = _C.cpu_gemm16_widens(str(dtype).removeprefix("torch."))
    assert torch.equal(outs["auto"], outs["widen" if widened else "aten"])


def test_auto_follows_the_cpu(gemm16_mode):
    gemm16_mode("auto")
    if os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"):
        pytest.skip("ONEDNN_MAX_CPU_ISA caps the features here; test_isa_cap_and_env covers the cap")
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert _C.cpu_gemm16_widens("bfloat16") == (not native_bf16)
    if os.path.exists("/proc/cpuinfo") and not torch.cpu._is_amx_fp16_supported():
        with open("/proc/cpuinfo") as f:  # torch has no AVX512-FP16 probe
            avx512_fp16 = "avx512_fp16" in f.read()
        assert _C.cpu_gemm16_widens("float16") == (not avx512_fp16)
    gemm16_mode("widen")
    assert _C.cpu_gemm16_widens("bfloat16") and _C.cpu_gemm16_widens("float16")
    gemm16_mode("aten")
    assert not _C.cpu_gemm16_widens("bfloat16") and not _C.cpu_gemm16_widens("float16")


def test_mode_bad_values(gemm16_mode):
    with pytest.raises(ValueError, match="16-bit GEMM mode must be auto, widen or aten, got 'fast'"):
        _C.set_cpu_gemm16("fast")
    with pytest.raises(ValueError, match="dtype must be 'bfloat16' or 'float16', got 'float32'"):
        _C.cpu_gemm16_widens("float32")


ENV_SCRIPT = """
import torch
from fastlm import _C
from fastlm.ops._registry import impl
for call in (lambda: (_C.cpu_gemm16_widens("bfloat16"), _C.cpu_gemm16_widens("float16")),
             lambda: (_C.cpu_gemm32_library(), tuple(impl("linear", "cpp", "cpu")(torch.randn(20, 8),
                                                                                torch.randn(4, 8)).shape)),
             lambda: tuple(impl("linear", "cpp", "cpu")(torch.randn(20, 8).bfloat16(),
                                                        torch.randn(4, 8).bfloat16()).shape)):
    try:
        print(*call())
    except ValueError as e:
        print("ValueError:", e)
"""


def _run_with_env(**env):
    full = {k: v for k, v in os.environ.items()
            if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "FASTLM_CPU_GEMM16", "FASTLM_CPU_GEMM32")}
    full.update(env)
    res = subprocess.run([sys.executable, "-c", ENV_SCRIPT], capture_output=True, text=True, timeout=120, env=full,
                         cwd=tempfile.gettempdir())
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip().splitlines()


def test_isa_cap_and_env():
    # oneDNN's cap hides native 16-bit dot products from fastlm as from ATen (an AVX2 or pre-BF16 AVX-512
    # CPU emulated); FASTLM_CPU_GEMM16 forces a path; a bad value is one clear error
    onednn = AUTO_GEMM32
    assert _run_with_env(ONEDNN_MAX_CPU_ISA="AVX512_CORE") == ["True True", f"{onednn} (20, 4)", "20 4"]
    assert _run_with_env(FASTLM_CPU_GEMM16="aten", DNNL_MAX_CPU_ISA="avx2", FASTLM_CPU_GEMM32="aten") == [
        "False False", "aten (20, 4)", "20 4"]
    message = "ValueError: fastlm: FASTLM_CPU_GEMM16 must be auto, widen or aten, got 'fastest'"
    assert _run_with_env(FASTLM_CPU_GEMM16="fastest") == [message, f"{onednn} (20, 4)", message]
    message32 = "ValueError: fastlm: FASTLM_CPU_GEMM32 must be auto, onednn or aten, got 'mkl'"
    plain, bad32 = _run_with_env(), _run_with_env(FASTLM_CPU_GEMM32="mkl")
    assert bad32[:2] == [plain[0], message32]  # (a 16-bit GEMM widened on this CPU would raise it too)


def test_swiglu_fp32_relative_accuracy():
    # silu(g) = g / (1 + exp(-g)) ~ g * exp(g) for g << 0: the relative error of the kernels' exp
    # (exp_u1, csrc/cpu/vec_util.h: its AVX-512 or AVX2 form, whichever this build has) shows directly
    swiglu = impl("swiglu", "cpp", "cpu")
    g = torch.linspace(-87.0, 88.0, 100_003)
    out = swiglu(torch.cat([g, torch.ones_like(g)]).view(1, -1))[0]
    ref = g.double() / (1 + torch.exp(-g.double()))
    rel = ((out.double() - ref).abs() / ref.abs().clamp_min(1e-300)).max().item()
    assert rel < 1e-6, f"max relative error {rel:.2e} of fp32 silu (a few ulp expected)"
    edge = torch.tensor([-1e4, -104.0, -88.8, 88.8, 1e4, float("inf"), -float("inf"), float("nan")])
    got = swiglu(torch.cat([edge, torch.ones_like(edge)]).view(1, -1))[0]
    want = edge.double() / (1 + torch.exp(-edge.double()))
    assert torch.equal(got.isnan(), want.isnan())
    # exp(-g) overflows fp32 for g < -88.7, so silu underflows to -0 there (as fp32 arithmetic must)
    torch.testing.assert_close(got.double(), want, equal_nan=True, rtol=1e-6, atol=1e-36)
