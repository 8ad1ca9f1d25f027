"""RNN-T loss (Graves 2012) on materialized logits, with gradients from the alpha/beta variables.

The loss is split in two pieces that the fused path (`rnnt_fused.py`) shares:

* `blank_label_logprobs`: from logits `[B, T, U+1, V]` keep only the log-probabilities the lattice
  needs ("function merging"): `blank[b,t,u] = log_softmax(logits[b,t,u])[blank_id]` and
  `label[b,t,u] = log_softmax(logits[b,t,u])[labels[b,u]]`. One logsumexp per row, reused by both.
  Its VJP is one fused elementwise pass, `-softmax * (g_blank + g_label)`, plus the two entries
  at the blank and the label, written out because autodiff of the gather produces a scatter into
  a fresh zero buffer plus extra full-size adds (measured ~1.8x the memory-bound pass on CPU,
  instead of ~1.05x).
* `lattice_nll`: `-log sum over monotonic alignments` on the `[B, T, U+1]` lattice, by one
  `lax.scan` over anti-diagonals `n = t + u` (every cell of a diagonal depends only on the previous
  one, so each step is a vectorized `[B, U+1]` update). Its `custom_vjp` runs the mirrored scan for
  beta and returns the edge posteriors `exp(alpha + logp + beta - log Z)` directly.

Conventions: node `(t, u)` has emitted `u` labels after `t` frames; the blank edge goes to
`(t+1, u)`, the label edge to `(t, u+1)`; the alignment ends with the blank out of
`(T_b - 1, U_b)`, i.e. at the virtual node `(T_b, U_b)`. Everything at `t >= T_b` or
`u > U_b` (label edges: `u >= U_b`) is padding: masked out of the value and given zero gradient.

Input checks: shapes and dtypes are checked at trace time (`ValueError` naming the argument).
Value checks (label range, lengths) run whenever the arguments are concrete (eager calls); under
`jax.jit` they run only with `validate=True`, through `jax.debug.callback`, which makes the
computation fail with a `JaxRuntimeError` carrying the same message. Without it, out-of-range
values are clamped (lengths into `[1, T]` and `[0, U]`, labels into `[0, V)`): the result stays
finite but is the loss of the clamped input, so validate while bringing up a new data pipeline.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Log-probability of an impossible edge. Finite so that alpha + logp + beta never forms inf - inf.
NEG = -1e30


def _logaddexp(a, b):
    m = jnp.maximum(a, b)
    return m + jnp.log1p(jnp.exp(-jnp.abs(a - b)))


# ----------------------------------------------------------------------------------------------
# Input checks.


def check_static(
    logits_shape,
    logits_dtype,
    logit_lengths,
    labels,
    label_lengths,
    blank_id,
    *,
    logits_name="logits",
):
    """Trace-time shape and dtype checks; `logits_shape` is `[B, T, U+1, V]`."""
    if len(logits_shape) != 4:
        raise ValueError(f"{logits_name} must be [B, T, U+1, V], got shape {tuple(logits_shape)}")
    if not jnp.issubdtype(logits_dtype, jnp.floating):
        raise ValueError(f"{logits_name} must be a float array, got dtype {logits_dtype}")
    b, t, u1, v = logits_shape
    if t < 1 or u1 < 1 or v < 2:
        raise ValueError(f"{logits_name} needs T >= 1, U+1 >= 1, V >= 2, got {tuple(logits_shape)}")
    for name, x, shape in (
        ("logit_lengths", logit_lengths, (b,)),
        ("labels", labels, (b, u1 - 1)),
        ("label_lengths", label_lengths, (b,)),
    ):
        if tuple(jnp.shape(x)) != shape:
            raise ValueError(
                f"{name} must have shape {shape} to match {logits_name} "
                f"{tuple(logits_shape)}, got {tuple(jnp.shape(x))}"
            )
        if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
            raise ValueError(f"{name} must be an integer array, got dtype {jnp.result_type(x)}")
    if not 0 <= blank_id < v:
        raise ValueError(f"blank_id={blank_id} is outside the vocabulary [0, {v})")


def _check_values_np(logit_lengths, labels, label_lengths, *, num_frames, vocab_size, blank_id):
    logit_lengths, labels, label_lengths = map(np.asarray, (logit_lengths, labels, label_lengths))
    max_labels = labels.shape[1]
    if np.any(logit_lengths < 1) or np.any(logit_lengths > num_frames):
        raise ValueError(f"logit_lengths must lie in [1, T={num_frames}], got {logit_lengths}")
    if np.any(label_lengths < 0) or np.any(label_lengths > max_labels):
        raise ValueError(f"label_lengths must lie in [0, U={max_labels}], got {label_lengths}")
    valid = np.arange(max_labels)[None, :] < label_lengths[:, None]
    bad = valid & ((labels < 0) | (labels >= vocab_size) | (labels == blank_id))
    if np.any(bad):
        b, u = np.argwhere(bad)[0]
        raise ValueError(
            f"labels must lie in [0, V={vocab_size}) and differ from blank_id="
            f"{blank_id} within label_lengths; labels[{b}, {u}] = {labels[b, u]}"
        )


def check_values(
    logit_lengths, labels, label_lengths, *, num_frames, vocab_size, blank_id, validate
):
    """Value checks: eagerly when concrete, else via `jax.debug.callback` if `validate`."""
    check = functools.partial(
        _check_values_np, num_frames=num_frames, vocab_size=vocab_size, blank_id=blank_id
    )
    args = (logit_lengths, labels, label_lengths)
    if not any(isinstance(x, jax.core.Tracer) for x in args):
        check(*args)
    elif validate:
        jax.debug.callback(check, *args)


# ----------------------------------------------------------------------------------------------
# Logits -> blank and label log-probabilities.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def blank_label_logprobs(logits, labels, blank_id):
    """`[B,T,U+1,V]` logits -> (blank `[B,T,U+1]`, label `[B,T,U]`) log-probs in float32.

    Labels are clipped into `[0, V)`; out-of-range labels only occur in padding after validation.
    """
    return _logprobs_fwd(logits, labels, blank_id)[0]


def _logprobs_fwd(logits, labels, blank_id):
    x = logits.astype(jnp.float32)
    num_labels = labels.shape[1]
    labels = jnp.clip(labels, 0, x.shape[-1] - 1)
    m = jax.lax.stop_gradient(jnp.max(x, axis=-1))
    lse = m + jnp.log(jnp.sum(jnp.exp(x - m[..., None]), axis=-1))
    blank = x[..., blank_id] - lse
    idx = jnp.broadcast_to(labels[:, None, :, None], x.shape[:2] + (num_labels, 1))
    label = jnp.take_along_axis(x[:, :, :num_labels], idx, axis=-1)[..., 0] - lse[:, :, :num_labels]
    return (blank, label), (logits, labels, blank, label, lse)


def _logprobs_bwd(blank_id, res, g):
    logits, labels, blank, label, lse = res
    g_blank, g_label = g
    b, t, _, vocab = logits.shape
    n = labels.shape[1]
    total = g_blank.at[:, :, :n].add(g_label)
    # Rows with a zero cotangent (the padding, which may hold inf/NaN logits) get exactly zero.
    active = (g_blank != 0).at[:, :, :n].max(g_label != 0)
    # The entries at the blank and at the label, in float32 (a label equal to the blank, only
    # possible without validation, gets both terms); -softmax * (g_blank + g_label) elsewhere.
    same = labels[:, None, :] == blank_id
    at_blank = g_blank.at[:, :, :n].add(jnp.where(same, g_label, 0.0)) - jnp.exp(blank) * total
    at_blank = jnp.where(active, at_blank, 0.0)
    at_label = jnp.where(active[:, :, :n], g_label - jnp.exp(label) * total[:, :, :n], 0.0)
    at_label = jnp.where(same, at_blank[:, :, :n], at_label)
    p = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    gx = jnp.where(active[..., None], -p * total[..., None], 0.0)
    if logits.dtype == jnp.float32:
        # One fused pass, then two in-place writes of B*T*(U+1) entries.
        gx = gx.at[..., blank_id].set(at_blank)
        bi, ti, ui = jnp.meshgrid(jnp.arange(b), jnp.arange(t), jnp.arange(n), indexing="ij")
        return gx.at[bi, ti, ui, labels[:, None, :]].set(at_label, mode="promise_in_bounds"), None
    # Narrow dtypes: XLA:CPU has no bf16 scatter (it would round-trip a float32 copy), so select
    # the two entries inside the same fused pass instead (~1.0-1.2x vs ~1.2-1.6x measured).
    ids = jnp.arange(vocab)
    label_ids = jnp.pad(labels[:, None, :], ((0, 0), (0, 0), (0, 1)), constant_values=-1)
    at_label = jnp.pad(at_label, ((0, 0), (0, 0), (0, 1)))
    gx = jnp.where(ids == label_ids[..., None], at_label[..., None], gx)
    gx = jnp.where(ids == blank_id, at_blank[..., None], gx)
    return gx.astype(logits.dtype), None


blank_label_logprobs.defvjp(_logprobs_fwd, _logprobs_bwd)


# ----------------------------------------------------------------------------------------------
# The lattice.


def _skew(x, num_diags):
    """`[B, T, W]` -> `[N, B, W]` with `out[n, b, u] = x[b, n - u, u]` (NEG off the lattice)."""
    _, t, w = x.shape
    n = jnp.arange(num_diags)[:, None]
    u = jnp.arange(w)[None, :]
    tt = n - u
    out = x[:, jnp.clip(tt, 0, t - 1), u]  # [B, N, W]
    out = jnp.where((tt >= 0) & (tt < t), out, NEG)
    return jnp.moveaxis(out, 1, 0)


def _unskew(y, num_frames):
    """Inverse of `_skew`: `[N, B, W]` -> `[B, T, W]` with `out[b, t, u] = y[t + u, b, u]`."""
    w = y.shape[2]
    t = jnp.arange(num_frames)[:, None]
    u = jnp.arange(w)[None, :]
    return jnp.moveaxis(y[t + u, :, u], 2, 0)  # [T, W, B] -> [B, T, W]


def _masked_skewed(blank, label, logit_lengths, label_lengths):
    _, t, u1 = blank.shape
    tt = jnp.arange(t)[None, :, None]
    uu = jnp.arange(u1)[None, None, :]
    in_t = tt < logit_lengths[:, None, None]
    blank = jnp.where(in_t & (uu <= label_lengths[:, None, None]), blank, NEG)
    label = jnp.pad(label, ((0, 0), (0, 0), (0, 1)))
    label = jnp.where(in_t & (uu < label_lengths[:, None, None]), label, NEG)
    num_diags = t + u1 - 1
    return _skew(blank, num_diags), _skew(label, num_diags)


def _shift_right(x):
    return jnp.pad(x[:, :-1], ((0, 0), (1, 0)), constant_values=NEG)


def _shift_left(x):
    return jnp.pad(x[:, 1:], ((0, 0), (0, 1)), constant_values=NEG)


def _lattice_fwd(blank, label, logit_lengths, label_lengths):
    # Out-of-range lengths (only without validation) are clamped: the result stays well defined.
    logit_lengths = jnp.clip(logit_lengths, 1, blank.shape[1])
    label_lengths = jnp.clip(label_lengths, 0, blank.shape[2] - 1)
    bs, ls = _masked_skewed(blank, label, logit_lengths, label_lengths)
    b, u1 = blank.shape[0], blank.shape[2]
    alpha0 = jnp.where(jnp.arange(u1) == 0, 0.0, NEG)
    alpha0 = jnp.broadcast_to(alpha0, (b, u1)).astype(jnp.float32)

    def step(alpha, xs):
        blank_n, label_n = xs
        nxt = _logaddexp(alpha + blank_n, _shift_right(alpha + label_n))
        return nxt, alpha

    last, alphas = jax.lax.scan(step, alpha0, (bs, ls))
    alphas = jnp.concatenate([alphas, last[None]], axis=0)  # [T+U+1, B, U+1], diag n = t + u
    bi = jnp.arange(b)
    log_z = alphas[logit_lengths + label_lengths, bi, label_lengths]
    return -log_z, (alphas, bs, ls, log_z, logit_lengths, label_lengths)


def _lattice_bwd(res, g):
    alphas, bs, ls, log_z, logit_lengths, label_lengths = res
    num_diags, b, u1 = bs.shape
    num_frames = num_diags - u1 + 1
    uu = jnp.arange(u1)[None, :]
    end_u = label_lengths[:, None]
    end_n = (logit_lengths + label_lengths)[:, None]
    lz = log_z[:, None]

    def step(beta_next, xs):
        n, alpha_n, blank_n, label_n = xs
        # beta of the virtual end node (T_b, U_b) is log 1.
        beta_next = jnp.where((uu == end_u) & (n + 1 == end_n), 0.0, beta_next)
        via_blank = blank_n + beta_next
        via_label = label_n + _shift_left(beta_next)
        beta_n = _logaddexp(via_blank, via_label)
        post_blank = jnp.exp(alpha_n + via_blank - lz)
        post_label = jnp.exp(alpha_n + via_label - lz)
        return beta_n, (post_blank, post_label)

    beta_last = jnp.full((b, u1), NEG, jnp.float32)
    xs = (jnp.arange(num_diags), alphas[:-1], bs, ls)
    _, (post_blank, post_label) = jax.lax.scan(step, beta_last, xs, reverse=True)
    scale = -g[:, None, None]  # d(-log Z)/d logp = -posterior
    g_blank = _unskew(post_blank, num_frames) * scale
    g_label = _unskew(post_label, num_frames)[:, :, :-1] * scale
    return g_blank, g_label, None, None


@jax.custom_vjp
def lattice_nll(blank, label, logit_lengths, label_lengths):
    """`-log P(labels | x)` from blank `[B,T,U+1]` and label `[B,T,U]` log-probs -> `[B]`.

    Cells beyond the lengths are ignored and receive zero gradient.
    """
    return _lattice_fwd(blank, label, logit_lengths, label_lengths)[0]


lattice_nll.defvjp(_lattice_fwd, _lattice_bwd)


# ----------------------------------------------------------------------------------------------
# Public entry point.


@functools.partial(jax.jit, static_argnames=("blank_id",))
def _rnnt_loss(logits, logit_lengths, labels, label_lengths, blank_id):
    blank, label = blank_label_logprobs(logits, labels, blank_id)
    return lattice_nll(
        blank, label, logit_lengths.astype(jnp.int32), label_lengths.astype(jnp.int32)
    )


def rnnt_loss(logits, logit_lengths, labels, label_lengths, *, blank_id=0, validate=False):
    """Per-example RNN-T negative log-likelihood in nats.

    Args:
      logits: `[B, T, U+1, V]` float32 or bfloat16 joint-network outputs (unnormalized);
        computation is in float32, the gradient has the dtype of `logits`.
      logit_lengths: `[B]` int, valid frames per example, in `[1, T]`.
      labels: `[B, U]` int label ids, in `[0, V)` and `!= blank_id` within `label_lengths`.
      label_lengths: `[B]` int, in `[0, U]`.
      blank_id: the blank token id (static).
      validate: also check values under `jax.jit` (see the module docstring).

    Returns:
      `[B]` float32 losses. Values beyond the lengths do not affect them and get zero gradient.
    """
    check_static(
        jnp.shape(logits), jnp.result_type(logits), logit_lengths, labels, label_lengths, blank_id
    )
    check_values(
        logit_lengths,
        labels,
        label_lengths,
        num_frames=logits.shape[1],
        vocab_size=logits.shape[3],
        blank_id=blank_id,
        validate=validate,
    )
    return _rnnt_loss(logits, logit_lengths, labels, label_lengths, blank_id)
