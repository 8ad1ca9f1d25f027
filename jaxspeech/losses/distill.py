"""Knowledge distillation of a transducer over its output lattice (Panchapagesan, Park, Chiu,
Shangguan, Liang and Gruenstein, "Efficient knowledge distillation for RNN-transducer models",
ICASSP 2021, arXiv:2011.06110).

At every lattice node (t, u) the joint's V-way distribution is collapsed to three outcomes: blank,
the correct next label y_{u+1}, and the rest (on the last row, u = U, there is no next label:
blank and the rest). The distillation loss of an utterance is the sum over its valid nodes of
KL(teacher || student) between the collapsed distributions. It needs only the blank and label
log-probs the RNN-T loss already computes (`rnnt_fused.lattice_logprobs`), never the V-way
distributions, so it costs the student nothing beyond its own loss and the teacher one forward
pass.
"""

import jax.numpy as jnp

# The rest's probability is floored here: 1 - p(blank) - p(label) can round to 0 (or below).
_REST_FLOOR = 1e-20


def _collapsed(blank, label, has_label):
    """Log-probs of (blank, label, rest) at each node; label is 0 (unused) where has_label is
    False."""
    label = jnp.where(has_label, label, 0.0)
    used = jnp.where(has_label, jnp.logaddexp(blank, label), blank)
    rest = jnp.log(jnp.maximum(-jnp.expm1(jnp.minimum(used, 0.0)), _REST_FLOOR))
    return blank, label, rest


def lattice_kd(teacher_blank, teacher_label, blank, label, logit_lengths, label_lengths):
    """Per-utterance sum over valid lattice nodes of KL(teacher || student), collapsed to
    (blank, correct label, rest) -> `[B]` (nats).

    Args:
      teacher_blank, blank: `[B, T, U+1]` blank log-probs of the teacher and the student.
      teacher_label, label: `[B, T, U]` log-probs of the next correct label.
      logit_lengths, label_lengths: `[B]` int; nodes with t >= T_b or u > U_b are ignored and get
        zero gradient.

    The teacher's log-probs are data (no gradient is taken through them by the caller's
    convention; wrap them in `jax.lax.stop_gradient`).
    """
    b, t, u1 = blank.shape
    if teacher_blank.shape != blank.shape or teacher_label.shape != label.shape:
        raise ValueError(
            f"teacher lattice {teacher_blank.shape}/{teacher_label.shape} != student lattice "
            f"{blank.shape}/{label.shape}: teacher and student must see the same batch"
        )
    if label.shape != (b, t, u1 - 1):
        raise ValueError(f"label log-probs must be [B, T, U] = {(b, t, u1 - 1)}, got {label.shape}")
    frames = jnp.arange(t)[None, :, None] < jnp.asarray(logit_lengths)[:, None, None]
    rows = jnp.arange(u1)[None, None, :]
    node = frames & (rows <= jnp.asarray(label_lengths)[:, None, None])
    has_label = node & (rows < jnp.asarray(label_lengths)[:, None, None])

    def pad(x):  # [B, T, U] -> [B, T, U+1]: the last row has no next label
        return jnp.pad(x.astype(jnp.float32), ((0, 0), (0, 0), (0, 1)))

    tb, tl, tr = _collapsed(teacher_blank.astype(jnp.float32), pad(teacher_label), has_label)
    sb, sl, sr = _collapsed(blank.astype(jnp.float32), pad(label), has_label)
    kl = jnp.exp(tb) * (tb - sb) + jnp.exp(tr) * (tr - sr)
    kl = kl + jnp.where(has_label, jnp.exp(tl) * (tl - sl), 0.0)
    return jnp.sum(jnp.where(node, kl, 0.0), axis=(1, 2))
