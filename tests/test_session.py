"""fastlm.Session: a conversation's KV cache kept between calls. Turn N prefills only turn N's tokens,
and every turn's tokens equal a fresh call (and HF greedy) on the whole sequence."""
from __future__ import annotations

import copy

import pytest
import torch

import fastlm
from _models import ONE_PER_FAMILY, build_model, random_ids


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_greedy(model, ids: list[int], new: int) -> list[int]:
    """HF's own greedy decode (``model`` is an unpatched copy)."""
    with torch.no_grad():
        t = torch.tensor([ids])
        out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("variant", ONE_PER_FAMILY)
def test_turns_prefill_only_their_tokens_and_match_a_fresh_run(variant, backend):
    model = build_model(variant)
    hf = copy.deepcopy(model)
    session = fastlm.Session(model, backend=backend, max_cache_len=64)
    turns = [random_ids(1, n, seed=10 + n)[0].tolist() for n in (5, 3, 4)]
    conversation: list[int] = []
    for n, turn in enumerate(turns):
        conversation += turn
        result = session.generate(conversation, max_new_tokens=6, ignore_eos=True, return_result=True)
        reply = result.tokens[0]
        # Cached: everything up to this turn, the previous reply's last token included.
        assert result.extra["prefill_tokens"] == len(turn) == session.last_prefill_tokens
        fresh = fastlm.generate(model, conversation, max_new_tokens=6, ignore_eos=True, backend=backend)
        assert reply == fresh == hf_greedy(hf, conversation, 6)
        conversation += reply
        assert session.tokens == conversation


def test_diverging_sequence_keeps_only_the_shared_prefix():
    model = build_model("helium_gqa")
    session = fastlm.Session(model, backend="cpp")
    a = random_ids(1, 12, seed=1)[0].tolist()
    session.generate(a, max_new_tokens=4, ignore_eos=True)
    b = a[:7] + random_ids(1, 5, seed=2)[0].tolist()  # an edited turn: diverges at token 7
    result = session.generate(b, max_new_tokens=5, ignore_eos=True, return_result=True)
    assert result.extra["prefill_tokens"] == 5
    assert result.tokens[0] == fastlm.generate(model, b, max_new_tokens=5, ignore_eos=True, backend="cpp")
    # The same sequence again: only its last token is prefilled (its logits give the first new token).
    again = session.generate(b, max_new_tokens=5, ignore_eos=True, return_result=True)
    assert again.extra["prefill_tokens"] == 1 and again.tokens == result.tokens


def test_session_grows_its_cache_and_keeps_the_prefix():
    model = build_model("stablelm_hd80_qknorm_parallel")
    session = fastlm.Session(model, backend="cpp", max_cache_len=256)
    seq = random_ids(1, 20, seed=3)[0].tolist()
    seq += session.generate(seq, max_new_tokens=8, ignore_eos=True)
    small = session._slot.runner.max_len
    seq += random_ids(1, 60, seed=4)[0].tolist()
    result = session.generate(seq, max_new_tokens=10, ignore_eos=True, return_result=True)
    assert session._slot.runner.max_len > small
    assert result.extra["prefill_tokens"] == 60
    assert result.tokens[0] == fastlm.generate(model, seq, max_new_tokens=10, ignore_eos=True, backend="cpp")


def test_closed_stream_keeps_what_it_fed_and_session_is_exclusive():
    model = build_model("helium_gqa")
    session = fastlm.Session(model, backend="cpp")
    seq = random_ids(1, 6, seed=5)[0].tolist()
    s = session.stream(seq, max_new_tokens=10, ignore_eos=True)
    got = [next(s), next(s), next(s)]
    with pytest.raises(RuntimeError, match="already generating"):
        session.generate(seq, max_new_tokens=2)
    s.close()  # as Ctrl-C in fastlm chat does
    assert session.tokens == seq + got[:2]
    more = session.generate(seq + got, max_new_tokens=4, ignore_eos=True, return_result=True)
    assert more.extra["prefill_tokens"] == 1
    assert more.tokens[0] == fastlm.generate(model, seq + got, max_new_tokens=4, ignore_eos=True, backend="cpp")
    with pytest.raises(ValueError, match="one sequence"):
        session.generate([[1, 2], [3, 4]], max_new_tokens=2)


def test_changed_weights_empty_the_cache():
    model = build_model("helium_gqa")
    session = fastlm.Session(model, backend="cpp")
    seq = random_ids(1, 8, seed=6)[0].tolist()
    seq += session.generate(seq, max_new_tokens=3, ignore_eos=True)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(-1.0)  # in place, as an optimizer step
    result = session.generate(seq, max_new_tokens=4, ignore_eos=True, return_result=True)
    assert result.extra["prefill_tokens"] == len(seq)
    assert result.tokens[0] == fastlm.generate(model, seq, max_new_tokens=4, ignore_eos=True, backend="cpp")
