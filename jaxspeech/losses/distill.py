"""Knowledge distillation of a transducer over its output lattice (Panchapagesan, Park, Chiu,
Shangguan, Liang and Gruenstein, "Efficient knowledge distillation for RNN-transducer models",
ICASSP 2021, arXiv:2011.06110).

At every lattice node (t, u) the joint's V-way distribution is collapsed to three outcomes: blank,
the correct next label y_{u+1}, and the rest (on the last row, u = U, there is no next label:
blank and the rest). The distillation loss of an utterance is the sum over its valid nodes of
KL(teacher || student) between the collapsed distributions. It needs the blank and label
log-probs the RNN-T loss already computes and the rest's (`rest_logprobs`, one more logsumexp per
node, in the same joint chunks: `rnnt_fused.lattice_logprobs(..., with_rest=True)`), never the
V-way distributions, so it costs the student little beyond its own loss and the teacher one
forward pass. The rest is not 1 - p(blank) - p(label): in float32 that cancels to 0 wherever the
student is confident (rest below ~1e-6), which loses the term and its gradient.
"""

import jax
import jax.numpy as jnp

# Stands for log(0) where a group is empty (the rest, with V = 2): finite, so that 0 * (a - b)
# and its gradient stay 0 instead of NaN.
_EMPTY = -1e30


def rest_logprobs(logits, labels, label_lengths, blank_id):
    """`[B, T, U+1, V]` logits -> `[B, T, U+1]` float32 log-probability of "the rest": neither the
    blank nor the next correct label `labels[:, u]` (on an utterance's last row, u = U_b, which
    has no next label: everything but the blank). Computed from the logits (a logsumexp over
    the rest, minus the normalizer): exact even where the rest is far below the float32
    resolution of 1 - p(blank) - p(label), which is where a trained student puts it.
    Differentiable (plain autodiff; call it per joint chunk)."""
    x = logits.astype(jnp.float32)
    vocab = x.shape[-1]
    ids = jnp.arange(vocab)
    rows = jnp.arange(labels.shape[1] + 1)[None, :]
    nxt = jnp.pad(jnp.clip(labels, 0, vocab - 1), ((0, 0), (0, 1)))
    nxt = jnp.where(rows < jnp.asarray(label_lengths)[:, None], nxt, -1)  # [B, U+1]; -1: none
    rest = (ids != blank_id) & (ids != nxt[:, None, :, None])
    return jax.nn.logsumexp(jnp.where(rest, x, _EMPTY), axis=-1) - jax.nn.logsumexp(x, axis=-1)


def lattice_kd(teacher, student, logit_lengths, label_lengths):
    """Per-utterance sum over valid lattice nodes of KL(teacher || student), collapsed to
    (blank, correct label, rest) -> `[B]` (nats).

    Args:
      teacher, student: each `(blank [B, T, U+1], label [B, T, U], rest [B, T, U+1])` log-probs
        (`rnnt_fused.lattice_logprobs(..., with_rest=True)`).
      logit_lengths, label_lengths: `[B]` int; nodes with t >= T_b or u > U_b are ignored and get
        zero gradient.

    The teacher's log-probs are data (no gradient is taken through them by the caller's
    convention; wrap them in `jax.lax.stop_gradient`).
    """
    (tb, tl, tr), (sb, sl, sr) = teacher, student
    b, t, u1 = sb.shape
    if tuple(x.shape for x in teacher) != tuple(x.shape for x in student):
        raise ValueError(
            f"teacher lattice {[x.shape for x in teacher]} != student lattice "
            f"{[x.shape for x in student]}: teacher and student must see the same batch"
        )
    if sl.shape != (b, t, u1 - 1) or sr.shape != sb.shape:
        raise ValueError(
            f"label log-probs must be [B, T, U] = {(b, t, u1 - 1)} and rest log-probs "
            f"[B, T, U+1] = {sb.shape}, got {sl.shape} and {sr.shape}"
        )
    frames = jnp.arange(t)[None, :, None] < jnp.asarray(logit_lengths)[:, None, None]
    rows = jnp.arange(u1)[None, None, :]
    node = frames & (rows <= jnp.asarray(label_lengths)[:, None, None])
    has_label = node & (rows < jnp.asarray(label_lengths)[:, None, None])

    def pad(x):  # [B, T, U] -> [B, T, U+1]: the last row has no next label
        return jnp.pad(x.astype(jnp.float32), ((0, 0), (0, 0), (0, 1)))

    def term(p, q):  # p log(p / q), p and q log-probs
        p, q = p.astype(jnp.float32), q.astype(jnp.float32)
        return jnp.exp(p) * (p - q)

    kl = term(tb, sb) + term(tr, sr) + jnp.where(has_label, term(pad(tl), pad(sl)), 0.0)
    return jnp.sum(jnp.where(node, kl, 0.0), axis=(1, 2))
