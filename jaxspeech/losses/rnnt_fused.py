"""RNN-T loss fused with the joint network: never materializes the `[B, T, U+1, V]` logits.

The joint network is evaluated `time_chunk` frames at a time inside `lax.map`; each chunk keeps
only its blank and label log-probabilities (`[B, t, U+1]`, `[B, t, U]`), and the chunk body is
wrapped in `jax.checkpoint`, so the backward pass recomputes the chunk's logits instead of storing
them. Peak memory is then O(B * time_chunk * (U+1) * (V + J)) for the joint plus O(B * T * U) for
the lattice, which is shared with `rnnt_loss` (`lattice_nll` in `rnnt.py`).
"""

import functools

import jax
import jax.numpy as jnp

from jaxspeech.losses.distill import rest_logprobs
from jaxspeech.losses.rnnt import blank_label_logprobs, check_static, check_values, lattice_nll

DEFAULT_TIME_CHUNK = 8


def rnnt_loss_fused(
    encoder_out,
    predictor_out,
    joint_fn,
    labels,
    logit_lengths,
    label_lengths,
    *,
    blank_id=0,
    time_chunk=DEFAULT_TIME_CHUNK,
    validate=False,
):
    """Per-example RNN-T negative log-likelihood `[B]` (nats), joint evaluated chunk by chunk.

    Args:
      encoder_out: `[B, T, J]` (projected) encoder frames.
      predictor_out: `[B, U+1, J]` (projected) predictor outputs; position 0 is the start symbol.
      joint_fn: `joint_fn(enc [B, t, 1, J], pred [B, 1, U+1, J]) -> logits [B, t, U+1, V]`. It may
        close over parameters (traced values inside a jitted step); gradients reach them.
      labels: `[B, U]` int; logit_lengths, label_lengths: `[B]` int (see `rnnt_loss`).
      blank_id: the blank token id.
      time_chunk: frames per joint evaluation; T need not be a multiple (the last chunk is padded
        with zero frames and masked).
      validate: also check values under `jax.jit` (see `jaxspeech.losses.rnnt`).

    Returns:
      `[B]` float32 losses, equal to `rnnt_loss(joint_fn(enc[:, :, None], pred[:, None]), ...)`.
    """
    blank, label = lattice_logprobs(
        encoder_out,
        predictor_out,
        joint_fn,
        labels,
        logit_lengths,
        label_lengths,
        blank_id=blank_id,
        time_chunk=time_chunk,
        validate=validate,
    )
    return lattice_nll(
        blank, label, jnp.asarray(logit_lengths, jnp.int32), jnp.asarray(label_lengths, jnp.int32)
    )


def lattice_logprobs(
    encoder_out,
    predictor_out,
    joint_fn,
    labels,
    logit_lengths,
    label_lengths,
    *,
    blank_id=0,
    time_chunk=DEFAULT_TIME_CHUNK,
    validate=False,
    with_rest=False,
):
    """The lattice's blank `[B, T, U+1]` and label `[B, T, U]` log-probs (float32), joint
    evaluated chunk by chunk: what `rnnt_loss_fused` sums over and lattice distillation
    (`jaxspeech.losses.distill`) compares; `with_rest`: also the rest's `[B, T, U+1]`
    (`distill.rest_logprobs`), from the same chunks. Differentiable; the other arguments are as
    for `rnnt_loss_fused`.
    """
    if jnp.ndim(encoder_out) != 3:
        raise ValueError(f"encoder_out must be [B, T, J], got shape {jnp.shape(encoder_out)}")
    if jnp.ndim(predictor_out) != 3:
        raise ValueError(f"predictor_out must be [B, U+1, J], got shape {jnp.shape(predictor_out)}")
    b, t, _ = encoder_out.shape
    if predictor_out.shape[0] != b:
        raise ValueError(f"predictor_out batch {predictor_out.shape[0]} != encoder_out batch {b}")
    if isinstance(time_chunk, bool) or not isinstance(time_chunk, int) or time_chunk < 1:
        raise ValueError(f"time_chunk must be a positive int, got {time_chunk!r}")
    chunk = min(time_chunk, t)
    u1 = predictor_out.shape[1]
    probe = jax.eval_shape(
        joint_fn,
        jax.ShapeDtypeStruct((b, chunk, 1, encoder_out.shape[2]), encoder_out.dtype),
        jax.ShapeDtypeStruct((b, 1, u1, predictor_out.shape[2]), predictor_out.dtype),
    )
    if probe.shape[:3] != (b, chunk, u1):
        raise ValueError(
            f"joint_fn output must be [B, t, U+1, V] = [{b}, {chunk}, {u1}, V] for "
            f"encoder_out {encoder_out.shape}, predictor_out {predictor_out.shape}; "
            f"got {probe.shape}"
        )
    vocab = probe.shape[-1]
    check_static(
        (b, t, u1, vocab),
        probe.dtype,
        logit_lengths,
        labels,
        label_lengths,
        blank_id,
        logits_name="joint_fn output (as [B, T, U+1, V])",
    )
    check_values(
        logit_lengths,
        labels,
        label_lengths,
        num_frames=t,
        vocab_size=vocab,
        blank_id=blank_id,
        validate=validate,
    )
    # The lattice, joint chunk by joint chunk.
    j = encoder_out.shape[2]
    logit_lengths = jnp.asarray(logit_lengths, jnp.int32)
    label_lengths = jnp.asarray(label_lengths, jnp.int32)
    # Zero the padding so that garbage there (even NaN) cannot reach the joint's gradients
    # (e.g. NaN * 0 in the weight gradient); the lattice ignores those frames anyway.
    frame_ok = jnp.arange(t)[None, :, None] < logit_lengths[:, None, None]
    encoder_out = jnp.where(frame_ok, encoder_out, 0)
    label_ok = jnp.arange(predictor_out.shape[1])[None, :, None] <= label_lengths[:, None, None]
    predictor_out = jnp.where(label_ok, predictor_out, 0)
    num_chunks = -(-t // chunk)
    enc = jnp.pad(encoder_out, ((0, 0), (0, num_chunks * chunk - t), (0, 0)))
    enc = jnp.moveaxis(enc.reshape(b, num_chunks, chunk, j), 1, 0)  # [n, B, chunk, J]

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def logprobs(enc_chunk, pred):
        logits = joint_fn(enc_chunk[:, :, None, :], pred[:, None, :, :])
        out = blank_label_logprobs(logits, labels, blank_id)
        return (*out, rest_logprobs(logits, labels, label_lengths, blank_id)) if with_rest else out

    out = jax.lax.map(lambda e: logprobs(e, predictor_out), enc)
    # [n, B, chunk, W] -> [B, n * chunk, W] -> drop the padded frames.
    return tuple(jnp.moveaxis(x, 0, 1).reshape(b, num_chunks * chunk, -1)[:, :t] for x in out)
