"""Tolerance rule for low-precision kernels (the one flash-attention's tests use).

Compute the reference twice from the same inputs: once upcast (fp32 or fp64: ``ref_fp32``) and once in
the kernel's dtype (``ref_lowp``, i.e. what eager PyTorch gives). The kernel passes when its error
against the upcast reference is at most ``factor`` times PyTorch's own error plus a small ``atol``:

    max|out - ref_fp32| <= factor * max|ref_lowp - ref_fp32| + atol

so a kernel is held to "as accurate as PyTorch in that dtype", whatever the dtype and op.
"""
from __future__ import annotations

import torch


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in fp64 (0.0 for empty tensors); NaNs in the same places count as equal."""
    if a.numel() == 0:
        return 0.0
    a, b = a.detach().double(), b.detach().double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    diff = (a - b).abs().masked_fill(both_nan, 0.0)
    return float(diff.nan_to_num(nan=float("inf")).max())


def assert_close_to_ref(out: torch.Tensor, ref_fp32: torch.Tensor, ref_lowp: torch.Tensor, atol: float,
                        factor: float = 2.0, name: str = "output") -> tuple[float, float]:
    """Assert ``max|out - ref_fp32| <= factor * max|ref_lowp - ref_fp32| + atol``; returns both errors.

    ``out`` and ``ref_lowp`` are in the low-precision dtype under test, ``ref_fp32`` is the upcast
    reference; shapes must match exactly.
    """
    for label, t in (("ref_fp32", ref_fp32), ("ref_lowp", ref_lowp)):
        if tuple(t.shape) != tuple(out.shape):
            raise AssertionError(f"{name}: shape {tuple(out.shape)} differs from {label} {tuple(t.shape)}")
    err_kernel = max_abs_err(out, ref_fp32)
    err_torch = max_abs_err(ref_lowp, ref_fp32)
    bound = factor * err_torch + atol
    assert err_kernel <= bound, (
        f"{name} ({out.dtype}): max|kernel - ref_fp32| = {err_kernel:.3e} exceeds "
        f"{factor} * max|torch_lowp - ref_fp32| ({err_torch:.3e}) + atol ({atol:.1e}) = {bound:.3e}")
    return err_kernel, err_torch


# ----------------------------------------------------------------------------- the op tests' table

# atol per (op, dtype), scaled by the reference's magnitude: atol * max(1, max|ref|). The error allowance
# proper is the 2x-PyTorch term above; atol covers what PyTorch's own error does not: an fp32 kernel against
# an fp32 reference (rounding order only), a tensor whose low-precision reference happens to be exact.
# Measured on the CPU kernels and the Triton interpreter (AMD EPYC Zen 4), the 16-bit kernels need no atol
# at all and the fp32 ones at most 7e-7 (decode attention); each value here leaves a margin of 3x or more
# for the compiled CUDA kernels' math, and is below what every earlier per-file table allowed.
_F32, _BF16, _F16 = torch.float32, torch.bfloat16, torch.float16
_LOW = {_BF16: 2e-5, _F16: 5e-6}
ATOL = {
    "add_rms_norm": {_F32: 2e-6, **_LOW},
    "add_layer_norm": {_F32: 2e-6, **_LOW},
    "qkv_rope": {_F32: 5e-6, **_LOW},
    "qkv_rope_cache": {_F32: 5e-6, **_LOW},
    "swiglu": {_F32: 1e-6, **_LOW},
    "relu2": {_F32: 1e-6, **_LOW},
    "decode_attention": {_F32: 5e-6, **_LOW},
    "prefill_attention": {_F32: 5e-6, **_LOW},
    "linear": {_F32: 2e-6, **_LOW},
    "quant_linear": {_F32: 2e-6, **_LOW},  # against the fp64 composition (measured: no atol needed, both backends)
}
ATOL["swiglu_"], ATOL["relu2_"] = ATOL["swiglu"], ATOL["relu2"]


def atol_for(op: str, dtype: torch.dtype, ref: torch.Tensor | None = None) -> float:
    """The table's atol for ``op`` in ``dtype``, scaled by max(1, max|ref|)."""
    scale = 1.0
    if ref is not None and ref.numel():
        finite = ref.detach()[torch.isfinite(ref.detach())]
        scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    return ATOL[op][dtype] * scale


