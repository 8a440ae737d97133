"""The decode engine (fastlm.engine): greedy parity with transformers' generate for every variant,
compiled decode step, CUDA graphs (GPU only), capacity, EOS, sampling, streaming."""
from __future__ import annotations

import warnings

import pytest
import torch

import fastlm
from fastlm.engine.engine import engine_for
from fastlm.engine.runner import CACHE_FULL, RUNNING
from fastlm.engine.sampling import SamplingConfig, first_argmax, sample, uniform
from fastlm.ops import backend_status
from _models import VARIANTS, build_model, left_padded_batch, make_config, random_ids

NEW = 24
EOS = 2
BACKENDS = ["torch", "cpp", "triton"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU test mode (README: GPU): needs a CUDA GPU (CUDA graphs, CUDA tensors)")


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared machine
    yield
    torch.set_num_threads(old)


_MODELS: dict = {}


def model_for(variant: str):
    if variant not in _MODELS:
        _MODELS[variant] = build_model(variant)
    return _MODELS[variant]


def require_backend(backend: str, device_type: str = "cpu") -> None:
    ok, why = backend_status(backend, device_type)
    if not ok:
        pytest.skip(f"backend {backend} not built/available ({why})")


def gen(model, inputs, **kw):
    """fastlm.generate on the reference backend unless a test names another (other tests may have left
    the shared model patched with any backend; "auto" would keep it)."""
    kw.setdefault("backend", "torch")
    return fastlm.generate(model, inputs, **kw)


def strm(model, inputs, **kw):
    kw.setdefault("backend", "torch")
    return fastlm.stream(model, inputs, **kw)


def trim_eos(tokens: list[int], eos: int = EOS) -> list[int]:
    """HF keeps generating pad after EOS; fastlm stops at (and keeps) the EOS."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def hf_greedy(model, ids, mask=None, new=NEW):
    fastlm.unpatch(model)  # HF's own modules, not the fused ones
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                             max_new_tokens=new, do_sample=False)
    return [trim_eos(row) for row in out[:, ids.shape[1]:].tolist()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_transformers(variant, backend):
    require_backend(backend)
    new = NEW
    if backend == "triton" and not torch.cuda.is_available():
        # On CPU tensors Triton kernels run in the interpreter: ~1000x slower. One variant, fewer tokens.
        if variant != "helium_gqa":
            pytest.skip("backend triton is available here only through TRITON_INTERPRET (slow); "
                        "checked on helium_gqa only")
        new = 6
    model = model_for(variant)
    ids = random_ids(1, 7, seed=1)
    expected = hf_greedy(model, ids, new=new)[0]
    assert fastlm.generate(model, ids[0], max_new_tokens=new, backend=backend) == expected

    ids, mask = left_padded_batch([5, 11, 3], seed=2)
    expected = hf_greedy(model, ids, mask, new=new)
    result = fastlm.generate(model, ids, attention_mask=mask, max_new_tokens=new, backend=backend,
                             return_result=True)
    for b in range(3):
        assert result.tokens[b] == expected[b], f"sequence {b}"
        assert result.finish_reasons[b] == ("eos" if expected[b][-1] == EOS else "length")
    assert result.backend == backend and result.mode == "eager"


def test_compiled_decode_step_matches_eager():
    """torch.compile(fullgraph=True) of the decode step (the CPU proxy for "capturable"): no graph break,
    same tokens. aot_eager traces and functionalises the whole step without paying for C++ codegen."""
    model = model_for("stablelm_hd80_qknorm_parallel")
    ids, mask = left_padded_batch([6, 2, 9], seed=3)
    eager = gen(model, ids, attention_mask=mask, max_new_tokens=12, backend="torch")
    torch._dynamo.reset()
    result = gen(model, ids, attention_mask=mask, max_new_tokens=12, backend="torch",
                             compile="aot_eager", return_result=True)
    assert result.mode == "compiled"
    assert result.tokens == eager
    sampled = dict(temperature=0.9, top_k=20, top_p=0.9, seed=7)
    assert (gen(model, ids, attention_mask=mask, max_new_tokens=8, backend="torch",
                            compile="aot_eager", **sampled)
            == gen(model, ids, attention_mask=mask, max_new_tokens=8, backend="torch", **sampled))


def test_inductor_decode_step_matches_eager():
    """The real CPU compiler (inductor, C++ codegen) on the whole decode step."""
    model = model_for("helium_gqa")
    ids, mask = left_padded_batch([5, 9, 3], seed=2)
    eager = gen(model, ids, attention_mask=mask, max_new_tokens=12, backend="torch")
    assert gen(model, ids, attention_mask=mask, max_new_tokens=12, backend="torch",
                           compile=True) == eager


@needs_cuda
@pytest.mark.parametrize("variant", ["helium_gqa", "persimmon_qknorm"])
def test_cuda_graph_matches_eager(variant):
    model = build_model(variant).cuda()
    ids, mask = left_padded_batch([5, 11, 3], seed=2)
    ids, mask = ids.cuda(), mask.cuda()
    eager = gen(model, ids, attention_mask=mask, max_new_tokens=NEW, cuda_graph=False)
    result = gen(model, ids, attention_mask=mask, max_new_tokens=NEW, return_result=True)
    assert result.mode == "cuda_graph"
    assert result.tokens == eager
    # Another bucket and a sampled config reuse the pool; seeds reproduce across graph and eager.
    kw = dict(max_new_tokens=NEW, temperature=0.8, top_p=0.9, seed=3)
    assert gen(model, ids[:1], **kw) == gen(model, ids[:1], cuda_graph=False, **kw)


@needs_cuda
def test_cuda_graph_capture_failure_falls_back_to_eager(monkeypatch):
    from fastlm.engine import cuda_graphs

    model = build_model("arcee_gqa_bias_yarn").cuda()
    ids = random_ids(1, 6).cuda()
    eager = gen(model, ids[0], max_new_tokens=8, cuda_graph=False)

    def broken(self, batch, config):
        raise RuntimeError("capture broken on purpose")

    monkeypatch.setattr(cuda_graphs.GraphRunner, "_capture", broken)
    with pytest.warns(RuntimeWarning, match="capture"):
        result = gen(model, ids[0], max_new_tokens=8, return_result=True)
    assert result.mode == "eager" and result.tokens[0] == eager


def test_capacity_overflow_stops_cleanly():
    model = model_for("helium_gqa")
    ids, mask = left_padded_batch([5, 9, 3], seed=2)
    full = gen(model, ids, attention_mask=mask, max_new_tokens=NEW, ignore_eos=True)
    with pytest.warns(RuntimeWarning, match="cache_full"):
        result = gen(model, ids, attention_mask=mask, max_new_tokens=NEW, ignore_eos=True,
                                 max_cache_len=14, return_result=True)
    assert result.finish_reasons == ["cache_full"] * 3
    # A sequence of n prompt tokens holds 14 tokens in the cache, so emits 14 - n + 1 (the last is never fed).
    assert [len(t) for t in result.tokens] == [10, 6, 12]
    assert all(result.tokens[b] == full[b][: len(result.tokens[b])] for b in range(3))
    # Prompt exactly at capacity: one token (from prefill), then cache_full. Longer: a clear error.
    with pytest.warns(RuntimeWarning, match="cache_full"):
        one = gen(model, ids[1, -9:], max_new_tokens=5, max_cache_len=9, ignore_eos=True,
                              return_result=True)
    assert [len(t) for t in one.tokens] == [1] and one.finish_reasons == ["cache_full"]
    with pytest.raises(ValueError, match="longer than the model's context"):
        gen(model, ids[1, -9:], max_new_tokens=5, max_cache_len=8)


def test_decode_step_never_writes_past_the_cache():
    """The step itself stops a sequence at the limit and clamps cache writes, whatever the host does."""
    model = model_for("helium_gqa")
    gen(model, random_ids(2, 4)[0], max_new_tokens=2, ignore_eos=True)
    runner = engine_for(model, cuda_graph=True, compile=False).runner
    st = runner.state
    with torch.inference_mode():
        st.done[:1].fill_(False)
        st.reason[:1].fill_(RUNNING)
        st.limit.fill_(runner.max_len)
        st.positions[:1].fill_(runner.max_len + 5)  # a host bug: past the allocation
        before = [k.clone() for k in runner.cache.k]
        runner.decode_step(1, SamplingConfig())
    assert bool(st.done[0]) and int(st.reason[0]) == CACHE_FULL and int(st.out[0]) == -1
    for k, k0 in zip(runner.cache.k, before):  # only the (clamped) last slot may change
        assert torch.equal(k[:, :, :-1], k0[:, :, :-1])


def test_eos_stops_each_sequence():
    model = model_for("persimmon_qknorm")
    ids, mask = left_padded_batch([5, 9, 3], seed=2)
    free = gen(model, ids, attention_mask=mask, max_new_tokens=NEW, ignore_eos=True)
    stop = free[1][5]
    result = gen(model, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=stop,
                             return_result=True)
    for b in range(3):
        expected = trim_eos(free[b], stop)
        assert result.tokens[b] == expected
        assert result.finish_reasons[b] == ("eos" if expected[-1] == stop else "length")
    assert result.finish_reasons[1] == "eos" and len(result.tokens[1]) <= 6
    # A list of stop ids, and the sync interval does not change the tokens.
    assert gen(model, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[stop, 300],
                           check_every=1) == result.tokens


def test_sampling_seeded_reproducible_and_topk1_is_greedy():
    model = model_for("arcee_gqa_bias_yarn")
    ids, mask = left_padded_batch([5, 9, 3], seed=2)
    kw = dict(attention_mask=mask, max_new_tokens=16, ignore_eos=True)
    greedy = gen(model, ids, **kw)
    a = gen(model, ids, temperature=0.9, top_p=0.95, seed=11, **kw)
    assert a == gen(model, ids, temperature=0.9, top_p=0.95, seed=11, **kw)
    assert a != gen(model, ids, temperature=0.9, top_p=0.95, seed=12, **kw)
    assert a != greedy
    assert gen(model, ids, temperature=1.5, top_k=1, seed=3, **kw) == greedy
    assert gen(model, ids, temperature=1.0, top_p=1e-6, seed=3, **kw) == greedy
    torch.manual_seed(0)
    b = gen(model, ids, temperature=1.0, top_k=50, **kw)
    torch.manual_seed(0)
    assert b == gen(model, ids, temperature=1.0, top_k=50, **kw)


def test_sampler_distribution():
    """The counter-based Gumbel draw samples softmax(logits / T) (chi-square-free tolerance check)."""
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).expand(4000, 4)
    counts = torch.bincount(sample(logits, SamplingConfig(1.0), torch.tensor([5]), torch.tensor([0])), minlength=4)
    assert torch.allclose(counts.float() / 4000, logits[0].softmax(-1), atol=0.03)
    kept = sample(logits, SamplingConfig(1.0, top_k=2), torch.tensor([5]), torch.tensor([1]))
    assert set(kept.tolist()) == {1, 2}
    u = uniform(torch.tensor([1]), torch.tensor([2]), (64, 1000), "cpu")
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01


def _top_p_case(kind: str, B: int, V: int, g: torch.Generator) -> torch.Tensor:
    """Scores as sample() makes them (max 0, divided by T) of a kind: peaked (the nucleus in the first hundred),
    bf16-widened (ties everywhere, the k-th score's included), flat (the nucleus past 1,024), with -inf masks."""
    x = torch.randn(B, V, generator=g) * (6.0 if kind != "flat" else 0.5)
    if kind == "bf16":
        x = x.bfloat16().float()
    if kind == "masked":
        x[:, torch.randint(0, V, (V // 3,), generator=g)] = float("-inf")
    if kind == "tied-top":  # the best scores tied across the vocabulary
        x[:, torch.randint(0, V, (40,), generator=g)] = x.max() + 1
    return (x - x.amax(dim=-1, keepdim=True)) / 0.8


@pytest.mark.parametrize("kind,taken", [("peaked", True), ("bf16", True), ("masked", True), ("tied-top", True),
                                        ("flat", False)])
def test_top_p_from_the_best_candidates_is_the_full_sort(kind, taken):
    """CPU top-p first tries the 1,024 best candidates (topk) rather than sorting the vocabulary: where it answers
    it gives the full sort's tokens, bit for bit (same order of ties, probabilities, running sums and noise), over
    many seeds and both nucleus sizes; where the nucleus reaches past them it declines."""
    from fastlm.engine import sampling as S
    g = torch.Generator().manual_seed(len(kind))
    answered = 0
    for trial in range(12):
        B = 1 + trial % 3
        scores = _top_p_case(kind, B, 32000 + trial, g)
        probs = scores.softmax(dim=-1)
        for top_p in (0.5, 0.9, 0.999):
            seed, counter = torch.tensor([trial]), torch.tensor([int(top_p * 1000)])
            noise = S._gumbel_noise(seed, counter, tuple(scores.shape), "cpu", "auto")
            fast = S._top_p_in_prefix(scores, probs, noise, torch.tensor([top_p]))
            if fast is not None:
                answered += 1
                assert torch.equal(fast, S._top_p_sorted(scores, probs, noise, torch.tensor([top_p]))), (trial, top_p)
    assert (answered > 20) if taken else answered == 0, answered


def test_top_p_declines_rows_led_by_nan_or_inf():
    from fastlm.engine import sampling as S
    scores = torch.randn(2, 5000) * 6
    noise = S._gumbel_noise(torch.tensor([1]), torch.tensor([2]), (2, 5000), "cpu", "auto")
    for bad in (float("nan"), float("inf")):
        s = scores.clone()
        s[1, 17] = bad
        assert S._top_p_in_prefix(s, s.softmax(-1), noise, 0.9, k=1024) is None
    assert S._top_p_in_prefix(scores, scores.softmax(-1), noise, 0.9, k=1024) is not None


@pytest.mark.parametrize("V", [32000, 256, 300, 32001, 7])
def test_first_argmax_is_torch_argmax(V):
    """The chunked argmax of greedy and Gumbel sampling gives torch.argmax's index: the first maximum on ties, the
    first NaN where there is one, index 0 for an all -inf row; vocabularies with a partial last chunk too."""
    g = torch.Generator().manual_seed(V)
    for trial in range(60):
        x = torch.randn(3, V, generator=g)
        if trial % 3 == 0:  # ties of the maximum, in different chunks
            x[:, torch.randint(0, V, (4,), generator=g)] = x.max() + 1
        if trial % 4 == 0:  # a row of equal values
            x[0] = 0.5
        if trial % 5 == 0:
            x[1, torch.randint(0, V, (2,), generator=g)] = float("nan")
        if trial % 7 == 0:
            x[2] = float("-inf")
        if trial % 11 == 0:
            x[2, -1] = float("inf")
        assert torch.equal(first_argmax(x), x.argmax(-1)), trial
    wide = torch.randn(4, 2 * V, generator=g)[:, ::2]  # a strided view, as the sampler's inputs can be
    assert torch.equal(first_argmax(wide), wide.argmax(-1))
    assert first_argmax(torch.zeros(0, V)).shape == (0,)


def test_stream_matches_generate():
    model = model_for("stablelm_default")
    ids, mask = left_padded_batch([4, 8], seed=5)
    expected = gen(model, ids, attention_mask=mask, max_new_tokens=10, ignore_eos=True)
    steps = list(strm(model, ids, attention_mask=mask, max_new_tokens=10, ignore_eos=True))
    assert [[s[b] for s in steps] for b in range(2)] == expected
    single = list(strm(model, ids[1], max_new_tokens=10, ignore_eos=True))
    assert single == expected[1]
    assert gen(model, ids[1].tolist(), max_new_tokens=0) == []


def test_engine_is_reused_and_grows():
    model = model_for("helium_gqa")
    gen(model, random_ids(1, 5)[0], max_new_tokens=4)
    engine = engine_for(model, cuda_graph=True, compile=False)
    cache = engine.runner.cache
    gen(model, random_ids(1, 6)[0], max_new_tokens=4)
    assert engine.runner.cache is cache  # fits: no new allocation
    ids, mask = left_padded_batch([5, 9, 3, 7], seed=2)
    out = gen(model, ids, attention_mask=mask, max_new_tokens=70)
    assert engine.runner.batch >= 4 and engine.runner.max_len >= 79 and len(out) == 4
    assert out == hf_greedy(model, ids, mask, new=70)


def test_dynamic_rope_runs_eagerly_and_matches_transformers():
    config = make_config("arcee_gqa_bias_yarn", max_position_embeddings=16)
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    model = build_model(config)
    assert model.model.rotary_emb.rope_type == "dynamic"
    ids = random_ids(1, 10, seed=4)
    expected = hf_greedy(model, ids, new=20)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF warns about generating past max_position_embeddings
        ours = gen(model, ids[0], max_new_tokens=20, max_cache_len=64, compile="aot_eager",
                               return_result=True)
    assert ours.mode == "eager"  # dynamic tables depend on the length: no compile / graph
    assert ours.tokens[0] == expected


def test_text_prompts_need_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        gen(model_for("helium_gqa"), "hello", max_new_tokens=2)


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("variant", ["arcee_gqa_bias_yarn", "stablelm_hd80_qknorm_parallel", "persimmon_qknorm",
                                     "helium_gqa"])
def test_bound_step_matches_module_step(variant, quantize, monkeypatch):
    """The eager step's pieces bound once per call (ModelRunner.bind) emit exactly the tokens of the module path
    (the compiled step's), each projection, norm and epilogue read from its module at every step; and a call
    binds again, so a weight changed between calls is used by the next one."""
    from fastlm.engine.runner import ModelRunner

    def tokens(model, ids, bound: bool):
        if not bound:
            monkeypatch.setattr(ModelRunner, "bind", lambda self, rows, eager: self.unbind())
        out = fastlm.generate(model, ids, max_new_tokens=12, ignore_eos=True, backend="cpp")
        monkeypatch.undo()
        return out

    model = fastlm.patch(build_model(variant, dtype=torch.bfloat16), "cpp", quantize=quantize)
    ids = random_ids(2, 7, seed=5)
    first = tokens(model, ids, bound=True)
    assert first == tokens(model, ids, bound=False)
    with torch.no_grad():
        for layer in model.base_model.layers:
            up = getattr(layer.mlp, layer.mlp.fused_spec().up_name)
            if quantize is None:  # a new Parameter: other storage, which only a new binding sees
                up.weight = torch.nn.Parameter(up.weight * -1.5)
            else:  # in place: the same storage, other values
                up.scales.mul_(-1.5)
    second = tokens(model, ids, bound=True)
    assert second == tokens(model, ids, bound=False)
    assert second != first


def test_finished_call_keeps_no_bound_weights():
    """A call's bound step (ModelRunner.bind) is dropped when the call ends, so an idle slot never keeps a
    replaced weight's memory alive; an early-closed stream drops it too."""
    model = fastlm.patch(build_model("helium_gqa"), "cpp")
    ids = random_ids(1, 5, seed=3)
    fastlm.generate(model, ids, max_new_tokens=4, ignore_eos=True, backend="cpp")
    engine = engine_for(model, cuda_graph=True, compile=False)
    assert engine.runner is not None and engine.runner._bound is None
    stream = engine.run([ids[0].tolist()], config=SamplingConfig(), max_new_tokens=6, stop_ids=[], seed=0,
                        limit=64, result=fastlm.engine.engine.GenerationResult([], [], []))
    next(stream)
    next(stream)
    stream.close()
    assert engine.runner._bound is None
