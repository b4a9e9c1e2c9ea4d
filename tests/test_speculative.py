"""Speculative decoding: lossless greedy, exact rollback, the target's distribution when sampling, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.decoding.graphs import DecodeSession
from pipeline.decoding.speculative import (
    PlainDecoder,
    Sampling,
    SpeculativeDecoder,
    generate,
    required_length,
    speculative_generate,
)
from pipeline.errors import PipelineError
from pipeline.models.builder import attention_layers_for_ratio, build_hybrid
from pipeline.models.cache import HybridMambaCache

TINY = dict(
    vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, eos_token_id=1, pad_token_id=0, bos_token_id=None,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def teacher(seed=0, **overrides):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # sharper logits than the default init: fewer near-ties, clearer acceptance
        model.lm_head.weight.mul_(8.0)
    return model


def roughen(model, seed=0):
    """Random values where the attention-mimicking init is trivial (identity conv, D = 0, a gate of
    exactly 1), so parity tests of the decoding paths exercise every term, the gate's bias included."""
    g = torch.Generator().manual_seed(seed)

    def fill_(t, std, mean=0.0):
        t.copy_(mean + std * torch.randn(t.shape, generator=g))

    with torch.no_grad():
        for layer in model.model.layers:
            m = getattr(layer, "mamba", None)
            if m is None:
                continue
            fill_(m.conv1d.weight, 0.5)
            fill_(m.conv1d.bias, 0.2)
            fill_(m.D, 0.5, 1.0)
            if hasattr(m, "in_proj"):
                fill_(m.in_proj.weight[: m.d_inner], 0.2)
                fill_(m.in_proj.bias, 0.3)
                fill_(m.norm.weight, 0.2, 1.0)
            else:
                fill_(m.in_proj_z.weight, 0.2)
                fill_(m.in_proj_z.bias, 0.3)
    return model


def hybrid(ratio, mixer="mamba2", seed=0, **overrides):
    source = teacher(seed, **overrides)
    layers = attention_layers_for_ratio(source.config.num_hidden_layers, ratio) if ratio else range(8)
    return roughen(build_hybrid(source, layers, mixer_type=mixer, seed=seed, mamba_chunk_size=8).eval(), seed)


def prompts(batch=2, length=7, seed=1, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, length), generator=g)


def hf_greedy(model, ids, mask, max_new_tokens, eos=None):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)
    new = out[:, ids.shape[1]:]
    return torch.nn.functional.pad(new, (0, max_new_tokens - new.shape[1]))


@pytest.mark.parametrize("ratio,mixer", [(0.0, "mamba2"), (0.5, "mamba2"), (0.875, "mamba2"), (0.5, "mamba1")])
def test_greedy_speculative_is_lossless_for_any_draft(ratio, mixer):
    target = hybrid(ratio, mixer)
    bad_draft = teacher(seed=7, num_hidden_layers=2)  # random: another model entirely
    ids = prompts()
    expected = hf_greedy(target, ids, None, 16)
    assert torch.equal(generate(target, ids, max_new_tokens=16).tokens, expected)
    for k in range(1, 7):
        perfect = speculative_generate(target, target, ids, k=k, max_new_tokens=16)
        assert torch.equal(perfect.tokens, expected), f"K={k}, perfect draft"
        assert perfect.stats.acceptance_rate == 1.0
        bad = speculative_generate(target, bad_draft, ids, k=k, max_new_tokens=16)
        assert torch.equal(bad.tokens, expected), f"K={k}, random draft"
        assert bad.stats.acceptance_rate < 0.15
        assert bad.stats.mean_accepted_length < 1.0 + 0.15 * k


def test_plain_transformers_teacher_as_target():
    target, draft = teacher(0), teacher(0, num_hidden_layers=3)
    ids = prompts(batch=1)
    expected = hf_greedy(target, ids, None, 20)
    out = speculative_generate(target, draft, ids, k=3, max_new_tokens=20)
    assert torch.equal(out.tokens, expected)
    assert 0.0 <= out.stats.acceptance_rate <= 1.0 and out.stats.rounds >= 20 / 4


