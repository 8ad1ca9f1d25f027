"""Greedy transducer search on hand-built lattices and on a tiny random model vs a numpy loop."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech.decoding import greedy_search

V, UMAX = 5, 8


def lattice_callables():
    """A 'model' whose logits are a given table: enc_proj[b, t] holds logits for every u.

    The predictor state is the label count u (-1 before the start symbol); pred_out is one_hot(u).
    """

    def pred_step(u, tokens):
        del tokens
        return u + 1, jax.nn.one_hot(u + 1, UMAX)

    def joint_fn(frame, pred_out):
        return jnp.einsum("buv,bu->bv", frame.reshape(frame.shape[0], UMAX, V), pred_out)

    return pred_step, joint_fn


def run_lattice(table, lengths, **kw):
    """table [B, T, UMAX, V] logits."""
    b, t = table.shape[:2]
    pred_step, joint_fn = lattice_callables()
    fn = jax.jit(
        lambda e, n: greedy_search(e, n, -jnp.ones((b,), jnp.int32), pred_step, joint_fn, **kw)
    )
    return fn(jnp.asarray(table.reshape(b, t, UMAX * V)), jnp.asarray(lengths))


def logsoftmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_known_answer_multiple_symbols_and_bound():
    t_len = 4
    table = np.zeros((2, t_len, UMAX, V), np.float32)
    table[..., 0] = 5.0  # blank wins by default
    path = {(0, 0): 1, (0, 1): 2, (2, 2): 3, (2, 3): 4, (2, 4): 1, (2, 5): 2}  # (t, u) -> label
    for (t, u), v in path.items():
        table[:, t, u, v] = 10.0
    table[:, 1, 1, 2] = 10.0  # off the unbounded path (which is at u=2 on frame 1)
    table[1, 3, :, 4] = 20.0  # row 1 has only 3 valid frames: frame 3 must emit nothing
    tokens, lengths, scores = run_lattice(table, [t_len, 3], max_symbols_per_frame=3)
    # Frame 0 emits 1, 2; frame 2 emits 3, 4, 1 and then max_symbols forces a blank (the 2 at
    # (t=2, u=5) is never emitted); frame 3 is blank at u=5.
    want = [1, 2, 3, 4, 1]
    np.testing.assert_array_equal(lengths, [5, 5])
    np.testing.assert_array_equal(tokens[:, :5], [want, want])
    assert tokens.shape == (2, t_len * 3) and np.all(np.asarray(tokens)[:, 5:] == 0)
    lp = logsoftmax(table[0])
    arcs = [(0, 0, 1), (0, 1, 2), (0, 2, 0), (1, 2, 0), (2, 2, 3), (2, 3, 4), (2, 4, 1), (2, 5, 0)]
    expect = sum(lp[t, u, v] for t, u, v in arcs)
    np.testing.assert_allclose(scores[0], expect + lp[3, 5, 0], rtol=1e-5)
    np.testing.assert_allclose(scores[1], expect, rtol=1e-5)

    # One symbol per frame: 1 on frame 0, 2 on frame 1 (u=1), 3 on frame 2, blank on frame 3.
    tokens, lengths, _ = run_lattice(table, [t_len, 3], max_symbols_per_frame=1)
    np.testing.assert_array_equal(lengths, [3, 3])
    np.testing.assert_array_equal(tokens[:, :3], [[1, 2, 3], [1, 2, 3]])

    # max_output_len truncates: the buffer holds 2 labels and then only blanks are emitted.
    tokens, lengths, _ = run_lattice(table, [t_len, 3], max_output_len=2)
    assert tokens.shape == (2, 2)
    np.testing.assert_array_equal(lengths, [2, 2])


def toy_rnn(key, vocab=6, hidden=8, joint=8):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    emb = jax.random.normal(k1, (vocab, hidden))
    w = jax.random.normal(k2, (hidden, hidden)) / np.sqrt(hidden)
    wp = jax.random.normal(k3, (hidden, joint))
    wo = 2.0 * jax.random.normal(k4, (joint, vocab))

    def pred_step(h, tokens):
        h = jnp.tanh(h @ w + emb[tokens])
        return h, h @ wp

    def joint_fn(enc, pred):
        return jnp.tanh(enc + pred) @ wo

    return pred_step, joint_fn


def reference_greedy(enc, length, pred_step, joint_fn, max_sym):
    """Plain Python loop over frames and symbols for one utterance (enc [T, J])."""
    h, out = pred_step(jnp.zeros((1, 8)), jnp.zeros((1,), jnp.int32))
    toks, score = [], 0.0
    for t in range(length):
        for n in range(max_sym + 1):
            lp = np.asarray(jax.nn.log_softmax(joint_fn(enc[None, t], out)[0]))
            v = int(lp.argmax()) if n < max_sym else 0
            score += lp[v]
            if v == 0:
                break
            toks.append(v)
            h, out = pred_step(h, jnp.array([v]))
    return toks, score


def test_matches_python_loop_on_random_model():
    pred_step, joint_fn = toy_rnn(jax.random.key(0))
    b, t = 3, 7
    enc = 1.5 * jax.random.normal(jax.random.key(1), (b, t, 8))
    lengths = jnp.array([7, 4, 0])
    fn = jax.jit(
        lambda e, n: greedy_search(
            e, n, jnp.zeros((b, 8)), pred_step, joint_fn, max_symbols_per_frame=2
        )
    )
    tokens, lens, scores = fn(enc, lengths)
    emitted = 0
    for i in range(b):
        want, score = reference_greedy(enc[i], int(lengths[i]), pred_step, joint_fn, 2)
        assert list(np.asarray(tokens[i, : int(lens[i])])) == want
        np.testing.assert_allclose(scores[i], score, rtol=1e-5, atol=1e-5)
        emitted += len(want)
    assert emitted > 0 and int(lens[2]) == 0 and float(scores[2]) == 0.0
