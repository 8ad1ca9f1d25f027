"""The fused joint + RNN-T loss equals the loss on materialized logits, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxspeech.losses import rnnt_loss, rnnt_loss_fused

B, T, U, J, V = 3, 7, 4, 6, 9
LOGIT_LENGTHS = jnp.array([7, 5, 1])
LABEL_LENGTHS = jnp.array([4, 2, 0])


def joint(params, enc, pred):
    return jnp.tanh(enc + pred) @ params["w"] + params["b"]


def _inputs(seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 5)
    enc = jax.random.normal(ks[0], (B, T, J), dtype)
    pred = jax.random.normal(ks[1], (B, U + 1, J), dtype)
    params = {"w": jax.random.normal(ks[2], (J, V), dtype), "b": jax.random.normal(ks[3], (V,))}
    labels = jax.random.randint(ks[4], (B, U), 1, V)
    return params, enc, pred, labels


def _materialized(params, enc, pred, labels):
    logits = joint(params, enc[:, :, None, :], pred[:, None, :, :])
    return rnnt_loss(logits, LOGIT_LENGTHS, labels, LABEL_LENGTHS)


def _fused(params, enc, pred, labels, time_chunk):
    return rnnt_loss_fused(
        enc,
        pred,
        lambda e, p: joint(params, e, p),
        labels,
        LOGIT_LENGTHS,
        LABEL_LENGTHS,
        time_chunk=time_chunk,
    )


def _value_and_grads(loss_fn):
    weights = jnp.array([1.0, -0.3, 2.0])  # non-uniform upstream cotangent

    def total(params, enc, pred, labels):
        losses = loss_fn(params, enc, pred, labels)
        return jnp.sum(losses * weights), losses

    return jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True))


materialized_vg = _value_and_grads(_materialized)
fused_vg = {c: _value_and_grads(lambda *a, c=c: _fused(*a, time_chunk=c)) for c in (3, 7, 32)}


def _assert_tree_close(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * np.abs(y).max())


@pytest.mark.parametrize("time_chunk", [3, 7, 32])  # 3 does not divide T = 7; 32 > T
def test_fused_matches_materialized(time_chunk):
    args = _inputs()
    (_, ref_losses), ref_grads = materialized_vg(*args)
    (_, losses), grads = fused_vg[time_chunk](*args)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    _assert_tree_close(grads, ref_grads, rtol=1e-5)  # params, encoder_out, predictor_out
    enc_grad = np.asarray(grads[1])
    for b, tl in enumerate(np.asarray(LOGIT_LENGTHS)):
        assert not np.any(enc_grad[b, tl:]) and np.all(np.abs(enc_grad[b, :tl]).sum(-1) > 0)


def test_fused_ignores_garbage_in_padded_frames_and_labels():
    params, enc, pred, labels = _inputs()
    (_, losses), grads = fused_vg[3](params, enc, pred, labels)
    for b, (tl, ul) in enumerate(zip(LOGIT_LENGTHS, LABEL_LENGTHS, strict=True)):
        enc = enc.at[b, tl:].set(jnp.nan)
        pred = pred.at[b, ul + 1 :].set(1e4)
        labels = labels.at[b, ul:].set(-3)
    (_, losses2), grads2 = fused_vg[3](params, enc, pred, labels)
    np.testing.assert_array_equal(losses2, losses)
    for g, g2 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2), strict=True):
        np.testing.assert_array_equal(g2, g)


def test_fused_bfloat16_matches_materialized():
    args = _inputs(1, jnp.bfloat16)
    (_, ref_losses), ref_grads = materialized_vg(*args)
    (_, losses), grads = fused_vg[3](*args)
    assert grads[1].dtype == jnp.bfloat16
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    _assert_tree_close(grads, ref_grads, rtol=2e-2)  # bf16 gradients: 8 mantissa bits


class Joint(nnx.Module):
    def __init__(self, rngs):
        self.out = nnx.Linear(J, V, rngs=rngs)

    def __call__(self, enc, pred):
        return self.out(jnp.tanh(enc + pred))


def test_fused_with_nnx_module_params_in_jitted_step():
    model = Joint(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    _, enc, pred, labels = _inputs(2)

    def loss(state, enc, pred, fused):
        m = nnx.merge(graphdef, state)
        if fused:
            out = rnnt_loss_fused(enc, pred, m, labels, LOGIT_LENGTHS, LABEL_LENGTHS, time_chunk=2)
        else:
            out = rnnt_loss(m(enc[:, :, None], pred[:, None]), LOGIT_LENGTHS, labels, LABEL_LENGTHS)
        return out.sum()

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    fused_loss, fused_grads = step(state, enc, pred, True)
    ref_loss, ref_grads = step(state, enc, pred, False)
    np.testing.assert_allclose(fused_loss, ref_loss, rtol=1e-5)
    _assert_tree_close(fused_grads, ref_grads, rtol=1e-5)
    assert np.abs(np.asarray(fused_grads[0]["out"]["kernel"][...])).max() > 0


def test_fused_never_holds_the_full_logits():
    b, t, u, j, v, chunk = 2, 64, 15, 32, 256, 4
    params = {"w": jnp.zeros((j, v)), "b": jnp.zeros((v,))}
    enc, pred = jnp.zeros((b, t, j)), jnp.zeros((b, u + 1, j))
    labels, tl, ul = jnp.ones((b, u), jnp.int32), jnp.full((b,), t), jnp.full((b,), u)

    def grads(fused):
        def f(params, enc, pred):
            if fused:
                return rnnt_loss_fused(
                    enc, pred, lambda e, p: joint(params, e, p), labels, tl, ul, time_chunk=chunk
                ).sum()
            return rnnt_loss(joint(params, enc[:, :, None], pred[:, None]), tl, labels, ul).sum()

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

    def temp_bytes(fused):
        return grads(fused).lower(params, enc, pred).compile().memory_analysis().temp_size_in_bytes

    full_logits = b * t * (u + 1) * v * 4
    assert temp_bytes(False) >= full_logits
    assert temp_bytes(True) < full_logits / 4


def test_fused_bad_input():
    params, enc, pred, labels = _inputs()
    good = lambda e, p: joint(params, e, p)
    with pytest.raises(ValueError, match="encoder_out must be"):
        rnnt_loss_fused(enc[0], pred, good, labels, LOGIT_LENGTHS, LABEL_LENGTHS)
    with pytest.raises(ValueError, match="joint_fn output must be"):
        rnnt_loss_fused(
            enc, pred, lambda e, p: good(e, p)[:, :, 0], labels, LOGIT_LENGTHS, LABEL_LENGTHS
        )
    with pytest.raises(ValueError, match="labels must have shape"):
        rnnt_loss_fused(enc, pred, good, labels[:, :2], LOGIT_LENGTHS, LABEL_LENGTHS)
    with pytest.raises(ValueError, match="logit_lengths must lie in"):
        rnnt_loss_fused(enc, pred, good, labels, LOGIT_LENGTHS + 1, LABEL_LENGTHS)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, V=9\)"):
        rnnt_loss_fused(enc, pred, good, labels + V, LOGIT_LENGTHS, LABEL_LENGTHS)
    with pytest.raises(ValueError, match="time_chunk"):
        rnnt_loss_fused(enc, pred, good, labels, LOGIT_LENGTHS, LABEL_LENGTHS, time_chunk=0)