@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_rollback_equals_fresh_run_over_accepted_prefix(mixer):
    """After a block of 5 tokens with per-row keeps (0 … 5), the cache is that of the kept prefix."""
    model = hybrid(0.5, mixer)
    ids = prompts(batch=3, length=6)
    block = prompts(batch=3, length=5, seed=9)
    session = DecodeSession(model, 3, 32, max_block=5)
    with torch.no_grad():
        session.prefill(list(ids))
        session.extend(block)
        keep = torch.tensor([0, 2, 5])
        session.commit(keep)
        next_logits = session.extend(block[:, :1])[:, 0]  # consumes the pending replay
        session.commit(torch.ones(3, dtype=torch.long))
        session.settle()
        for r in range(3):
            prefix = torch.cat([ids[r], block[r, : keep[r]], block[r, :1]])[None]
            fresh = HybridMambaCache(model.config, 1, torch.float32, "cpu")
            logits = model(prefix, cache=fresh, use_cache=True).logits[0, -1]
            assert (next_logits[r] - logits).abs().max() < 1e-4
            n = prefix.shape[1]
            assert int(session.lengths[r]) == n
            cache = session.cache
            for i in model.config.attention_layers:
                assert _rel(cache.keys[i][r, :, :n], fresh.key_cache[i][0]) < 1e-5
                assert _rel(cache.values[i][r, :, :n], fresh.value_cache[i][0]) < 1e-5
            for i in model.config.mamba_layers:
                assert _rel(cache.ssm_states[i][r], fresh.ssm_states[i][0]) < 1e-5
                assert _rel(cache.conv_windows[i][r, :, : cache.conv_keep], fresh.conv_states[i][0]) < 1e-5


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _exact_joint(model, prompt, vocab, sampling):
    """P(t1, t2) and P(t3) of the target's own sampling, computed exactly by enumeration."""
    with torch.no_grad():
        p1 = sampling.probs(model(prompt[None]).logits[0, -1])
        pairs = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab))
        seqs = torch.cat([prompt.expand(len(pairs), -1), pairs], dim=1)
        logits = model(seqs).logits
        p2 = sampling.probs(logits[:, -2]).reshape(vocab, vocab, vocab)[torch.arange(vocab), torch.arange(vocab)]
        p3 = sampling.probs(logits[:, -1])  # (v*v, v)
    joint12 = p1[:, None] * p2  # (v, v)
    return joint12, (joint12.reshape(-1, 1) * p3).sum(0)


def _chisquare_p(observed, expected_probs, n):
    expected = expected_probs.double().numpy() * n
    keep = expected >= 5  # pool sparse cells so the chi-square approximation holds
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()
    return chisquare(obs, exp).pvalue


def test_sampling_follows_the_target_distribution():
    vocab, n = 8, 4000
    target = hybrid(0.5, vocab_size=vocab, eos_token_id=None, pad_token_id=None)
    draft = teacher(seed=3, vocab_size=vocab, num_hidden_layers=2, eos_token_id=None, pad_token_id=None)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.25)  # spread the distribution over the 8 tokens
    prompt = prompts(batch=1, length=5, vocab=vocab)[0]
    sampling = Sampling(do_sample=True, temperature=1.0)
    generator = torch.Generator().manual_seed(0)
    out = speculative_generate(
        target, draft, prompt.expand(n, -1).clone(), k=2, max_new_tokens=3, sampling=sampling, generator=generator
    ).tokens
    joint12, marginal3 = _exact_joint(target, prompt, vocab, sampling)
    obs12 = np.bincount((out[:, 0] * vocab + out[:, 1]).numpy(), minlength=vocab * vocab)
    obs3 = np.bincount(out[:, 2].numpy(), minlength=vocab)
    assert _chisquare_p(obs12, joint12.reshape(-1), n) > 1e-3
    assert _chisquare_p(obs3, marginal3, n) > 1e-3
    # the test has power: the draft's own distribution is clearly rejected
    draft_joint, _ = _exact_joint(build_hybrid(draft, range(2)).eval(), prompt, vocab, sampling)
    assert _chisquare_p(obs12, draft_joint.reshape(-1), n) < 1e-3


def test_bad_input_fails_before_generating(monkeypatch):
    target = hybrid(0.5)

    def no_generation(*args, **kwargs):
        raise AssertionError("generation started")

    monkeypatch.setattr(DecodeSession, "prefill", no_generation)
    ids = prompts()
    with pytest.raises(PipelineError, match="vocabulary"):
        speculative_generate(target, teacher(1, vocab_size=50, num_hidden_layers=2), ids, k=2, max_new_tokens=4)
    for bad_k in (0, -1, 1.5):
        with pytest.raises(PipelineError, match="K ="):
            speculative_generate(target, target, ids, k=bad_k, max_new_tokens=4)
    from tests.tiny_teacher import build_tokenizer

    tok_a, tok_b = build_tokenizer(), build_tokenizer()
    vocab = tok_b.get_vocab()
    swapped = {**vocab, "a": vocab["b"], "b": vocab["a"]}  # same size, different ids: another tokenizer
    tok_b.get_vocab = lambda: swapped
    with pytest.raises(PipelineError, match="tokenizer"):
        speculative_generate(target, target, ids, k=2, max_new_tokens=4, target_tokenizer=tok_a, draft_tokenizer=tok_b)
    with pytest.raises(PipelineError, match="eos_token_id"):
        speculative_generate(target, teacher(1, eos_token_id=5, num_hidden_layers=2), ids, k=2, max_new_tokens=4)