def upcast(value, dtype: torch.dtype = torch.float32):
    """Floating tensors in ``dtype`` (a copy), anything else as it is."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type != "meta":
        return value.detach().to(dtype)
    return value


def _as_tuple(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def reference_pair(ref_fn, *args, upcast_to: torch.dtype = torch.float32, **kwargs) -> tuple[tuple, tuple]:
    """(ref_hi, ref_lowp): ``ref_fn`` on the arguments upcast to ``upcast_to``, and on them as they are;
    each a tuple of outputs."""
    hi = ref_fn(*(upcast(a, upcast_to) for a in args), **{k: upcast(v, upcast_to) for k, v in kwargs.items()})
    return _as_tuple(hi), _as_tuple(ref_fn(*args, **kwargs))


def assert_op_matches(op: str, backend: str, out, ref_hi, ref_lowp, name: str | None = None) -> None:
    """Each output of ``op`` from ``backend`` against its reference pair: same dtype and shape, and the
    tolerance rule with the table's atol. The torch backend is the reference itself: bit for bit."""
    outs, his, lows = _as_tuple(out), _as_tuple(ref_hi), _as_tuple(ref_lowp)
    assert len(outs) == len(lows), f"{op}: {len(outs)} outputs, the reference has {len(lows)}"
    for i, (o, hi, lo) in enumerate(zip(outs, his, lows)):
        label = f"{name or op}[{i}]"
        assert o.dtype == lo.dtype, f"{label}: dtype {o.dtype} != reference {lo.dtype}"
        if backend == "torch":
            assert o.shape == lo.shape and torch.equal(o.nan_to_num(), lo.nan_to_num()), \
                f"{label}: backend torch differs from the reference"
        assert_close_to_ref(o, hi, lo, atol_for(op, lo.dtype, hi), name=label)


def _gradients(loss_fn, leaves):
    for t in leaves:
        t.grad = None
    loss_fn(*leaves).backward()
    return [None if t.grad is None else t.grad.clone() for t in leaves]


def assert_gradients_match(loss_fn, inputs, backend: str, *, all_inputs: bool = False, rtol: float = 1e-4,
                           atol: float = 1e-5) -> None:
    """``loss_fn(backend, *leaves)`` (a scalar built from public ops) gives, with ``backend``, the gradients
    the torch backend gives: the same inputs get one (all of them when ``all_inputs``), equal within
    rtol / atol, and no warning is raised on the way (not torch's "autograd kernel was not registered")."""
    import warnings

    ref_leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    expect = _gradients(lambda *a: loss_fn("torch", *a), ref_leaves)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _gradients(lambda *a: loss_fn(backend, *a), leaves)
    assert [g is None for g in got] == [e is None for e in expect], "different inputs got a gradient"
    if all_inputs:
        assert all(g is not None for g in got), "an input got no gradient"
    for i, (g, e) in enumerate(zip(got, expect)):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=rtol, atol=atol, msg=lambda m: f"input {i}: {m}")


def assert_clean_error(exc: Exception, overlap_message: str) -> None:
    """A public op's error for bad input: a TypeError / ValueError naming the problem (or
    BackendUnavailableError), or torch's own RuntimeError for an in-place write into overlapping memory
    (``overlap_message``). Never an internal error."""
    from fastlm.errors import BackendUnavailableError

    if isinstance(exc, RuntimeError) and overlap_message.split(":")[0] in str(exc):
        return
    assert type(exc) in (TypeError, ValueError, BackendUnavailableError), f"internal error escaped: {exc!r}"
