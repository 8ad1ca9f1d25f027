"""RNN-T loss vs a float64 brute force over every monotonic alignment (no dynamic programming)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspeech.losses import rnnt_loss

B, T, U, V = 4, 5, 3, 6
LOGIT_LENGTHS = np.array([5, 3, 1, 4])
LABEL_LENGTHS = np.array([3, 2, 1, 0])


def _log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def brute_nll(logits, labels, blank_id=0):
    """-log sum over alignments, for one example with no padding: logits [T, U+1, V] float64."""
    t_len, u_len = logits.shape[0], len(labels)
    lp = _log_softmax(np.asarray(logits, np.float64))
    scores = []
    # An alignment is T-1+U steps (the last blank, out of (T-1, U), is fixed): pick the label steps.
    for label_steps in itertools.combinations(range(t_len - 1 + u_len), u_len):
        t = u = 0
        score = 0.0
        for k in range(t_len - 1 + u_len):
            if k in label_steps:
                score += lp[t, u, labels[u]]
                u += 1
            else:
                score += lp[t, u, blank_id]
                t += 1
        scores.append(score + lp[t_len - 1, u_len, blank_id])
    scores = np.array(scores)
    return -(scores.max() + np.log(np.exp(scores - scores.max()).sum()))


def brute_batch(logits, logit_lengths, labels, label_lengths, blank_id=0):
    return np.array(
        [
            brute_nll(logits[b, :tl, : ul + 1], labels[b, :ul], blank_id)
            for b, (tl, ul) in enumerate(zip(logit_lengths, label_lengths, strict=True))
        ]
    )


def brute_grad(logits, logit_lengths, labels, label_lengths, weights, eps=1e-6):
    """Central differences of sum_b weights[b] * brute_nll_b in float64; zero in the padding."""
    grad = np.zeros_like(logits, dtype=np.float64)
    for b, (tl, ul) in enumerate(zip(logit_lengths, label_lengths, strict=True)):
        x = np.asarray(logits[b, :tl, : ul + 1], np.float64)
        for idx in np.ndindex(x.shape):
            xp, xm = x.copy(), x.copy()
            xp[idx] += eps
            xm[idx] -= eps
            diff = brute_nll(xp, labels[b, :ul]) - brute_nll(xm, labels[b, :ul])
            grad[(b,) + idx] = weights[b] * diff / (2 * eps)
    return grad


@jax.jit
def loss_and_grad(logits, logit_lengths, labels, label_lengths, weights):
    def f(x):
        losses = rnnt_loss(x, logit_lengths, labels, label_lengths)
        return jnp.sum(losses * weights), losses

    (_, losses), grad = jax.value_and_grad(f, has_aux=True)(logits)
    return losses, grad


def _inputs(seed, scale=2.0, b=B, t=T, u=U, v=V):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, t, u + 1, v)) * scale
    labels = rng.integers(1, v, size=(b, u))
    return logits, labels


def _run(
    logits,
    labels,
    dtype=jnp.float32,
    logit_lengths=LOGIT_LENGTHS,
    label_lengths=LABEL_LENGTHS,
    weights=None,
):
    weights = np.ones(len(logits)) if weights is None else weights
    losses, grad = loss_and_grad(
        jnp.asarray(logits, dtype),
        jnp.asarray(logit_lengths),
        jnp.asarray(labels),
        jnp.asarray(label_lengths),
        jnp.asarray(weights, jnp.float32),
    )
    return np.asarray(losses), np.asarray(grad.astype(jnp.float32)), grad.dtype


def _assert_grad_close(grad, ref):
    np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_brute_force_reference_sanity():
    # Uniform logits: every alignment has prob V^-(T+U), and there are C(T-1+U, U) of them.
    logits = np.zeros((3, 3, 4))  # T=3, U=2, V=4
    expected = -np.log(math.comb(3 - 1 + 2, 2)) + (3 + 2) * np.log(4)
    assert np.isclose(brute_nll(logits, [1, 2]), expected)


def test_values_and_grads_match_float64_brute_force():
    logits, labels = _inputs(0)
    weights = np.array([1.0, -0.5, 2.0, 0.7])  # non-uniform upstream cotangent
    losses, grad, _ = _run(logits, labels, weights=weights)
    ref = brute_batch(logits, LOGIT_LENGTHS, labels, LABEL_LENGTHS)
    np.testing.assert_allclose(losses, ref, rtol=1e-5)
    _assert_grad_close(grad, brute_grad(logits, LOGIT_LENGTHS, labels, LABEL_LENGTHS, weights))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_label_equal_to_blank_without_validation(dtype):
    # Invalid data (validation would reject it), but the math must still be the exact RNN-T loss.
    logits, labels = _inputs(9)
    logits = np.asarray(jnp.asarray(logits, dtype).astype(jnp.float32), np.float64)
    labels[:, 0] = 0
    losses, grad, _ = _run(logits, labels, dtype=dtype)
    np.testing.assert_allclose(
        losses, brute_batch(logits, LOGIT_LENGTHS, labels, LABEL_LENGTHS), rtol=1e-5
    )
    ref = brute_grad(logits, LOGIT_LENGTHS, labels, LABEL_LENGTHS, np.ones(B))
    np.testing.assert_allclose(
        grad, ref, rtol=1e-2 if dtype == jnp.bfloat16 else 1e-4, atol=1e-2 * np.abs(ref).max()
    )


def numpy_dp_nll(logits, labels):
    """Textbook row-by-row alpha recursion in float64 (for lattices too big to enumerate)."""
    lp = _log_softmax(np.asarray(logits, np.float64))
    t_len, u1 = lp.shape[:2]
    alpha = np.full((t_len, u1), -np.inf)
    for t in range(t_len):
        for u in range(u1):
            if t == 0 and u == 0:
                alpha[t, u] = 0.0
                continue
            a = alpha[t - 1, u] + lp[t - 1, u, 0] if t > 0 else -np.inf
            b = alpha[t, u - 1] + lp[t, u - 1, labels[u - 1]] if u > 0 else -np.inf
            alpha[t, u] = np.logaddexp(a, b)
    return -(alpha[-1, -1] + lp[-1, -1, 0])


def test_more_labels_than_frames_and_long_lattices():
    logits, labels = _inputs(10, t=3, u=6)  # U > T, still enumerable: C(8, 6) alignments
    tl, ul = np.array([3, 2, 3, 1]), np.array([6, 5, 0, 6])
    losses, grad, _ = _run(logits, labels, logit_lengths=tl, label_lengths=ul)
    np.testing.assert_allclose(losses, brute_batch(logits, tl, labels, ul), rtol=1e-5)
    _assert_grad_close(grad, brute_grad(logits, tl, labels, ul, np.ones(B)))
    logits, labels = _inputs(11, t=40, u=15)  # many anti-diagonals: vs a float64 textbook DP
    tl, ul = np.array([40, 33, 7, 21]), np.array([15, 9, 12, 0])
    losses, _, _ = _run(logits, labels, logit_lengths=tl, label_lengths=ul)
    ref = [numpy_dp_nll(logits[b, : tl[b], : ul[b] + 1], labels[b, : ul[b]]) for b in range(B)]
    np.testing.assert_allclose(losses, ref, rtol=1e-5)


def test_padding_is_ignored_and_gets_zero_grad():
    logits, labels = _inputs(1)
    losses, grad, _ = _run(logits, labels)
    rng = np.random.default_rng(2)
    garbage = logits.copy()
    labels_garbage = labels.copy()
    for b, (tl, ul) in enumerate(zip(LOGIT_LENGTHS, LABEL_LENGTHS, strict=True)):
        garbage[b, tl:] = rng.normal(size=garbage[b, tl:].shape) * 1e3
        garbage[b, :, ul + 1 :] = rng.normal(size=garbage[b, :, ul + 1 :].shape) * 1e3
        labels_garbage[b, ul:] = rng.choice([-7, 0, V, 10 * V], size=U - ul)
    garbage[1, 4, 0, 1] = np.nan  # non-finite garbage beyond the lengths, too
    garbage[1, 3, 3, 2] = np.inf
    garbage[3, 4, 2, 0] = -np.inf
    losses2, grad2, _ = _run(garbage, labels_garbage)
    np.testing.assert_array_equal(losses2, losses)
    np.testing.assert_array_equal(grad2, grad)
    for b, (tl, ul) in enumerate(zip(LOGIT_LENGTHS, LABEL_LENGTHS, strict=True)):
        assert not np.any(grad2[b, tl:]) and not np.any(grad2[b, :, ul + 1 :])
        assert np.all(np.abs(grad2[b, :tl, : ul + 1]).sum(-1) > 0)


def test_no_labels_and_single_frame():
    # U = 0 everywhere: the only alignment is T blanks.
    logits, _ = _inputs(3, u=0)
    labels = np.zeros((B, 0), np.int32)
    lens = np.array([5, 1, 2, 5])
    losses, grad, _ = _run(logits, labels, logit_lengths=lens, label_lengths=np.zeros(B, int))
    lp = _log_softmax(logits)[:, :, 0, 0]
    np.testing.assert_allclose(losses, [-lp[b, :tl].sum() for b, tl in enumerate(lens)], rtol=1e-5)
    assert np.all(np.isfinite(grad))
    # T = 1: all labels are emitted from the single frame, then one blank.
    logits, labels = _inputs(4, t=1)
    ones = np.ones(B, int)
    losses, grad, _ = _run(logits, labels, logit_lengths=ones)
    ref = brute_batch(logits, ones, labels, LABEL_LENGTHS)
    np.testing.assert_allclose(losses, ref, rtol=1e-5)
    _assert_grad_close(grad, brute_grad(logits, ones, labels, LABEL_LENGTHS, np.ones(B)))


def test_bfloat16_logits_accumulate_in_float32():
    logits, labels = _inputs(5)
    rounded = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    losses, grad, dtype = _run(logits, labels, dtype=jnp.bfloat16)
    assert dtype == jnp.bfloat16
    ref_losses, ref_grad, _ = _run(rounded, labels)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)  # same float32 math after the cast
    np.testing.assert_allclose(grad, ref_grad, atol=1e-2 * np.abs(ref_grad).max())


def test_huge_logits_stay_finite_and_exact():
    logits, labels = _inputs(6, scale=1e4)
    losses, grad, _ = _run(logits, labels)
    assert np.all(np.isfinite(losses)) and np.all(np.isfinite(grad))
    ref = brute_batch(logits, LOGIT_LENGTHS, labels, LABEL_LENGTHS)
    np.testing.assert_allclose(losses, ref, rtol=1e-5)
    assert np.all(np.abs(grad) <= 1.0 + 1e-6)  # softmax differences are bounded by 1


def test_eager_call_matches_jit():
    logits, labels = _inputs(7)
    eager = rnnt_loss(
        jnp.asarray(logits, jnp.float32),
        jnp.asarray(LOGIT_LENGTHS),
        jnp.asarray(labels),
        jnp.asarray(LABEL_LENGTHS),
    )
    np.testing.assert_allclose(eager, _run(logits, labels)[0], rtol=1e-6)


def _args(**overrides):
    logits, labels = _inputs(8)
    args = dict(
        logits=jnp.asarray(logits, jnp.float32),
        logit_lengths=jnp.asarray(LOGIT_LENGTHS),
        labels=jnp.asarray(labels),
        label_lengths=jnp.asarray(LABEL_LENGTHS),
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(logits=jnp.zeros((B, T, U + 1))), "logits must be"),
        (dict(logits=jnp.zeros((B, T, U + 1, V), jnp.int32)), "logits must be a float"),
        (dict(labels=jnp.zeros((B, U + 1), jnp.int32)), "labels must have shape"),
        (dict(labels=jnp.zeros((B, U))), "labels must be an integer"),
        (dict(logit_lengths=jnp.zeros((B + 1,), jnp.int32)), "logit_lengths must have shape"),
        (dict(label_lengths=jnp.zeros((B,), jnp.float32)), "label_lengths must be an integer"),
        (dict(blank_id=V), "blank_id"),
        (dict(labels=jnp.full((B, U), V)), r"labels must lie in \[0, V=6\)"),
        (dict(labels=jnp.full((B, U), -1)), "labels must lie"),
        (dict(labels=jnp.zeros((B, U), jnp.int32)), "differ from blank_id"),
        (dict(logit_lengths=jnp.array([5, 6, 1, 1])), "logit_lengths must lie in"),
        (dict(logit_lengths=jnp.array([5, 0, 1, 1])), "logit_lengths must lie in"),
        (dict(label_lengths=jnp.array([3, 4, 0, 0])), "label_lengths must lie in"),
    ],
)
def test_bad_input_raises_naming_the_argument(overrides, match):
    with pytest.raises(ValueError, match=match):
        rnnt_loss(**_args(**overrides))


def test_value_checks_under_jit_with_validate():
    args = _args(logit_lengths=jnp.array([5, 9, 1, 1]))
    f = jax.jit(lambda a: rnnt_loss(**a, validate=True))
    with pytest.raises(Exception, match="logit_lengths must lie in"):
        jax.block_until_ready(f(args))
    ok = _args()
    np.testing.assert_allclose(f(ok), rnnt_loss(**ok), rtol=1e-6)


def test_without_validation_under_jit_bad_values_are_clamped_not_nan():
    args = _args(logit_lengths=jnp.array([9, 3, 1, 4]), label_lengths=jnp.array([5, 2, 1, 0]))
    out = jax.jit(lambda a: rnnt_loss(**a))(args)
    clamped = rnnt_loss(**_args(logit_lengths=jnp.array([5, 3, 1, 4])))
    np.testing.assert_array_equal(out, clamped)
