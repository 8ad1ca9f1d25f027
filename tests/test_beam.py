"""ALSD beam search: exact on tiny problems, beam 1 == greedy, beam >= greedy, merging."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspeech.decoding import beam_search, greedy_search

H = 8


def toy_params(key, vocab, joint=8, scale=2.0):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return (
        jax.random.normal(k1, (vocab, H)),
        jax.random.normal(k2, (H, H)) / np.sqrt(H),
        jax.random.normal(k3, (H, joint)),
        scale * jax.random.normal(k4, (joint, vocab)),
    )


def toy_rnn(params, xp=jnp):
    """A one-layer tanh-RNN predictor and a tanh joint closed over `params` (jnp or numpy)."""
    emb, w, wp, wo = params

    def pred_step(h, tokens):
        h = xp.tanh(h @ w + emb[tokens])
        return h, h @ wp

    def joint_fn(enc, pred):
        return xp.tanh(enc + pred) @ wo

    return pred_step, joint_fn


def sequence_logprob(enc, length, labels, params):
    """log P(labels | enc[:length]) by the RNN-T forward recursion (numpy reference)."""
    pred_step, joint_fn = toy_rnn([np.asarray(p, np.float64) for p in params], xp=np)
    h, out = pred_step(np.zeros((1, H)), np.zeros((1,), np.int32))
    outs = [out]
    for v in labels:
        h, out = pred_step(h, np.array([v]))
        outs.append(out)
    logits = joint_fn(np.asarray(enc[:length, None, :], np.float64), np.concatenate(outs)[None])
    lp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    u1 = len(labels) + 1
    alpha = np.full((length + 1, u1), -np.inf)
    alpha[0, 0] = 0.0
    for t in range(length):
        for u in range(u1):
            a = alpha[t, u] + lp[t, u, 0]  # blank: (t, u) -> (t + 1, u)
            alpha[t + 1, u] = np.logaddexp(alpha[t + 1, u], a)
            if u + 1 < u1:  # label: (t, u) -> (t, u + 1)
                alpha[t, u + 1] = np.logaddexp(alpha[t, u + 1], alpha[t, u] + lp[t, u, labels[u]])
    return alpha[length, u1 - 1]


_JITTED = {}


def decode(fn, params, enc, lengths, **kw):
    """Jit once per (search, options); the toy parameters are traced arguments."""
    key = (fn, tuple(sorted(kw.items())))
    if key not in _JITTED:

        def run(params, e, n):
            return fn(e, n, jnp.zeros((e.shape[0], H)), *toy_rnn(params), **kw)

        _JITTED[key] = jax.jit(run)
    return _JITTED[key](params, enc, lengths)


def test_exhaustive_beam_is_exact_map():
    vocab, t_len, max_len = 3, 3, 3  # 1 + 2 + 4 + 8 = 15 label sequences of length <= 3
    params = toy_params(jax.random.key(3), vocab, scale=1.0)
    enc = jax.random.normal(jax.random.key(4), (2, t_len, 8))
    lengths = jnp.array([3, 2])
    toks, lens, scores = decode(
        beam_search, params, enc, lengths,
        beam_size=16, max_symbols_per_frame=max_len, max_output_len=max_len, return_nbest=True,
    )  # fmt: skip
    seqs = [s for n in range(max_len + 1) for s in itertools.product(range(1, vocab), repeat=n)]
    for i in range(2):
        exact = {s: sequence_logprob(enc[i], int(lengths[i]), list(s), params) for s in seqs}
        ranked = sorted(exact.items(), key=lambda kv: -kv[1])
        got = [tuple(np.asarray(toks[i, j, : int(lens[i, j])])) for j in range(len(seqs))]
        np.testing.assert_allclose(scores[i, : len(seqs)], [v for _, v in ranked], rtol=1e-4)
        assert got[0] == ranked[0][0] and set(got) == set(seqs)
        assert np.all(np.isneginf(np.asarray(scores[i, len(seqs) :])))
        # The probabilities of the sequences of length <= 3 are part of a distribution.
        assert np.logaddexp.reduce(np.asarray(scores[i, : len(seqs)])) <= 1e-5


@pytest.mark.parametrize("max_sym", [1, 3])
def test_beam_one_is_greedy(max_sym):
    vocab = 7
    params = toy_params(jax.random.key(5), vocab)
    enc = 1.5 * jax.random.normal(jax.random.key(6), (4, 9, 8))
    lengths = jnp.array([9, 5, 1, 0])
    kw = dict(max_symbols_per_frame=max_sym, max_output_len=12)
    g = decode(greedy_search, params, enc, lengths, **kw)
    b = decode(beam_search, params, enc, lengths, beam_size=1, **kw)
    assert int(g[1].sum()) > 0
    np.testing.assert_array_equal(g[0], b[0])
    np.testing.assert_array_equal(g[1], b[1])
    np.testing.assert_allclose(g[2], b[2], rtol=1e-6)


def test_beam_never_below_greedy_and_scores_are_sequence_probs():
    vocab = 6
    for seed in range(4):
        params = toy_params(jax.random.key(10 + seed), vocab, scale=1.0)
        enc = jax.random.normal(jax.random.key(20 + seed), (3, 8, 8))
        lengths = jnp.array([8, 6, 3])
        kw = dict(max_symbols_per_frame=3, max_output_len=10)
        g = decode(greedy_search, params, enc, lengths, **kw)
        for k in (2, 4):
            toks, lens, scores = decode(beam_search, params, enc, lengths, beam_size=k, **kw)
            assert np.all(np.asarray(scores) >= np.asarray(g[2]) - 1e-5)
            for i in range(3):  # a merged score is a lower bound on the exact log P(y | x)
                y = list(np.asarray(toks[i, : int(lens[i])]))
                exact = sequence_logprob(enc[i], int(lengths[i]), y, params)
                assert float(scores[i]) <= exact + 1e-4


def test_merging_sums_alignments():
    """Two frames, the only plausible outputs are [] and [1]: [1] has two alignments (label on
    frame 0 or on frame 1), which a merging beam must add up."""

    def pred_step(u, tokens):
        del tokens
        return u + 1, jax.nn.one_hot(u + 1, 4)

    def joint_fn(enc, pred):  # logits depend only on u: P(1 | u=0) = 0.5, P(blank | u>=1) ~ 1
        table = jnp.array([[0.0, 0.0, -30.0], [30.0, -30.0, -30.0], [30.0, -30.0, -30.0]])
        return pred[:, :3] @ table + 0.0 * enc[:, :1]

    enc = jnp.zeros((1, 2, 4))
    toks, lens, scores = jax.jit(
        lambda e: beam_search(e, jnp.array([2]), -jnp.ones((1,), jnp.int32), pred_step, joint_fn,
                              beam_size=3, return_nbest=True)
    )(enc)  # fmt: skip
    # [1]: 0.5 * 1 (label on frame 0, then blanks) + 0.5 * 0.5 * 1 (blank, label on frame 1) = 0.75
    assert int(lens[0, 0]) == 1 and int(toks[0, 0, 0]) == 1
    np.testing.assert_allclose(np.exp(scores[0, 0]), 0.75, rtol=1e-5)
    np.testing.assert_allclose(np.exp(scores[0, 1]), 0.25, rtol=1e-5)  # [] = blank, blank
    assert int(lens[0, 1]) == 0 and float(scores[0, 2]) < -25.0  # the rest needs a 1e-13 arc
