"""decode_attention on every backend against SDPA and its reference (tests/_tolerance.py): ragged lengths,
garbage past them (never read), strided queries and lengths, lengths outside [1, Tmax], the Triton kernel's
own guard; the reference against SDPA. Inputs: tests/ops/_inputs.py."""
import math

import pytest
import torch

from _api import decode_attention, decode_attention_ref
from _gpu import requires_gpu_mode
from _inputs import (DECODE_CASES, DTYPES, DecodeCase, decode_inputs, grid, randn, run_opcheck, sdpa_decode,
                     strided_lengths, targets)
from _tolerance import assert_close_to_ref, assert_gradients_match, atol_for

OP = "decode_attention"
# on Triton: its kernel's boundary cases in every dtype, a family's shape and B = 0 once
_TRITON = ("gqa2_ragged_chunks", "gqa5_d80_one_chunk", "d160_second_chunk", "context_1", "context_4k")


def _triton_subset(dtype, case):
    return case.name in _TRITON or case.name in ("arcee", "no_sequences") and dtype == torch.bfloat16


@pytest.mark.parametrize("target,dtype,case", grid(
    OP, DTYPES, DECODE_CASES, triton=_triton_subset,
    reference=lambda dtype, case: dtype == torch.bfloat16 and case.name in ("arcee", "gqa2_ragged_chunks")))
def test_matches_reference(target, dtype, case):
    q, kc, vc, lengths, clean_k, clean_v = decode_inputs(case, dtype, target.device)
    scale = 1 / math.sqrt(case.head_dim)
    out = decode_attention(q, kc, vc, lengths, scale, backend=target.backend)
    check_decode(out, q, clean_k, clean_v, lengths, scale)


def check_decode(out, q, clean_k, clean_v, lengths, scale):
    """Shape and dtype, no slot past a length read, SDPA's answer over the valid slots (and the reference's)."""
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not torch.isnan(out).any(), "a slot past a length was read (NaN there)"
    if not lengths.numel():
        return
    ref32 = sdpa_decode(q.float(), clean_k.float(), clean_v.float(), lengths, scale)
    ref_lo = sdpa_decode(q, clean_k, clean_v, lengths, scale)
    assert_close_to_ref(out, ref32, ref_lo, atol_for(OP, q.dtype, ref32), name="vs SDPA")
    # and the contract's reference, itself SDPA's answer in fp32
    ref_c = decode_attention_ref(q.float(), clean_k.float(), clean_v.float(), lengths, scale)
    torch.testing.assert_close(ref_c, ref32, atol=1e-5, rtol=1e-5)
    assert_close_to_ref(out, ref_c, ref_lo, atol_for(OP, q.dtype, ref_c), name="vs decode_attention_ref")