def test_batch_with_eos_in_some_rows_and_left_padding():
    target = hybrid(0.5)
    draft = teacher(seed=0, num_hidden_layers=3)
    rows = [prompts(1, 9, seed=3)[0], prompts(1, 5, seed=4)[0], prompts(1, 7, seed=5)[0]]
    width = 9
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    free = generate(target, ids, mask, max_new_tokens=14).tokens
    eos = int(free[0, 3])  # row 0 stops at its 4th token; others stop where (if) they meet it
    expected = hf_greedy(target, ids, mask, 14, eos=eos)
    for k in (1, 3, 5):
        out = speculative_generate(target, draft, ids, mask, k=k, max_new_tokens=14, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(out.tokens, expected), f"K={k}"
        assert int(out.num_tokens[0]) == list(free[0]).index(eos) + 1
        for r in range(3):
            n = int(out.num_tokens[r])
            assert (out.tokens[r, n:] == 0).all()
            alone = speculative_generate(target, draft, rows[r][None], k=k, max_new_tokens=14, eos_token_id=eos)
            assert alone.rows()[0] == out.rows()[r]


def test_graph_session_eager_path_equals_plain_generate():
    for model in (teacher(0), hybrid(0.5), hybrid(0.875, "mamba1")):
        ids = prompts(batch=2, length=6)
        expected = hf_greedy(model, ids, None, 12)
        decoder = PlainDecoder(model, batch_size=2, max_length=32)  # cuda_graphs=None → eager on CPU
        assert not decoder.session.use_graphs
        assert torch.equal(decoder.generate(ids, max_new_tokens=12).tokens, expected)
        assert torch.equal(decoder.generate(ids, max_new_tokens=12).tokens, expected)  # the session is reusable
        spec = SpeculativeDecoder(model, teacher(2, num_hidden_layers=2), 3, batch_size=2, max_length=40)
        assert torch.equal(spec.generate(ids, max_new_tokens=12).tokens, expected)
    with pytest.raises(PipelineError, match="CUDA graphs need"):
        DecodeSession(teacher(0), 1, 16, cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_graph_keeps_the_tensors_its_body_closes_over():
    """A tensor only the body's closure holds must outlive the capture: the graph replays its address."""
    session = DecodeSession(teacher(0).cuda(), 1, 16, cuda_graphs=True)
    total = torch.zeros(4, dtype=torch.long, device="cuda")

    def capture_adding_a_range():
        offsets = torch.arange(4, device="cuda")  # referenced by nothing but the body
        return session.capture(lambda: total.add_(offsets), [total])

    graph = capture_adding_a_range()
    junk = [torch.full((4,), 10**9, dtype=torch.long, device="cuda") for _ in range(64)]  # would take a freed block
    graph.replay()
    assert total.tolist() == [0, 1, 2, 3], len(junk)


def test_greedy_host_loop_is_lossless():
    """The greedy host loop (device_rounds off: the sampling loop's path) = plain greedy, perfect and random drafts."""
    target, bad_draft = hybrid(0.5), teacher(seed=7, num_hidden_layers=2)
    ids = prompts()
    expected = generate(target, ids, max_new_tokens=16).tokens
    for k in (1, 3, 6):
        for draft, perfect in ((target, True), (bad_draft, False)):
            decoder = SpeculativeDecoder(target, draft, k, batch_size=2, max_length=required_length(7, 16, k))
            decoder.device_rounds = False
            out = decoder.generate(ids, max_new_tokens=16)
            assert torch.equal(out.tokens, expected), (k, perfect)
            assert (out.stats.acceptance_rate == 1.0) if perfect else (out.stats.acceptance_rate < 0.15), (k, perfect)


@pytest.mark.parametrize("device_rounds", [True, False], ids=["device-rounds", "host-loop"])
def test_reused_decoders_match_fresh_calls_across_lengths_and_eos(device_rounds):
    """The kept greedy loop and round (or the host loop) reset between calls that change max_new_tokens and EOS."""
    model, draft = hybrid(0.5), teacher(2, num_hidden_layers=2)
    ids = prompts(batch=2, length=6)
    plain = PlainDecoder(model, batch_size=2, max_length=40)
    spec = SpeculativeDecoder(model, draft, 3, batch_size=2, max_length=48)
    spec.device_rounds = device_rounds
    expected = generate(model, ids, max_new_tokens=12).tokens
    eos = int(expected[0, 4])  # a token the first row emits mid-way
    for n, stop in ((12, None), (1, None), (7, eos), (12, None), (12, eos)):
        fresh = generate(model, ids, max_new_tokens=n, eos_token_id=stop)
        for out in (plain.generate(ids, max_new_tokens=n, eos_token_id=stop),
                    spec.generate(ids, max_new_tokens=n, eos_token_id=stop)):
            assert torch.equal(out.tokens, fresh.tokens), (n, stop)
            assert torch.equal(out.num_tokens, fresh.num_tokens), (n, stop)
    assert int(fresh.num_tokens[0]) == 5  # the EOS cut happened (EOS included)


def test_sampling_is_reproducible_and_respects_top_k():
    target = hybrid(0.5)
    ids = prompts()
    runs = [
        speculative_generate(target, teacher(2, num_hidden_layers=2), ids, k=3, max_new_tokens=10,
                             sampling=Sampling(do_sample=True, top_k=1), generator=torch.Generator().manual_seed(5)).tokens
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], hf_greedy(target, ids, None, 10))  # top-k = 1 is greedy


def test_decoders_time_their_decoding_and_the_rate_uses_it(monkeypatch):
    """Both decoders report the decode loop's seconds (prefill excluded); decode_rate divides by the best."""
    from types import SimpleNamespace

    from pipeline.decoding import speed

    model, draft = hybrid(0.5), teacher(2, num_hidden_layers=2)
    ids = prompts(batch=1, length=6)
    for out in (PlainDecoder(model, batch_size=1, max_length=32).generate(ids, max_new_tokens=5),
                SpeculativeDecoder(model, draft, 2, batch_size=1, max_length=40).generate(ids, max_new_tokens=5),
                PlainDecoder(model, batch_size=1, max_length=32).generate(
                    ids, max_new_tokens=5, sampling=Sampling(do_sample=True), generator=torch.Generator().manual_seed(0))):
        assert out.decode_s is not None and out.decode_s > 0

    times = iter([0.9, 0.5, 0.7, 0.6])  # warm-up, then three repeats: the best is 0.5
    rate, result = speed.decode_rate(lambda n: SimpleNamespace(decode_s=next(times)), 11, torch.device("cpu"), 3)
    assert rate == pytest.approx(10 / 0.5) and result.decode_s == 0.6

    # a generator that does not time itself is timed whole: (start, end) of t_1, t_N, t_1, t_N
    clock = iter([0.0, 2.0, 0.0, 4.0, 0.0, 1.0, 0.0, 4.5])
    monkeypatch.setattr(speed.time, "perf_counter", lambda: next(clock))
    rate, _ = speed.decode_rate(lambda n: SimpleNamespace(), 11, torch.device("cpu"), 2)
    assert rate == pytest.approx(10 / (4.0 - 1.0))  # best t_N minus best t_1


def test_lagged_all_finished_check_answers_one_call_late():
    """The graphed greedy loop's EOS check reads the flag queued at the call before (the GPU never drains)."""
    from pipeline.decoding.speculative import _LaggedCheck

    finished = torch.tensor([False, False])
    check = _LaggedCheck(finished, lagged=True)
    answers = []
    for state in ([False, False], [True, False], [True, True], [True, True], [True, True]):
        finished.copy_(torch.tensor(state))
        answers.append(check())
    assert answers == [False, False, False, True, True]
    assert _LaggedCheck(finished, lagged=False)() is True  # eager: read at once


def test_greedy_loop_with_the_lagged_check_returns_what_the_prompt_check_returns(monkeypatch):
    """On a GPU the loop learns that every row finished one check late; the extra steps run on
    finished rows only, so tokens, counts and cache lengths are those of the loop that stops at once."""
    from pipeline.decoding import speculative

    model = hybrid(0.5)
    ids = prompts(batch=2, length=6)
    free = generate(model, ids, max_new_tokens=12).tokens
    eos = [int(free[0, 2]), int(free[1, 4])]  # both rows stop early
    runs = {}
    for lagged in (False, True):
        original = speculative._LaggedCheck
        if lagged:
            monkeypatch.setattr(speculative, "_LaggedCheck", lambda finished, _: original(finished, True))
        decoder = PlainDecoder(model, batch_size=2, max_length=32)
        runs[lagged] = (decoder.generate(ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=5), decoder)
        monkeypatch.setattr(speculative, "_LaggedCheck", original)
    (prompt, prompt_decoder), (late, late_decoder) = runs[False], runs[True]
    assert int(prompt.num_tokens.max()) < 12  # the loop did stop early
    assert torch.equal(late.tokens, prompt.tokens) and torch.equal(late.num_tokens, prompt.num_tokens)
    assert torch.equal(late_decoder.session.lengths, prompt_decoder.session.lengths)
