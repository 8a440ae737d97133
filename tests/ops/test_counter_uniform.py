"""counter_uniform, the sampler's counter-based uniforms: each kernel bit for bit its reference (integer hashing and an
exact conversion: no tolerance), over seeds and counters past 32 bits and negative, zero sizes and several rows;
the values in (0, 1) and spread as uniforms; one clear error per bad argument."""
import pytest
import torch
from _api import counter_uniform, counter_uniform_ref
from _inputs import run_opcheck, targets

KEYS = [(0, 0), (7, 3), (-5, 2 ** 40 + 9), (2 ** 33 + 1, -1), (123, 2 ** 32 - 1), (-(2 ** 63), 2 ** 63 - 1)]
SHAPES = [(1, 32000), (3, 1001), (64, 5000), (0, 5), (4, 0), (1, 7)]


def key(seed, counter, device="cpu"):
    return torch.tensor([seed], device=device), torch.tensor([counter], device=device)


@pytest.mark.parametrize("target", targets("counter_uniform"))
@pytest.mark.parametrize("seed,counter", KEYS)
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_matches_the_reference_bit_for_bit(target, seed, counter, rows, cols):
    s, c = key(seed, counter, target.device)
    u = counter_uniform(s, c, rows, cols, backend=target.backend)
    assert u.dtype == torch.float32 and u.shape == (rows, cols) and u.device == s.device
    assert torch.equal(u, counter_uniform_ref(s, c, rows, cols))


def test_only_the_low_32_bits_of_seed_and_counter_count():
    assert torch.equal(counter_uniform(*key(5 + 2 ** 32, 2 ** 33), 2, 10), counter_uniform(*key(5, 0), 2, 10))
    assert not torch.equal(counter_uniform(*key(5, 1), 2, 10), counter_uniform(*key(5, 0), 2, 10))
    assert not torch.equal(counter_uniform(*key(6, 0), 2, 10), counter_uniform(*key(5, 0), 2, 10))


def test_values_are_uniform_in_the_open_interval():
    u = counter_uniform(*key(1, 2), 64, 1000)
    assert 0 < u.min() and u.max() < 1
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max() < 0.01, hist
    assert abs(torch.corrcoef(torch.stack([u.flatten()[:-1], u.flatten()[1:]]))[0, 1].item()) < 0.02  # neighbours


@pytest.mark.parametrize("target", targets("counter_uniform", kernels=True))
def test_opcheck(target):
    run_opcheck("counter_uniform", target)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("args,err,match", [
    ((torch.tensor([1], dtype=torch.int32), torch.tensor([0]), 1, 4), ValueError, "seed must be an int64 tensor"),
    ((torch.tensor([1]), torch.tensor([[0]]), 1, 4), ValueError, "counter must be an int64 tensor of shape"),
    ((1, torch.tensor([0]), 1, 4), TypeError, "seed must be a torch.Tensor"),
    ((torch.tensor([1]), torch.tensor([0]), -1, 4), ValueError, "rows must be >= 0"),
    ((torch.tensor([1]), torch.tensor([0]), 1, 2.0), TypeError, "cols must be an int"),
    ((torch.tensor([1]), torch.tensor([0], device="meta"), 1, 4), ValueError, "counter is on meta but seed is on cpu"),
])
def test_bad_arguments(backend, args, err, match):
    with pytest.raises(err, match=match):
        counter_uniform(*args, backend=backend)


def test_the_cpu_kernel_checks_its_own_arguments():
    with pytest.raises(ValueError, match="seed must be an int64 tensor of shape"):
        torch.ops.fastlm.counter_uniform(torch.tensor([1, 2]), torch.tensor([0]), 1, 4)
    with pytest.raises(ValueError, match="rows and cols must be >= 0"):
        torch.ops.fastlm.counter_uniform(torch.tensor([1]), torch.tensor([0]), 1, -4)


@pytest.mark.parametrize("target", targets("counter_uniform"))
def test_the_largest_value_stays_below_one(target):
    """(seed 11, counter 1) holds the largest value the conversion makes, 1 - 2**-24 (the hash's top 23 bits all
    set): below 1, so the sampler's Gumbel noise log(-log(u)) stays finite. (The conversion took 24 bits before,
    and its largest value rounded to exactly 1 in fp32: noise of -inf, and the draw took that candidate.)"""
    s, c = key(11, 1, target.device)
    u = counter_uniform(s, c, 32, 32000, backend=target.backend)
    assert u[12, 16461].item() == u.max().item() == 1 - 2 ** -24
    assert u.min().item() >= 2 ** -24
    assert torch.isfinite(torch.log(-torch.log(u))).all()