@pytest.mark.parametrize("target", targets(OP))
def test_strided_q(target):
    q = randn(2, 8, 3, 64, device=target.device)[:, :, 1]  # [B, H, D] with a non-contiguous head stride
    kc, vc = randn(2, 2, 20, 64, device=target.device, seed=1), randn(2, 2, 20, 64, device=target.device, seed=2)
    lengths = torch.tensor([20, 7], device=target.device)
    out = decode_attention(q, kc, vc, lengths, 0.125, backend=target.backend)
    torch.testing.assert_close(out, decode_attention_ref(q, kc, vc, lengths, 0.125), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("target,dtype,lengths_dtype", grid(OP, (torch.float32, torch.bfloat16),
                                                            (torch.int32, torch.int64)))
def test_strided_lengths(target, dtype, lengths_dtype):
    """lengths read at their stride: a stride-3 view whose neighbours are out of range, int32 and int64."""
    case = DecodeCase("strided", 4, 2, 32, 300, (5, 300, 129), lengths_dtype=lengths_dtype)
    q, kc, vc, lengths, clean_k, clean_v = decode_inputs(case, dtype, target.device, seed=50)
    lengths = strided_lengths(lengths, 3, case.t_max + 1000)
    check_decode(decode_attention(q, kc, vc, lengths, 0.2, backend=target.backend), q, clean_k, clean_v, lengths, 0.2)


@pytest.mark.parametrize("target", targets(OP, backends=("cpp",), device="cpu"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads,lengths", [(4, (700, 5)), (6, (1000, 5)), (8, (300,)), (3, (1,))])
def test_keys_split_across_threads(target, dtype, threads, lengths):
    """Fewer (batch row, kv head) tasks than threads: the C++ kernel splits each sequence's keys into ranges
    (at least 256 keys each, as even as multiples of 16 keys allow) and merges their softmaxes; ranges past a
    short sequence's length are empty. (4, (700, 5)): two ranges each (352 + 348 keys), the short row's second
    one empty; (6, (1000, 5)): three ranges (336 + 336 + 328 keys, none starting at a 128-key block boundary
    but the first); (8, (300,)) and (3, (1,)): too few keys to split."""
    case = DecodeCase("split", 5, 1, 128, max(lengths) + 3, lengths)
    q, kc, vc, lengths_t, clean_k, clean_v = decode_inputs(case, dtype, target.device, seed=60)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = decode_attention(q, kc, vc, lengths_t, 128 ** -0.5, backend=target.backend)
    finally:
        torch.set_num_threads(before)
    check_decode(out, q, clean_k, clean_v, lengths_t, 128 ** -0.5)


@pytest.mark.parametrize("target", targets(OP, device="cpu"))
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -float("inf")])
def test_garbage_past_the_lengths_is_never_read(target, fill):
    q, kc, vc = randn(3, 4, 16), randn(3, 2, 9, 16, seed=1), randn(3, 2, 9, 16, seed=2)
    lengths = torch.tensor([2, 9, 5])
    expect = decode_attention(q, kc, vc, lengths, 0.25, backend="torch")
    for b, n in enumerate(lengths.tolist()):
        kc[b, :, n:], vc[b, :, n:] = fill, fill
    out = decode_attention(q, kc, vc, lengths, 0.25, backend=target.backend)
    assert out.isfinite().all()
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on the NaN rows
@pytest.mark.parametrize("target", targets(OP, backends=("triton",), device="cpu"))
def test_triton_kernel_guards_lengths(target, monkeypatch):
    """What runs unchecked on CUDA: a length past Tmax reads only the Tmax slots there are (as the
    reference, which masks by slot index), a length of 0 gives NaN rows (as the reference's softmax
    over no slots)."""
    import fastlm.kernels.decode_attention as kd

    monkeypatch.setattr(kd, "check_lengths", lambda *a: None)
    guard = torch.full((2, 2, 12, 16), float("nan"))
    guard[:, :, :9] = randn(2, 2, 9, 16, seed=1)
    kc = vc = guard[:, :, :9]  # slots past Tmax hold NaN: a read past the cache would show
    q = randn(2, 4, 16)
    out = decode_attention(q, kc, vc, torch.tensor([12, 0]), 0.25, backend=target.backend)
    expect = decode_attention(q, kc, vc, torch.tensor([9, 9]), 0.25, backend="torch")
    torch.testing.assert_close(out[0], expect[0])
    assert out[1].isnan().all()


@requires_gpu_mode
@pytest.mark.parametrize("target", targets(OP, backends=("triton",), device="cuda"))
def test_lengths_clamped_on_cuda(target):
    """On CUDA lengths are not checked (a host sync): one above Tmax attends to all Tmax slots, never past
    the cache, as the reference does (fastlm.ops.attention's docstring)."""
    q, kc, vc, lengths, _, _ = decode_inputs(DecodeCase("full", 4, 2, 64, 100, (100, 100)), torch.bfloat16, "cuda",
                                             seed=60)
    over = torch.tensor([100 + 5000, 100], dtype=torch.int32, device="cuda")
    out = decode_attention(q, kc, vc, over, 0.125, backend=target.backend)
    assert torch.equal(out, decode_attention(q, kc, vc, lengths, 0.125, backend=target.backend))


@pytest.mark.parametrize("target", targets(OP, kernels=True, device="cpu"))
def test_gradients_equal_the_references(target):
    kc, vc = randn(2, 2, 6, 16, seed=2), randn(2, 2, 6, 16, seed=3)
    assert_gradients_match(
        lambda b, q_, k_, v_: decode_attention(q_, k_, v_, torch.tensor([3, 6]), 0.25, backend=b).square().sum(),
        (randn(2, 4, 16, seed=7), kc, vc), target.backend, all_inputs=True)


@pytest.mark.parametrize("target", targets(OP, kernels=True))
def test_opcheck(target):
    run_opcheck(OP, target)


@pytest.mark.parametrize("Hkv", [1, 2, 8])
@pytest.mark.parametrize("T", [1, 17, 300])
def test_reference_matches_sdpa(Hkv, T):
    B, H, D, t_max = 3, 8, 80, 320
    q = randn(B, H, D)
    kc, vc = randn(B, Hkv, t_max, D, seed=1), randn(B, Hkv, t_max, D, seed=2)
    lengths = torch.tensor([T, max(1, T // 2), max(1, T - 1)])
    out = decode_attention_ref(q, kc, vc, lengths, D ** -0.5)
    for b in range(B):
        n = int(lengths[b])
        expect = torch.nn.functional.scaled_dot_product_attention(q[b:b + 1, :, None], kc[b:b + 1, :, :n],
                                                                  vc[b:b + 1, :, :n], enable_gqa=True)[:, :, 0]
        torch.testing.assert_close(out[b:b + 1], expect, rtol=1e-5, atol=1e-5)
