"""Auxiliary CTC loss of the transducer: exact against brute force, wired into `loss`."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspeech.models import TransducerConfig, TransformerTransducer

CFG = TransducerConfig(
    num_mels=8,
    vocab_size=3,
    d_model=8,
    num_heads=2,
    mlp_dim=16,
    num_layers=1,
    subsampling_channels=2,
    chunk_size=2,
    left_chunks=1,
    predictor_dim=8,
    joint_dim=8,
    dropout=0.0,
    ctc_weight=0.5,
)


def _collapse(path):
    out, prev = [], None
    for s in path:
        if s != prev and s != 0:
            out.append(s)
        prev = s
    return out


def _brute_force_ctc(log_probs: np.ndarray, target: list[int]) -> float:
    """-log sum over all frame paths that collapse (merge repeats, drop blanks) to `target`."""
    t, v = log_probs.shape
    total = 0.0
    for path in itertools.product(range(v), repeat=t):
        if _collapse(path) == target:
            total += np.exp(sum(log_probs[i, s] for i, s in enumerate(path)))
    return -np.log(total)


def test_ctc_loss_matches_brute_force_and_joins_the_transducer_loss():
    model = TransformerTransducer(CFG, rngs=nnx.Rngs(0))
    model.eval()
    feats = jax.random.normal(jax.random.key(1), (2, 28, CFG.num_mels))
    feat_lengths = jnp.array([28, 20], jnp.int32)  # 7 and 5 encoder frames
    labels = jnp.array([[1, 1, 2], [2, 0, 0]], jnp.int32)  # a repeat needs a blank between
    label_lengths = jnp.array([3, 1], jnp.int32)

    # Compiled, not op by op: eager dispatch of the model's many small ops is what takes time.
    enc, enc_lengths = nnx.jit(lambda m, f, n: m.encode(f, n))(model, feats, feat_lengths)
    ctc_loss = nnx.jit(lambda m, e, n, y, u: m.ctc_loss(e, n, y, u))
    ctc = np.asarray(ctc_loss(model, enc, enc_lengths, labels, label_lengths))
    log_probs = np.asarray(jax.nn.log_softmax(model.ctc_head(enc), -1), np.float64)
    for b in range(2):
        n, u = int(enc_lengths[b]), int(label_lengths[b])
        ref = _brute_force_ctc(log_probs[b, :n], labels[b, :u].tolist())
        np.testing.assert_allclose(ctc[b], ref, rtol=1e-4)

    # Too few frames for the labels (5 frames; 4 labels with 2 repeats need 6): contributes 0.
    short = ctc_loss(model, enc, enc_lengths, jnp.array([[1, 1, 1, 2]] * 2), jnp.array([4, 4]))
    assert float(short[1]) == 0.0 and 0.0 < float(short[0]) < 1e3

    plain = TransformerTransducer(dataclasses.replace(CFG, ctc_weight=0.0), rngs=nnx.Rngs(0))
    plain.eval()
    assert not hasattr(plain, "ctc_head")
    loss = nnx.jit(lambda m: m.loss(feats, feat_lengths, labels, label_lengths))
    rnnt = loss(plain)  # same init: same RNN-T part
    np.testing.assert_allclose(loss(model), rnnt + 0.5 * ctc, rtol=1e-5)

    grads = nnx.jit(nnx.grad(lambda m: loss(m).sum()))(model)
    assert float(jnp.abs(grads.ctc_head.kernel[...]).sum()) > 0
