"""Every generate / stream call owns its decode state and KV cache: interleaved streams, a stream paused
around other calls, and threads on one model each get exactly the tokens they would get alone."""
from __future__ import annotations

import threading

import pytest

import fastlm
from fastlm.engine.engine import engine_for
from _models import build_model, random_ids

BACKENDS = ["torch", "cpp"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return build_model("stablelm_hd80_qknorm_parallel")


def _prompts():
    return [random_ids(1, n, seed=s)[0] for n, s in ((6, 1), (9, 2), (4, 3))]


# Sampled at temperature 1: a tiny random model's greedy output soon repeats one token, and a test
# whose expected tokens are all alike could not see one call's tokens leak into another's.
SAMPLING = dict(temperature=1.0, seed=5)


def _alone(model, backend, prompt, **kw):
    kw = {**SAMPLING, **kw}
    out = fastlm.generate(model, prompt, max_new_tokens=10, ignore_eos=True, backend=backend, **kw)
    assert len(set(out)) >= 5, out  # varied enough to tell calls apart
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_interleaved_streams_match_their_solo_runs(model, backend):
    prompts = _prompts()
    alone = [_alone(model, backend, p) for p in prompts]
    # Sampled too: each stream's seed and step counter are its own.
    sampled = _alone(model, backend, prompts[0], temperature=0.9, top_k=20, seed=7)
    streams = [fastlm.stream(model, p, max_new_tokens=10, ignore_eos=True, backend=backend, **SAMPLING)
               for p in prompts]
    streams.append(fastlm.stream(model, prompts[0], max_new_tokens=10, ignore_eos=True, backend=backend,
                                 temperature=0.9, top_k=20, seed=7))
    got = [[] for _ in streams]
    for _ in range(10):
        for out, s in zip(got, streams):
            out.append(next(s))
    assert got == alone + [sampled]


@pytest.mark.parametrize("backend", BACKENDS)
def test_paused_stream_survives_other_calls(model, backend):
    p0, p1, p2 = _prompts()
    expected = _alone(model, backend, p0)
    s = fastlm.stream(model, p0, max_new_tokens=10, ignore_eos=True, backend=backend, **SAMPLING)
    got = [next(s), next(s)]
    # Other calls, one needing a larger cache (the engine must not free or reuse the paused stream's).
    _alone(model, backend, p1)
    fastlm.generate(model, random_ids(3, 40, seed=9), max_new_tokens=30, ignore_eos=True, backend=backend,
                    **SAMPLING)
    got += list(s)
    assert got == expected


def test_two_threads_generate_on_one_model(model):
    prompts = _prompts()
    alone = [_alone(model, "cpp", p, max_cache_len=64) for p in prompts]
    results: dict = {}
    errors: list = []

    def worker(i):
        try:
            for _ in range(3):
                results.setdefault(i, []).append(_alone(model, "cpp", prompts[i], max_cache_len=64))
        except Exception as exc:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(results[i] == [alone[i]] * 3 for i in range(3))


def test_finished_calls_return_their_cache_for_reuse(model):
    fastlm.generate(model, random_ids(1, 5)[0], max_new_tokens=4, backend="cpp")
    engine = engine_for(model, cuda_graph=True, compile=False)
    cache = engine.runner.cache
    fastlm.generate(model, random_ids(1, 6)[0], max_new_tokens=4, backend="cpp")
    assert engine.runner.cache is cache
    s = fastlm.stream(model, random_ids(1, 6)[0], max_new_tokens=4, backend="cpp")
    next(s)
    assert engine.runner is None  # leased by the paused stream
    s.close()  # closing (or collecting) a stream gives its slot back
    assert engine.runner.cache is cache
